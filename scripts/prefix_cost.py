#!/usr/bin/env python3
"""What a prefix cache could save the server: for chats whose history grows turn by turn, the time
to re-evaluate the history (a request with max_tokens=1) against the whole request (history plus
a 64-token reply), measured side by side through `serve`'s API on loopback.

    python scripts/prefix_cost.py [--model smollm2-135m] [--threads 2]
"""

from __future__ import annotations

import argparse
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
    engine = Engine(llm, model_id_for(llm), parallel=1, n_ctx=4096)
    engine.load_flow("honesty", "honesty.gguf")
    print("| turns | history tokens | history alone (s) | history + 64-token reply (s) | share a prefix cache could save |")
    print("|---:|---:|---:|---:|---:|")
    with serving(engine) as url:
        post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})  # warm-up
        for turns in (1, 4, 8, 16):
            messages = []
            for _ in range(turns - 1):
                messages += [{"role": "user", "content": TURN}, {"role": "assistant", "content": ANSWER}]
            messages.append({"role": "user", "content": TURN})
            base = {"messages": messages, "temperature": 0, "steering": [{"flow": "honesty"}]}
            prompt, full, n = [], [], 0
            for _ in range(args.reps):  # interleaved, so drift on a noisy machine hits both alike
                t, out = post(url, {**base, "max_tokens": 1})
                prompt.append(t)
                n = out["usage"]["prompt_tokens"]
                t, _ = post(url, {**base, "max_tokens": 64, "ignore_eos": True})
                full.append(t)
            p, f = min(prompt), min(full)
            print(f"| {turns} | {n} | {p:.2f} | {f:.2f} | {p / f:.0%} |", flush=True)
    engine.close()
    llm.close()


if __name__ == "__main__":
    main()
