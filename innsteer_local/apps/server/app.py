"""The HTTP layer: the FastAPI app over the server's state, behind the guard (access rules), and
running it (serve, or serving() on a thread for tests and benchmarks)."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at run time, and Request is imported inside create_app
import asyncio
import contextlib
import json
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ...choices import GATES
from ...errors import InnsteerError
from ...runtime.flowspec import FlowSpec, format_flow_spec
from ...runtime.prompts import render_chat
from . import guard
from ..model_ids import Preset
from .requests import (RequestError, applied, chat_messages, completion_prompt, parse_body, parse_steering,
                       sampling_params, strength_value)
from .state import Engine, request_stats

# the playground page (static, no build step, nothing fetched from elsewhere)
PLAYGROUND = Path(__file__).resolve().parent.parent / "playground"
PLAYGROUND_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}


def _require_fastapi() -> Any:
    try:
        import fastapi
        import uvicorn  # noqa: F401  (checked here so that `serve` fails before loading a model)
    except ImportError as e:
        raise InnsteerError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                            "pip install 'innsteer-local[serve]'") from None
    return fastapi


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
    """uvicorn's settings for the app behind its guard (guard.py)."""
    import uvicorn

    # timeout_graceful_shutdown: on SIGTERM, open streams get a few seconds, not forever
    return uvicorn.Config(guard.Guard(create_app(engine), policy), host=host, port=port, log_level=log_level,
                          http=guard.protocol_class(policy.header_timeout), timeout_keep_alive=5,
                          timeout_graceful_shutdown=5)


# sequences decoded together by default: on a few CPU cores the aggregate gain flattens out near 8
# (docs/PERFORMANCE.md); a GPU keeps gaining, so it gets more
DEFAULT_PARALLEL = {"cpu": 8, "gpu": 16}


def default_parallel() -> int:
    from ...runtime.rpc import local_gpu

    return DEFAULT_PARALLEL["gpu" if local_gpu() else "cpu"]


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
