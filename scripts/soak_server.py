#!/usr/bin/env python3
"""Soak `innsteer-local serve`: start it with an API key and the shipped flows, drive it with 8
clients (mixed steering, abandoned replies, malformed bodies) for --minutes, and report 5xx
answers, leaked steering and memory growth. Exit status 1 if any bar is missed.

    python scripts/soak_server.py --minutes 10 [--model smollm2-135m] [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from innsteer_local.apps.load_client import wait_ready
from innsteer_local.apps.soak import soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    cli = shutil.which("innsteer-local") or str(Path(sys.executable).with_name("innsteer-local"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = secrets.token_urlsafe(16)
    # the server's log to a file: a pipe nobody reads would fill and block the server
    log = Path(tempfile.mkdtemp(prefix="innsteer-soak-")) / "serve.log"
    proc = subprocess.Popen([cli, "serve", "-m", args.model, "--flow", "honesty.gguf", "--flow", "positivity.gguf",
                             "--port", str(port), "--api-key", key, "--n-ctx", "1024", "--parallel", "4"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, api_key=key)

        def progress(r, t):
            print(f"\r{t:6.0f} s  {r.requests} requests  {r.abandoned} abandoned  5xx {len(r.server_errors)}  "
                  f"leaks {len(r.leaks)}", end="", file=sys.stderr, flush=True)

        report = soak(url, args.minutes * 60, clients=args.clients, api_key=key, flows=["honesty", "positivity"],
                      server_pid=proc.pid, progress=progress)
    finally:
        proc.terminate()
        proc.wait(30)
    print(file=sys.stderr)
    out = report.as_dict()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    growth = report.rss_growth
    ok = not report.server_errors and not report.leaks and growth is not None and growth <= 0.10
    print(f"server log: {log}", file=sys.stderr)
    print(f"{'PASS' if ok else 'FAIL'}: {report.requests} requests in {report.seconds:.0f} s, "
          f"{len(report.server_errors)} 5xx, {len(report.leaks)} leaks, RSS {report.rss_start_kb} -> "
          f"{report.rss_end_kb} kB ({(growth or 0) * 100:+.1f} %)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
