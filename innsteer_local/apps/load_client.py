"""A small load generator for OpenAI-compatible chat servers (stdlib only).

The same client drives our server and llama.cpp's `llama-server`, so any difference in measured
throughput comes from the servers, not from how they were called. Requests are non-streaming:
one response per request carries its `usage` (and, from our server, its `steering_stats`).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional
from ..errors import InvalidArgument


@dataclass
class LoadResult:
    """One batch of requests: totals, per-request latencies and whatever failed."""

    n_requests: int
    concurrency: int
    wall_s: float
    completion_tokens: int
    prompt_tokens: int
    tokens_per_s: float  # aggregate: completion tokens of the successful requests / wall_s
    latencies_s: list[float] = field(default_factory=list)  # in request order; NaN where it failed
    steering_stats: list[dict[str, Any]] = field(default_factory=list)  # only from servers that add it
    errors: list[str] = field(default_factory=list)
    responses: list[Optional[dict[str, Any]]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> int:
        return self.n_requests - len(self.errors)

    def summary(self) -> dict[str, Any]:
        """The numbers without the raw responses (what a JSON report wants)."""
        done = [x for x in self.latencies_s if x == x]
        return {"n_requests": self.n_requests, "concurrency": self.concurrency, "wall_s": self.wall_s,
                "completion_tokens": self.completion_tokens, "prompt_tokens": self.prompt_tokens,
                "tokens_per_s": self.tokens_per_s, "latencies_s": self.latencies_s,
                "mean_latency_s": sum(done) / len(done) if done else None,
                "steering_stats": self.steering_stats, "errors": self.errors}


def _split(base_url: str) -> tuple[str, int, str]:
    u = urllib.parse.urlsplit(base_url)
    if u.scheme != "http":
        # a benchmark against localhost has no use for TLS, and http.client's HTTPS needs certificates
        raise InvalidArgument(f"only http:// base URLs are supported, got {base_url!r}")
    return u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")


def _request(host: str, port: int, method: str, path: str, body: Optional[bytes], headers: dict[str, str],
             timeout: float) -> tuple[int, bytes]:
    # a fresh connection per request: keep-alive sharing across threads would need a pool, and the
    # connect cost on localhost is noise next to a generation
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _headers(api_key: Optional[str]) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def drive(base_url: str, bodies: list[dict], concurrency: int, api_key: str | None = None,
          timeout: float = 600) -> LoadResult:
    """POSTs every body to `{base_url}/v1/chat/completions`, at most `concurrency` in flight.

    concurrency=1 sends them strictly one after another. The wall time covers the whole batch, so
    tokens_per_s is the aggregate throughput a server sustains under that load."""
    if concurrency < 1:
        raise InvalidArgument("concurrency must be >= 1")
    host, port, prefix = _split(base_url)
    path = f"{prefix}/v1/chat/completions"
    headers = _headers(api_key)
    payloads = [json.dumps(b).encode() for b in bodies]  # encoded up front, outside the timed section
    n = len(payloads)
    latencies = [float("nan")] * n
    responses: list[Optional[dict[str, Any]]] = [None] * n
    errors: list[Optional[str]] = [None] * n
    next_i = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal next_i
        while True:
            with lock:
                i = next_i
                next_i += 1
            if i >= n:
                return
            t0 = time.perf_counter()
            try:
                status, raw = _request(host, port, "POST", path, payloads[i], headers, timeout)
                dt = time.perf_counter() - t0
                if status != 200:
                    errors[i] = f"request {i}: HTTP {status}: {raw[:300].decode(errors='replace')}"
                    continue
                responses[i] = json.loads(raw)
                latencies[i] = dt
            except Exception as e:  # a failed request is a result to report, not a reason to stop the batch
                errors[i] = f"request {i}: {type(e).__name__}: {e}"

    # a pool of `concurrency` workers pulling from one counter keeps exactly that many in flight
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, max(n, 1)))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    completion = prompt = 0
    stats: list[dict[str, Any]] = []
    for i, r in enumerate(responses):
        if r is None:
            continue
        usage = r.get("usage") or {}
        if "completion_tokens" not in usage:
            errors[i] = f"request {i}: response has no usage.completion_tokens"
            latencies[i] = float("nan")
            continue
        completion += int(usage.get("completion_tokens") or 0)
        prompt += int(usage.get("prompt_tokens") or 0)
        if isinstance(r.get("steering_stats"), dict):
            stats.append(r["steering_stats"])
    return LoadResult(n_requests=n, concurrency=concurrency, wall_s=wall, completion_tokens=completion,
                      prompt_tokens=prompt, tokens_per_s=completion / wall if wall > 0 else 0.0,
                      latencies_s=latencies, steering_stats=stats, errors=[e for e in errors if e],
                      responses=responses)


def chat_bodies(prompts: list[str], max_tokens: int, model: str, steering: list | None = None, seed: int = 0,
                extra: dict | None = None) -> list[dict]:
    """One OpenAI chat body per prompt, greedy (temperature 0) so reruns compare like with like.

    `steering` is a list with one entry per prompt (each None or a request `steering` list) and is
    only sent where given: llama-server would ignore it, our server would validate it. `extra` is
    merged into every body for server-specific keys, e.g. llama-server's `{"ignore_eos": True}`
    to make each request generate exactly max_tokens tokens."""
    if steering is not None and len(steering) != len(prompts):
        raise InvalidArgument(f"steering has {len(steering)} entries for {len(prompts)} prompts")
    bodies = []
    for i, prompt in enumerate(prompts):
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": max_tokens, "temperature": 0, "seed": seed, "stream": False}
        if steering is not None and steering[i] is not None:
            body["steering"] = steering[i]
        if extra:
            body.update(extra)
        bodies.append(body)
    return bodies


def wait_ready(base_url: str, timeout: float = 120, api_key: str | None = None) -> None:
    """Polls GET /health, then /v1/models, until one answers 200; raises TimeoutError otherwise.

    llama-server answers /health with 503 while it loads the model, so a 200 means it can serve."""
    host, port, prefix = _split(base_url)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        for path in (f"{prefix}/health", f"{prefix}/v1/models"):
            try:
                status, raw = _request(host, port, "GET", path, None, _headers(api_key), timeout=5)
                if status == 200:
                    return
                last = f"GET {path}: HTTP {status}"
            except OSError as e:  # not listening yet
                last = f"GET {path}: {e}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{base_url} not ready after {timeout:.0f}s ({last})")
        time.sleep(0.25)
