"""What the `converters/convert_*.py` scripts run: each names one entry of CONVERTERS. Every
converter takes one input file and `-o OUTPUT`, prints one line saying what it wrote, and answers
bad input with an error line and exit status 1."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import InnsteerError
from ..flow import Flow


@dataclass(frozen=True)
class Converter:
    source_help: str
    output_help: str
    convert: Callable[[argparse.Namespace], str]  # returns the summary line
    options: Callable[[argparse.ArgumentParser], None] = lambda ap: None


def _save(flow: Flow, output: str) -> str:
    flow.save(output)
    return f"wrote {output}: layers {flow.layers}, model {flow.model.name} (n_embd {flow.model.n_embd})"


def _torch_to_flow(args: argparse.Namespace) -> str:
    from .torch_flow import read_checkpoint  # needs torch

    return _save(read_checkpoint(args.source), args.output)


def _cvec_to_flow(args: argparse.Namespace) -> str:
    from .cvec import read_cvec

    return _save(read_cvec(args.source), args.output)


def _flow_to_cvec(args: argparse.Namespace) -> str:
    from .cvec import write_cvec

    flow = Flow.load(args.source)
    write_cvec(flow, args.output, args.strength)
    return f"wrote {args.output}: llama.cpp --control-vector, layers {flow.layers}"


def _flow_to_onnx(args: argparse.Namespace) -> str:
    from .onnx import export_onnx  # needs the [onnx] extra

    manifest = export_onnx(Flow.load(args.source), args.output)
    n = sum(2 + len(s["steer"]) for s in manifest["sites"])
    return f"wrote {n} ONNX graphs and manifest.json to {args.output}"


CONVERTERS = {
    "torch-to-flow": Converter("the .pt file (read with weights_only: no pickled code runs)",
                               "the flow GGUF to write", _torch_to_flow),
    "cvec-to-flow": Converter("the control-vector GGUF", "the flow GGUF to write", _cvec_to_flow),
    "flow-to-cvec": Converter(
        "a linear flow GGUF (mean-diff, vector, an imported control vector)", "the control-vector GGUF to write",
        _flow_to_cvec, lambda ap: ap.add_argument("--strength", type=float, default=None,
                                                  help="baked into the vector [default: the flow's default]")),
    "flow-to-onnx": Converter("the flow GGUF", "the folder to write the graphs into", _flow_to_onnx),
}


def main(name: str, doc: str, argv: Optional[list[str]] = None) -> int:
    """Run converter `name`; `doc` (the script's docstring) is its --help description."""
    conv = CONVERTERS[name]
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("source", help=conv.source_help)
    ap.add_argument("-o", "--output", required=True, help=conv.output_help)
    conv.options(ap)
    args = ap.parse_args(argv)
    try:
        summary = conv.convert(args)
    except (InnsteerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0
