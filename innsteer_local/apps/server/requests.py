"""Request parsing for the server: bodies, sampling parameters, messages and steering choices,
each checked with an OpenAI-shaped error naming the field."""

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ...choices import GATES
from . import guard

if TYPE_CHECKING:
    from .state import LoadedFlow

ROLES = {"system", "user", "assistant", "developer"}
DEFAULT_MAX_TOKENS = 256
# a documented global cap: trained flows are calibrated so that 1 is their default and useful
# strengths stay within a few units; a float32 overflows past 3.4e38 and huge values only break text
MAX_STRENGTH = 100.0
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 5 deep; Python's parser recurses and would fail at ~1000


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


