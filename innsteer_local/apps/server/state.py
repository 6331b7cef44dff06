"""The server's state: the loaded flows and presets over one batched generation engine."""

import json
import os
import re
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ...choices import GATES
from ...errors import ContextLengthError, FlowFormatError, FlowMismatchError, InnsteerError, InvalidArgument
from ...runtime import registry
from ..model_ids import Preset, UnknownModel, listed_ids, parse_model_id
from .requests import RequestError, SteeringChoice, applied, parse_steering

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
API_FLOW_LIMIT = 16  # flows loaded over the API at once (the operator's --flow ones do not count)


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


# requests that may wait for a free sequence, per sequence, unless serve --queue says otherwise
QUEUE_PER_SEQUENCE = 4


class Engine:
    """The server's state: loaded flows and presets over one batched generation engine."""

    def __init__(self, llm: Any, model_id: str, parallel: int = 4, queue: Optional[int] = None,
                 n_ctx: Optional[int] = None, flows_dir: Optional[str] = None, keep_prefix: bool = True):
        from ...runtime.engine import Engine as BatchEngine

        if getattr(llm, "flows", None):  # they would steer every request, whatever it asks for
            raise InvalidArgument("Engine needs a SteeredLlama without attached flows; load flows with load_flow")
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
        self.queue_limit = QUEUE_PER_SEQUENCE * parallel if queue is None else queue
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
        fd = self._open_in_flows_dir(file)
        try:
            # the loader reads the descriptor's file: nothing can swap it between the checks and the read
            return self._attach(name, f"/dev/fd/{fd}", file, strength, gate, by_api=True)
        finally:
            os.close(fd)

    def _open_in_flows_dir(self, file: Any) -> int:
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
            return fd
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
        from ...runtime.engine import Job, Sampling, Steer

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
        try:
            self.batch.submit(job)
        except ContextLengthError as e:
            raise RequestError(str(e), "messages", code="context_length_exceeded") from None
        except ValueError as e:
            raise RequestError(str(e)) from None


def request_stats(job: Any) -> dict[str, Any]:
    """What the runtime counted for this request's sequence alone: residual rows the flows edited
    (one per evaluated token and flow site), rows refused as non-finite, tokens evaluated."""
    stats = dict(job.stats)
    tokens = stats.get("tokens_evaluated", 0)
    return {"rows_steered": stats.get("rows_steered", 0),
            "rows_rejected_nonfinite": stats.get("rows_rejected_nonfinite", 0), "tokens_evaluated": tokens,
            "rows_steered_per_token": round(stats.get("rows_steered", 0) / tokens, 3) if tokens else None}


