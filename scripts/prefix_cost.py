#!/usr/bin/env python3
"""The server's prefix cache, measured: the next turn of a steered chat whose history grows, sent
to two servers over one model, one keeping each finished request's KV cells (the default) and one
starting every request from empty cells. Both run side by side in one process on loopback, their
requests interleaved, so drift on a noisy machine hits both alike.

    python scripts/prefix_cost.py [--model smollm2-135m] [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import urllib.request

from innsteer_local.apps.server import Engine, model_id_for, serving
from innsteer_local.runtime import registry
from innsteer_local.runtime.steered import SteeredLlama

TURN = ("Tell me more about the history of the lighthouse on the northern cape, who kept it, "
        "and what the keepers wrote in their logs during the long winters.")
ANSWER = ("The keepers wrote about storms, ships that passed, supplies that came late, and the lamp "
          "that had to be trimmed every few hours through the night so that it never went dark.")


def post(url: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path, _ = registry.resolve_model(args.model)
    llm = SteeredLlama(str(path), n_ctx=4096, seed=0, verbose=False,
                       **({"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}))
    llm.model_key = args.model
    engines = {keep: Engine(llm, model_id_for(llm), parallel=2, n_ctx=4096, keep_prefix=keep) for keep in (True, False)}
    for e in engines.values():
        e.load_flow("honesty", "honesty.gguf")
    print("| turns | prompt tokens | kept from the last turn | next turn, cells kept (s) | from empty cells (s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    with contextlib.ExitStack() as stack:
        urls = {keep: stack.enter_context(serving(e)) for keep, e in engines.items()}
        for turns in (1, 4, 8, 16):
            history = []
            for _ in range(turns - 1):
                history += [{"role": "user", "content": TURN}, {"role": "assistant", "content": ANSWER}]
            before = {"messages": history[:-1] or [{"role": "user", "content": TURN}],
                      "steering": [{"flow": "honesty"}], "temperature": 0, "max_tokens": 1}
            turn = {"messages": history + [{"role": "user", "content": TURN}], "steering": [{"flow": "honesty"}],
                    "temperature": 0, "max_tokens": 64, "ignore_eos": True}
            times = {True: [], False: []}
            n = cached = 0
            for _ in range(args.reps):
                for keep, url in urls.items():
                    post(url, before)  # the previous turn, as a chat app sent it
                    t, out = post(url, turn)
                    times[keep].append(t)
                    if keep:
                        n, cached = out["usage"]["prompt_tokens"], out["usage"]["prompt_tokens_details"]["cached_tokens"]
            kept, fresh = min(times[True]), min(times[False])
            print(f"| {turns} | {n} | {cached} | {kept:.2f} | {fresh:.2f} | {fresh / kept:.2f}x |", flush=True)
    for e in engines.values():
        e.close()
    llm.close()


if __name__ == "__main__":
    main()
