"""A soak test for `innsteer-local serve` (stdlib only): several clients at once for a while, each
request one of: a chat with random steering (or none), streamed or not; the same, abandoned
mid-reply (the socket closed); a malformed or refused body. It counts what a server one leaves
running must never do: a 5xx answer, steering that reaches a request that did not ask for it (the
server's own per-request `steering_stats`), memory that keeps growing.

    python scripts/soak_server.py --minutes 10          # starts a server and reports
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROMPTS = ["Tell me about the sea.", "What is a good breakfast?", "Describe your ideal weekend.",
           "How do plants grow?", "Write one sentence about trains."]
MALFORMED = [
    (b'{"messages": [{"role": "user", "content": "hi"}', "application/json"),  # truncated
    (b'{"messages": "hi"}', "application/json"),
    (b"[" * 5000 + b"]" * 5000, "application/json"),  # deep nesting
    (b'{"messages": [{"role": "user", "content": "hi"}], "steering": [{"flow": "x", "strength": 1e39}]}',
     "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain"),  # a browser's simple request
    (b"\xff\xfe not utf-8", "application/json"),
]


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    abandoned: int = 0
    server_errors: list[str] = field(default_factory=list)  # any 5xx
    leaks: list[str] = field(default_factory=list)  # steering counted where none was asked for, or none where it was
    rss_start_kb: Optional[int] = None
    rss_end_kb: Optional[int] = None

    @property
    def rss_growth(self) -> Optional[float]:
        if not self.rss_start_kb or not self.rss_end_kb:
            return None
        return self.rss_end_kb / self.rss_start_kb - 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in vars(self).items()}, "rss_growth": self.rss_growth}


def rss_kb(pid: int) -> Optional[int]:
    """Resident memory of a process (Linux /proc), kB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class _Client:
    def __init__(self, base_url: str, api_key: Optional[str], flows: list[str], rng: random.Random,
                 report: SoakReport, lock: threading.Lock):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.flows, self.rng, self.report, self.lock = flows, rng, report, lock

    def _count(self, status: int, note: str = "") -> None:
        with self.lock:
            self.report.requests += 1
            key = str(status)
            self.report.by_status[key] = self.report.by_status.get(key, 0) + 1
            if status >= 500:
                self.report.server_errors.append(f"{status} {note[:200]}")

    def _body(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        steering = []
        if self.flows and self.rng.random() < 0.6:
            names = self.rng.sample(self.flows, self.rng.randint(1, len(self.flows)))
            steering = [{"flow": n, "strength": round(self.rng.choice([-1, 1]) * self.rng.uniform(0.3, 3), 2)}
                        for n in names]
        body = {"messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}], "steering": steering,
                "max_tokens": self.rng.randint(4, 24), "temperature": self.rng.choice([0.0, 0.8]),
                "seed": self.rng.randint(0, 1000), "stream": self.rng.random() < 0.4}
        return body, steering

    def one(self) -> None:
        r = self.rng.random()
        if r < 0.15:
            return self.malformed()
        if r < 0.30:
            return self.abandon()
        body, steering = self._body()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                         {"Content-Type": "application/json", **self.auth})
            resp = conn.getresponse()
            data = resp.read().decode("utf-8", "replace")
            self._count(resp.status, data)
            if resp.status != 200:
                return
            stats = None
            if body["stream"]:
                for line in data.splitlines():
                    if line.startswith("data: {") and '"steering_stats"' in line:
                        stats = json.loads(line[6:])["steering_stats"]
            else:
                stats = json.loads(data).get("steering_stats")
            rows = (stats or {}).get("rows_steered")
            asked = bool(steering)
            if rows is None or (rows > 0) != asked:
                with self.lock:
                    self.report.leaks.append(f"steering {steering}: rows_steered {rows}")
        finally:
            conn.close()

    def abandon(self) -> None:
        """A long streamed reply, the socket closed after the first bytes."""
        body, _ = self._body()
        body.update(stream=True, max_tokens=400, ignore_eos=True)
        raw = json.dumps(body).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in self.auth.items()) + "\r\n").encode()
        with socket.create_connection((self.host, self.port), timeout=300) as s:
            s.sendall(head + raw)
            s.recv(256)
            time.sleep(self.rng.uniform(0.0, 0.5))
        with self.lock:
            self.report.abandoned += 1

    def malformed(self) -> None:
        raw, kind = self.rng.choice(MALFORMED)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", raw, {"Content-Type": kind, **self.auth})
            resp = conn.getresponse()
            data = resp.read().decode("utf-8", "replace")
            self._count(resp.status, data)
            if resp.status < 400 or "error" not in json.loads(data):
                with self.lock:
                    self.report.server_errors.append(f"malformed body answered {resp.status}: {data[:200]}")
        finally:
            conn.close()


def soak(base_url: str, seconds: float, clients: int = 8, api_key: Optional[str] = None,
         flows: Optional[list[str]] = None, server_pid: Optional[int] = None, seed: int = 0,
         progress: Optional[Any] = None) -> SoakReport:
    """Runs the clients for `seconds`; RSS is read before (after a warm-up round) and after."""
    report, lock = SoakReport(), threading.Lock()
    stop = time.monotonic() + seconds
    warm = _Client(base_url, api_key, flows or [], random.Random(seed), SoakReport(), lock)
    for _ in range(2 * clients):  # the first requests allocate the engine's buffers: measure after them
        warm.one()
    report.rss_start_kb = rss_kb(server_pid) if server_pid else None
    t0 = time.monotonic()

    def run(i: int) -> None:
        c = _Client(base_url, api_key, flows or [], random.Random(seed * 1000 + i), report, lock)
        while time.monotonic() < stop:
            try:
                c.one()
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    report.server_errors.append(f"connection failed: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(5)
        if progress is not None:
            progress(report, time.monotonic() - t0)
    time.sleep(1.0)  # abandoned sequences are freed at the engine's next step
    report.seconds = time.monotonic() - t0
    report.rss_end_kb = rss_kb(server_pid) if server_pid else None
    return report
