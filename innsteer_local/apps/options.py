"""Command-line options, each written once: name, short flag, default and help. An option that
several commands share is declared here; one whose default is a config object's (a dataclass
field, a function's keyword default) is a ConfigDefault, which leaves the value None unless it is
given and shows that default in --help, read from the object itself, never restated by hand.
tests/unit/test_options.py and test_choices.py hold every command to this."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Union

import click

from ..errors import InnsteerError

Shown = Callable[[], Any]  # the default as the help shows it, read from where it is defined


class ConfigDefault(click.Option):
    """An option that is None unless given, so that the config object's own default applies; the
    help shows that default, computed when the help is printed (some config objects need torch,
    which a command line that is only asked for --help should not import)."""

    def __init__(self, *decls: Any, shown: Shown, **kwargs: Any) -> None:
        super().__init__(*decls, default=None, **kwargs)
        self.shown = shown
        self.base_help = self.help or ""

    def default_text(self) -> str:
        try:
            value = self.shown()
        except InnsteerError as e:  # e.g. torch, which the training configs need, is not installed
            return f"unknown here ({e})"
        return format_value(value)

    def get_help_record(self, ctx: click.Context) -> Optional[tuple[str, str]]:
        self.help = f"{self.base_help}  [default: {self.default_text()}]".strip()
        return super().get_help_record(ctx)


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(*decls: Any, default: Union[Shown, Any], **kwargs: Any) -> Callable[[Any], Any]:
    """click.option with its default shown: a plain value, or a callable that reads it from a config
    object (then a ConfigDefault)."""
    if callable(default):
        return click.option(*decls, cls=ConfigDefault, shown=default, **kwargs)
    return click.option(*decls, default=default, show_default=True, **kwargs)


def given(**values: Any) -> dict[str, Any]:
    """The ConfigDefault options that were given, as keyword arguments for the config object."""
    return {k: v for k, v in values.items() if v is not None}


def keyword_default(fn: Callable[..., Any], name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


def finite_float(ctx: click.Context, param: click.Parameter, value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _default_model() -> str:
    from ..runtime import registry

    return registry.default_model()


def _judge_default() -> str:
    from ..runtime import registry

    return "".join(f"{v} for {k}, " for k, v in registry.JUDGES.items() if k) + f"else {registry.JUDGES['']}"


MODEL_HELP = "registry model (see `models list`) or a local .gguf path"
FLOW_HELP = ("a flow file or the name of a flow shipped for the model; NAME names it, :STRENGTH sets its strength, "
             "@GATE its runtime gate (in a model id such as smollm2-135m+honesty@2, @ is the strength instead: "
             "docs/EMBEDDING.md); repeatable")
RPC_HELP = ("rpc-servers to split the model's layers across (llama.cpp's RPC backend; "
            "scripts/build_rpc_server.sh builds rpc-server; keep it off untrusted networks)")

model = option("--model", "-m", default=_default_model, help=MODEL_HELP)
# commands for which a model is optional (doctor, import-cvec): none unless given
optional_model = click.option("--model", "-m", default=None, help=MODEL_HELP)
flows = click.option("--flow", "-f", "flows", multiple=True, metavar="[NAME=]FILE[:STRENGTH][@GATE]", help=FLOW_HELP)
strength = click.option("--strength", "-a", type=float, default=None, callback=finite_float,
                        help="strength of flows given without :STRENGTH [default: the flow's default]")
temperature = option("--temperature", "-t", type=click.FloatRange(0.0), default=0.0, help="0 = greedy")
threads = click.option("--threads", type=click.IntRange(1), default=None, help="[default: all cores]")
seed = option("--seed", "-s", type=int, default=0)
rpc = click.option("--rpc", default=None, metavar="HOST:PORT[,...]", help=RPC_HELP)
# read each reply for fluency (eval's matched fluency, and train's selection by the same rule)
judge = option("--judge", default=_judge_default,
               help="fluency judge of another family (registry name or .gguf); 'none': the model judges itself")
as_json = click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")


def max_tokens(default: Union[Shown, int]) -> Callable[[Any], Any]:
    return option("--max-tokens", "-n", type=click.IntRange(1), default=default, help="new tokens per reply")


def n_ctx(default: int) -> Callable[[Any], Any]:
    return option("--n-ctx", type=click.IntRange(64), default=default,
                  help="tokens each sequence may hold (prompt and reply)")
