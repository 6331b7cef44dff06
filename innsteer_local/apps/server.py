"""An OpenAI-compatible HTTP server whose every request picks its own steering.

    innsteer-local serve --flow honesty=honesty.gguf --port 8080

Endpoints: `/v1/chat/completions`, `/v1/completions` (both stream by SSE), `/v1/models`,
`GET /v1/steering` (the loaded flows), `POST /v1/steering` (load one more from the operator's
`--flows-dir`) and `DELETE /v1/steering/NAME` (unload one loaded so), and a playground page at
`/`. Access rules (API key, Host, Origin, body type and size) are apps/guard.py's. A request's `steering` field, `[{"flow": NAME, "strength": A, "gate": "off"}]`,
applies to that request only; an empty list is unsteered. Without the field, the model id says
the steering (`smollm2-135m+honesty@2`, grammar in model_ids.py), so any OpenAI-compatible chat
app can steer by picking a model.

Concurrency: requests are sequences of one batched engine (runtime/engine.py): up to --parallel
of them are decoded together in every llama_decode (continuous batching: a request joins and leaves
between steps), and each sequence's rows are steered by that request's flows only, in the same
batch as requests with other steering or none. Requests beyond --parallel wait in a bounded queue
(429 with Retry-After when it is full). The event loop never waits on generation; a client that disconnects,
streaming or not, frees its sequence at the next step. A finished request's KV cells stay with its
sequence, and a later request with exactly the same steering starts on the free sequence holding
the longest prefix of its prompt (a chat's history): only the rest is evaluated
(`usage.prompt_tokens_details.cached_tokens`). Cells computed under other steering are never reused. Each response
carries `steering_stats` counted for its own sequence alone.

FastAPI and uvicorn are imported only here (the `[serve]` extra).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at run time, and Request is imported inside create_app
import asyncio
import contextlib
import json
import math
import os
import re
import stat
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..choices import GATES
from ..errors import FlowFormatError, FlowMismatchError, InnsteerError
from . import guard
from ..runtime import registry
from ..runtime.flowspec import FlowSpec, format_flow_spec
from ..runtime.prompts import render_chat
from .model_ids import Preset, UnknownModel, listed_ids, parse_model_id

ROLES = {"system", "user", "assistant", "developer"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_TOKENS = 256
# a documented global cap: trained flows are calibrated so that 1 is their default and useful
# strengths stay within a few units; a float32 overflows past 3.4e38 and huge values only break text
MAX_STRENGTH = 100.0
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 5 deep; Python's parser recurses and would fail at ~1000
API_FLOW_LIMIT = 16  # flows loaded over the API at once (the operator's --flow ones do not count)
# the playground page (static, no build step, nothing fetched from elsewhere)
PLAYGROUND = Path(__file__).parent / "playground"
PLAYGROUND_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}


def _require_fastapi() -> Any:
    try:
        import fastapi
        import uvicorn  # noqa: F401  (checked here so that `serve` fails before loading a model)
    except ImportError as e:
        raise InnsteerError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                            "pip install 'innsteer-local[serve]'") from None
    return fastapi


class RequestError(Exception):
    """A client error, answered as an OpenAI-shaped JSON error with a 4xx status."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return guard.error_body(self.message, self.kind, self.code, self.param)


# ---- request parsing ----------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object; NaN and Infinity literals (which Python's json would accept)
    are refused, so a non-finite number never reaches the native library."""

    def refuse(token: str) -> Any:
        raise RequestError(f"'{token}' is not valid JSON: numbers must be finite")

    if json_depth(raw) > MAX_JSON_DEPTH:
        raise RequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw or b"null", parse_constant=refuse)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__ if body is not None else 'nothing'}")
    return body


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), in O(size)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub(b'""', raw or b"")):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def strength_value(v: Any, param: str) -> float:
    """A strength from a request: a finite number within +-MAX_STRENGTH."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{param} must be a finite number, got {json.dumps(v)[:40]}", param)
    if abs(v) > MAX_STRENGTH:
        raise RequestError(f"{param} must be within -{MAX_STRENGTH:g}..{MAX_STRENGTH:g} (the server's cap), got {v!r}",
                           param)
    return float(v)


def _number(body: dict[str, Any], key: str, lo: float, hi: float, default: Optional[float]) -> Optional[float]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {json.dumps(v)[:40]}", key)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(f"'{key}' must be a finite number in [{lo:g}, {hi:g}], got {v!r}", key)
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int, default: Optional[int]) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{key}' must be an integer, got {json.dumps(v)[:40]}", key)
    if v < lo:
        raise RequestError(f"'{key}' must be at least {lo}, got {v}", key)
    return v


@dataclass(frozen=True)
class SteeringChoice:
    """One entry of a request's `steering` list, validated against the loaded flows."""

    flow: str
    strength: float
    gate: str = "off"


def parse_steering(value: Any, flows: dict[str, "LoadedFlow"]) -> list[SteeringChoice]:
    """`[{"flow": NAME, "strength": A, "gate": MODE}]` -> choices; strength defaults to the flow's."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError("'steering' must be a list of {\"flow\": NAME, \"strength\": NUMBER}", "steering")
    out: list[SteeringChoice] = []
    for i, entry in enumerate(value):
        param = f"steering[{i}]"
        if not isinstance(entry, dict):
            raise RequestError(f"{param} must be an object with 'flow' and 'strength'", param)
        unknown = set(entry) - {"flow", "strength", "gate"}
        if unknown:
            raise RequestError(f"{param} has unknown field(s) {', '.join(sorted(unknown))}; "
                               "allowed: flow, strength, gate", param)
        name = entry.get("flow")
        if not isinstance(name, str):
            raise RequestError(f"{param}.flow must be the name of a loaded flow (a string)", f"{param}.flow")
        if name not in flows:
            raise RequestError(f"unknown flow '{name[:80]}'; loaded flows: {', '.join(sorted(flows)) or 'none'} "
                               "(GET /v1/steering lists them, POST /v1/steering loads one)", f"{param}.flow")
        if any(c.flow == name for c in out):
            raise RequestError(f"flow '{name}' appears twice in 'steering'", f"{param}.flow")
        strength = entry.get("strength")
        strength = flows[name].strength if strength is None else strength_value(strength, f"{param}.strength")
        gate = entry.get("gate", flows[name].gate)
        if gate not in GATES:
            raise RequestError(f"{param}.gate must be one of {', '.join(repr(g) for g in GATES)}, got "
                               f"{json.dumps(gate)[:40]}", f"{param}.gate")
        if gate != "off" and not flows[name].has_gate:
            raise RequestError(f"flow '{name}' carries no gate parameters, so gate '{gate}' is not available",
                               f"{param}.gate")
        out.append(SteeringChoice(flow=name, strength=float(strength), gate=gate))
    return out


def applied(steering: list[SteeringChoice]) -> list[dict[str, Any]]:
    """Choices as responses and `/v1/models` show them."""
    return [{"flow": c.flow, "strength": c.strength, "gate": c.gate} for c in steering]


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= 16:
        return list(v)
    raise RequestError("'stop' must be a string or a list of at most 16 strings", "stop")


def sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    """The generation keywords shared by both endpoints, with OpenAI's defaults."""
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise RequestError("only n = 1 is supported", "n")
    max_tokens = _integer(body, "max_completion_tokens", 1, None)
    max_tokens = _integer(body, "max_tokens", 1, max_tokens or DEFAULT_MAX_TOKENS)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    seed = _integer(body, "seed", -(2 ** 63), None)
    ignore_eos = body.get("ignore_eos", False)  # llama-server's extension: benchmarks want exact lengths
    if not isinstance(ignore_eos, bool):
        raise RequestError("'ignore_eos' must be true or false", "ignore_eos")
    return {
        "ignore_eos": ignore_eos,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "repeat_penalty": _number(body, "repeat_penalty", 0.0, 10.0, 1.0),
        # llama-cpp-python's defaults, which the server used before it batched requests
        "top_k": _integer(body, "top_k", 0, 40),
        "min_p": _number(body, "min_p", 0.0, 1.0, 0.05),
        "seed": None if seed is None else seed & 0xFFFFFFFF,
        "stop": _stop(body),
        "stream": stream,
    }


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{param} must be an object", param)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{param}.role must be one of {', '.join(sorted(ROLES))}, got {json.dumps(role)[:40]}",
                               f"{param}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can be served by a text model
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(f"{param}.content parts must be {{\"type\": \"text\", \"text\": ...}}",
                                       f"{param}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"{param}.content must be a string", f"{param}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def completion_prompt(body: dict[str, Any]) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise RequestError("'prompt' must be a string (or a list holding one string)", "prompt")
    return p


# ---- the engine: one model, one lock --------------------------------------------------------


@dataclass
class LoadedFlow:
    """A flow attached once at load; each request's sequence gets the flows it names."""

    name: str
    flow: Any  # runtime.engine.EngineFlow
    strength: float  # used when a request names the flow without a strength
    gate: str = "off"  # likewise for the gate
    file: str = ""  # what clients see of its file: a name, never a server path
    by_api: bool = False  # loaded by POST /v1/steering (and so unloadable by DELETE)

    @property
    def has_gate(self) -> bool:
        return self.flow.info.has_gate

    def describe(self) -> dict[str, Any]:
        f = self.flow.info
        return {
            "name": self.name,
            "object": "steering.flow",
            "file": self.file,
            "loaded_by": "api" if self.by_api else "operator",
            "layers": f.layers,
            "default_strength": self.strength,
            "method": f.method,
            "behavior": f.behavior,
            "flow_name": f.name,
            "gates": list(GATES) if self.has_gate else ["off"],
            "default_gate": self.gate,
            "model": {"name": f.model.name, "architecture": f.model.architecture, "n_embd": f.model.n_embd,
                      "n_layer": f.model.n_layer},
            "sites": [{"layer": s.layer, "ops": list(s.ops), "latent_dim": s.latent_dim}
                      for s in f.sites],
        }


class Engine:
    """The server's state: loaded flows and presets over one batched generation engine."""

    def __init__(self, llm: Any, model_id: str, parallel: int = 4, queue: Optional[int] = None,
                 n_ctx: Optional[int] = None, flows_dir: Optional[str] = None, keep_prefix: bool = True):
        from ..runtime.engine import Engine as BatchEngine

        if getattr(llm, "flows", None):  # they would steer every request, whatever it asks for
            raise ValueError("Engine needs a SteeredLlama without attached flows; load flows with load_flow")
        self.llm = llm
        self.model_id = model_id
        self.flows: dict[str, LoadedFlow] = {}
        self.presets: dict[str, Preset] = {}
        self.created = int(time.time())
        # POST /v1/steering reads only from here (None: loading over the API is off)
        self.flows_dir = Path(flows_dir).resolve(strict=True) if flows_dir is not None else None
        # one KV stream per request: each attends over its own cells exactly as it would alone, so
        # a request's reply rarely depends on what else shares the batch (and on CPU it is faster)
        self.batch = BatchEngine(llm, n_parallel=parallel, n_ctx=n_ctx, keep_prefix=keep_prefix)
        self.queue_limit = 4 * parallel if queue is None else queue
        self._lock = threading.Lock()  # flows, presets and names being loaded; never held while loading
        self._loading: set[str] = set()
        self.batch.start()

    def close(self) -> None:
        self.batch.close()

    def load_flow(self, name: str, path: str, strength: Optional[float] = None,
                  gate: str = "off") -> tuple[LoadedFlow, list[str]]:
        """Attaches a flow the operator names (a path or a shipped flow name) that requests can
        name. Returns it and any warnings."""
        try:
            resolved = registry.resolve_flow(path, getattr(self.llm, "model_key", None))
        except FlowFormatError as e:
            raise RequestError(str(e), "path") from None
        return self._attach(name, resolved, Path(resolved).name, strength, gate, by_api=False)

    def load_api_flow(self, name: str, file: str, strength: Optional[float] = None,
                      gate: str = "off") -> tuple[LoadedFlow, list[str]]:
        """POST /v1/steering: a file name inside --flows-dir, or a shipped flow name."""
        if self.flows_dir is None:
            raise RequestError("loading flows over the API is off; the operator can start serve with "
                               "--flows-dir DIR to allow loading flow files from DIR", "path", status=403,
                               code="flow_loading_disabled")
        if sum(lf.by_api for lf in self.flows.values()) >= API_FLOW_LIMIT:
            raise RequestError(f"{API_FLOW_LIMIT} flows are loaded over the API already (the cap); unload one with "
                               "DELETE /v1/steering/NAME", "name", status=409, code="too_many_flows")
        path, fd = self._open_in_flows_dir(file)
        try:
            # the loader reads the descriptor's file: nothing can swap it between the checks and the read
            return self._attach(name, f"/dev/fd/{fd}", file, strength, gate, by_api=True)
        finally:
            os.close(fd)

    def _open_in_flows_dir(self, file: Any) -> tuple[Path, int]:
        """The flow file `file` names in the flows folder (or a shipped flow), opened read-only
        and non-blocking, a regular file. Whatever the reason a name is refused (absolute, '..',
        a symlink out of the folder, missing, unreadable), the answer is the same words: a client
        learns nothing about the server's files."""
        hidden = RequestError("no flow file of that name in the server's flows folder (give a file name inside "
                              "it, or a shipped flow name; GET /v1/steering lists the loaded ones)", "path",
                              status=404, kind="not_found_error", code="flow_not_found")
        if not isinstance(file, str) or not file or len(file) > 255 or "\0" in file:
            raise hidden
        rel = Path(file)
        candidates: list[tuple[Path, Optional[Path]]] = []  # (path, the folder it must stay in)
        if not rel.is_absolute() and ".." not in rel.parts:
            candidates.append((self.flows_dir / rel, self.flows_dir))
        shipped = registry.shipped_flows(getattr(self.llm, "model_key", None))
        stem = file[:-5] if file.endswith(".gguf") else file
        if stem in shipped and "/" not in file:
            candidates.append((Path(shipped[stem]), None))  # the package's own files
        for cand, root in candidates:
            try:
                real = Path(os.path.realpath(cand))  # symlinks resolved, then checked
                if root is not None and not real.is_relative_to(root):
                    continue
                fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except (OSError, ValueError):
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise RequestError("that flow file is not a regular file (a FIFO, device or folder)", "path",
                                   code="not_a_regular_file")
            return real, fd
        raise hidden

    def _attach(self, name: Any, path: str, file: str, strength: Optional[float], gate: str,
                by_api: bool) -> tuple[LoadedFlow, list[str]]:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise RequestError("flow name must be 1-64 characters of letters, digits, '.', '_', '-' "
                               f"starting with a letter or digit, got {json.dumps(name)[:80]}", "name")
        with self._lock:
            if name in self.flows or name in self._loading:
                raise RequestError(f"a flow named '{name}' is already loaded", "name", status=409)
            self._loading.add(name)
        try:
            try:  # loading and validating a file happens outside every lock
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    flow = self.batch.add_flow(path)
            except (FlowFormatError, FlowMismatchError) as e:
                raise RequestError(str(e).replace(path, file), "path") from None
            except InnsteerError as e:  # e.g. every steering slot of the engine in use
                raise RequestError(str(e).replace(path, file), "path", status=409) from None
            if gate != "off" and not flow.info.has_gate:
                self.batch.remove_flow(flow)
                raise RequestError(f"flow '{name}' carries no gate parameters, so gate '{gate}' is not available",
                                   "gate")
            value = flow.info.default_strength if strength is None else strength
            # 7 significant digits: the float32 default reads back as e.g. 0.23000000417232513
            loaded = LoadedFlow(name=name, flow=flow, strength=float(f"{value:.7g}"), gate=gate, file=file,
                                by_api=by_api)
            with self._lock:
                self.flows[name] = loaded
            return loaded, [str(w.message).replace(path, file) for w in caught]
        finally:
            with self._lock:
                self._loading.discard(name)

    def unload_flow(self, name: str) -> None:
        """DELETE /v1/steering/NAME: only flows loaded over the API, and only when no unfinished
        request uses them."""
        with self._lock:
            lf = self.flows.get(name)
            if lf is None:
                raise RequestError(f"no loaded flow named '{name[:64]}'", "name", status=404, kind="not_found_error",
                                   code="flow_not_found")
            if not lf.by_api:
                raise RequestError(f"flow '{name}' was loaded by the operator (serve --flow); only flows loaded over "
                                   "the API can be unloaded", "name", status=403, code="flow_not_unloadable")
            try:
                self.batch.remove_flow(lf.flow)
            except InnsteerError:
                raise RequestError(f"flow '{name}' steers unfinished requests; retry when they are done", "name",
                                   status=409, code="flow_in_use") from None
            del self.flows[name]

    def add_preset(self, preset: Preset) -> None:
        """Serves a steering setting as the model id BASE+NAME."""
        if preset.flow not in self.flows:
            raise RequestError(f"preset '{preset.name}' uses flow '{preset.flow}', which is not loaded "
                               f"(loaded: {', '.join(sorted(self.flows)) or 'none'})", "preset")
        if preset.name in self.flows or preset.name in self.presets:
            raise RequestError(f"preset name '{preset.name}' is already a flow or preset name", "preset")
        parse_steering([self._entry(preset.flow, preset.strength, preset.gate)], self.flows)  # gate available?
        self.presets[preset.name] = preset

    @staticmethod
    def _entry(flow: str, strength: Optional[float], gate: Optional[str]) -> dict[str, Any]:
        entry: dict[str, Any] = {"flow": flow}
        if strength is not None:
            entry["strength"] = strength
        if gate is not None:
            entry["gate"] = gate
        return entry

    def model_steering(self, model: Any) -> list[SteeringChoice]:
        """The steering a request's model id asks for (None or the base id: unsteered)."""
        if model is None:
            return []
        if not isinstance(model, str):
            raise RequestError(f"'model' must be a string, got {json.dumps(model)[:40]}", "model")
        try:
            terms = parse_model_id(model, self.model_id, set(self.flows), self.presets)
        except UnknownModel as e:
            raise RequestError(str(e), "model", status=404, code="model_not_found") from None
        return parse_steering([self._entry(t.flow, t.strength, t.gate) for t in terms], self.flows)

    def model_entry(self, model_id: str) -> dict[str, Any]:
        """One `/v1/models` object with the steering its id applies (404 for an unknown id)."""
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "innsteer-local",
                "steering": applied(self.model_steering(model_id))}

    def models(self) -> list[dict[str, Any]]:
        """The `/v1/models` entries: the base model, one per loaded flow and one per preset."""
        return [self.model_entry(m) for m in listed_ids(self.model_id, sorted(self.flows), self.presets)]

    def job(self, steering: list[SteeringChoice], tokens: list[int], params: dict[str, Any], chat: bool,
            on_text: Optional[Callable[[Any, str], None]] = None) -> Any:
        """A generation job for the batched engine with exactly this request's steering."""
        from ..runtime.engine import Job, Sampling, Steer

        sampling = Sampling(max_tokens=params["max_tokens"], temperature=params["temperature"], top_p=params["top_p"],
                            top_k=params["top_k"], min_p=params["min_p"], repeat_penalty=params["repeat_penalty"],
                            presence_penalty=params["presence_penalty"], frequency_penalty=params["frequency_penalty"],
                            seed=params["seed"], stop=tuple(params["stop"]), ignore_eos=params["ignore_eos"])
        steer = [Steer(self.flows[c.flow].flow, c.strength, c.gate) for c in steering]
        return Job(tokens, sampling, steer, on_text=on_text, chat=chat)

    def submit(self, job: Any) -> None:
        """Queues a job, or answers 429 when the queue is full (the client may retry)."""
        load = self.batch.load
        if load["waiting"] >= self.queue_limit:
            raise RequestError(f"the server is busy: {load['running']} requests are running and {load['waiting']} "
                               f"waiting (queue limit {self.queue_limit}); retry later", status=429,
                               kind="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        room = self.batch.n_ctx_seq
        if len(job.prompt_tokens) >= room:
            raise RequestError(f"the prompt is {len(job.prompt_tokens)} tokens; a request's context window holds "
                               f"{room} (prompt and reply)", "messages", code="context_length_exceeded")
        try:
            self.batch.submit(job)
        except ValueError as e:  # e.g. prompt and max_tokens together longer than a sequence's context
            raise RequestError(str(e), code="context_length_exceeded" if "context" in str(e) else None) from None


def request_stats(job: Any) -> dict[str, Any]:
    """What the runtime counted for this request's sequence alone: residual rows the flows edited
    (one per evaluated token and flow site), rows refused as non-finite, tokens evaluated."""
    stats = dict(job.stats)
    tokens = stats.get("tokens_evaluated", 0)
    return {"rows_steered": stats.get("rows_steered", 0),
            "rows_rejected_nonfinite": stats.get("rows_rejected_nonfinite", 0), "tokens_evaluated": tokens,
            "rows_steered_per_token": round(stats.get("rows_steered", 0) / tokens, 3) if tokens else None}


# ---- the HTTP layer -------------------------------------------------------------------------


def _error_response(e: RequestError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _generation_error(e: Exception) -> RequestError:
    # llama-cpp-python raises ValueError for requests that cannot fit (prompt longer than n_ctx)
    if isinstance(e, (ValueError, InnsteerError)):
        return RequestError(str(e))
    return RequestError(f"generation failed: {type(e).__name__}: {e}", status=500, kind="server_error")


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _until_done_or_gone(request: Any, events: "asyncio.Queue") -> None:
    """Waits for the job's end, or returns early when the client disconnects."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done = asyncio.ensure_future(_drain_until_done(events))
    left = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({done, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done, left):
            task.cancel()


async def _drain_until_done(events: "asyncio.Queue") -> None:
    while (await events.get())[0] != "done":
        pass


def create_app(engine: Engine) -> Any:
    """The FastAPI application over an Engine."""
    fastapi = _require_fastapi()
    from fastapi import Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = fastapi.FastAPI(title="innsteer-local", version="0.1.0")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> Any:
        return _error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> Any:  # never a plain-text 500
        return JSONResponse(guard.error_body(f"internal server error: {type(e).__name__}", "server_error"),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Any:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {e.detail}", "type": kind,
                                       "param": None, "code": None}}, status_code=e.status_code)

    @app.get("/v1/models")
    async def list_models() -> Any:
        return {"object": "list", "data": engine.models()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        return engine.model_entry(model_id)

    @app.get("/", include_in_schema=False)
    def playground() -> Any:
        return FileResponse(PLAYGROUND / "index.html", media_type="text/html")

    @app.get("/playground/{name}", include_in_schema=False)
    def playground_file(name: str) -> Any:
        kind = PLAYGROUND_FILES.get(name)
        if kind is None:  # a fixed list: nothing else on disk is reachable
            raise RequestError(f"no playground file '{name[:64]}'", status=404, kind="not_found_error")
        return FileResponse(PLAYGROUND / name, media_type=kind)

    @app.get("/v1/steering")
    async def list_flows() -> Any:
        return {"object": "list", "data": [lf.describe() for lf in list(engine.flows.values())]}

    @app.post("/v1/steering")
    async def load_flow(request: Request) -> Any:
        body = parse_body(await request.body())
        unknown = set(body) - {"name", "path", "strength", "gate"}
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: name, path, strength, gate")
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise RequestError("'path' must be the name of a flow file in the server's flows folder (or a shipped "
                               "flow name)", "path")
        strength = body.get("strength")
        strength = None if strength is None else strength_value(strength, "strength")
        gate = body.get("gate", "off")
        if gate not in GATES:
            raise RequestError(f"'gate' must be one of {', '.join(GATES)}, got {json.dumps(gate)[:40]}", "gate")
        loaded, warned = await run_in_threadpool(engine.load_api_flow, body.get("name"), path, strength, gate)
        return JSONResponse({**loaded.describe(), "warnings": warned}, status_code=201)

    @app.delete("/v1/steering/{name}")
    async def unload_flow(name: str) -> Any:
        await run_in_threadpool(engine.unload_flow, name)
        return {"name": name, "object": "steering.flow", "deleted": True}

    async def generate(request: Request, chat: bool) -> Any:
        body = parse_body(await request.body())
        params = sampling_params(body)
        model_steering = engine.model_steering(body.get("model"))  # an unknown id is a 404 either way
        explicit = body.get("steering")
        steering = model_steering if explicit is None else parse_steering(explicit, engine.flows)
        model_id = body.get("model") or engine.model_id
        stream = params.pop("stream")
        text = render_chat(engine.llm, chat_messages(body)) if chat else completion_prompt(body)
        tokens = await run_in_threadpool(engine.batch.tokenize, text, True)
        shown = applied(steering)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(job: Any, piece: str) -> None:  # the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, ("text", piece))

        job = engine.job(steering, tokens, params, chat, on_text=on_text if stream else None)
        job.on_done(lambda j: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))
        engine.submit(job)

        def envelope(choice: dict[str, Any], chunk: bool) -> dict[str, Any]:
            kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
            return {"id": ident, "object": kind, "created": created, "model": model_id, "choices": [choice],
                    "steering": shown}

        def usage() -> dict[str, Any]:
            return {"prompt_tokens": len(tokens), "completion_tokens": len(job.tokens),
                    "total_tokens": len(tokens) + len(job.tokens),
                    "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

        def failure() -> Optional[RequestError]:
            if job.finish_reason == "error":
                return _generation_error(job.error) if not isinstance(job.error, RequestError) else job.error
            return None

        if not stream:
            try:
                await _until_done_or_gone(request, events)
            finally:
                if not job.done:
                    job.cancel()  # the client left: free the sequence at the next step
            err = failure()
            if err is not None:
                raise err
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": job.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": job.text}
            else:
                choice["text"] = job.text
            return {**envelope(choice, False), "usage": usage(), "steering_stats": request_stats(job)}

        async def sse() -> Any:
            try:
                if chat:
                    yield _sse(envelope({"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                         "finish_reason": None}, True))
                while True:
                    kind, piece = await events.get()
                    if kind == "text":
                        delta = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                        yield _sse(envelope({**delta, "logprobs": None, "finish_reason": None}, True))
                        continue
                    err = failure()
                    if err is not None:
                        yield _sse(err.body())
                        break
                    last = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
                    yield _sse({**envelope({**last, "logprobs": None, "finish_reason": job.finish_reason}, True),
                                "usage": usage(), "steering_stats": request_stats(job)})
                    yield "data: [DONE]\n\n"
                    break
            finally:
                if not job.done:
                    job.cancel()  # the client left mid-stream

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    return app


def model_id_for(llm: Any) -> str:
    return getattr(llm, "model_key", None) or Path(llm.model_path).stem


@contextlib.contextmanager
def serving(engine: Engine, timeout: float = 30, policy: Optional[guard.Policy] = None) -> Iterator[str]:
    """The app on a free loopback port, on a thread of this process (benchmarks and tests); yields
    its base URL and stops the server afterwards (the engine stays the caller's)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(engine, policy or guard.Policy(), "127.0.0.1", port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="innsteer-serving")
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise InnsteerError(f"the server did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def server_config(engine: Engine, policy: guard.Policy, host: str, port: int, log_level: str) -> Any:
    """uvicorn's settings for the app behind its guard (apps/guard.py)."""
    import uvicorn

    return uvicorn.Config(guard.Guard(create_app(engine), policy), host=host, port=port, log_level=log_level,
                          http=guard.protocol_class(policy.header_timeout), timeout_keep_alive=5)


def default_parallel() -> int:
    """Sequences decoded together by default: on a few CPU cores the aggregate gain flattens out
    near 8 (docs/PERFORMANCE.md); a GPU build keeps gaining, so it gets more."""
    import llama_cpp

    gpu = bool(getattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)())
    return 16 if gpu else 8


def serve(llm: Any, flows: list[FlowSpec], port: int, policy: guard.Policy, log_level: str = "info",
          presets: Sequence[Preset] = (), parallel: Optional[int] = None, queue: Optional[int] = None,
          flows_dir: Optional[str] = None) -> None:
    """Loads the flows and presets, then serves until interrupted."""
    _require_fastapi()
    import uvicorn

    host = policy.host
    engine = Engine(llm, model_id_for(llm), parallel=parallel or default_parallel(), queue=queue, flows_dir=flows_dir)
    for spec in flows:
        try:
            _, warned = engine.load_flow(spec.name, spec.path, spec.strength, spec.gate or "off")
        except RequestError as e:
            raise InnsteerError(f"--flow {format_flow_spec(spec)}: {e.message}") from None
        for w in warned:
            warnings.warn(w, UserWarning, stacklevel=1)
    for preset in presets:
        try:
            engine.add_preset(preset)
        except RequestError as e:
            raise InnsteerError(f"--preset {preset.name}: {e.message}") from None
    shown = host if ":" not in host else f"[{host}]"
    print(f"playground: http://{shown}:{port}/   {engine.batch.n_parallel} sequences at once, "
          f"{engine.batch.n_ctx_seq} tokens each   models: " + ", ".join(m["id"] for m in engine.models()), flush=True)
    try:
        uvicorn.Server(server_config(engine, policy, host, port, log_level)).run()
    finally:
        engine.close()
