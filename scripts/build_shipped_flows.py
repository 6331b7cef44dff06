"""Builds the flows shipped in models/flows/ (run from the repository root):

    python scripts/build_shipped_flows.py

Deterministic: the same model and data give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from innsteer_local import behaviors, models
from innsteer_local.baselines import mean_diff
from innsteer_local.collect import capture, chat_example
from innsteer_local.flow import Flow
from innsteer_local.steered import SteeredLlama

MODEL = "smollm2-135m"
LAYER = 15
# strength 1 adds the raw mean difference; this default makes the effect visible while replies stay fluent
DEFAULT_STRENGTH = 4.0


def main() -> None:
    out_dir = Path(__file__).resolve().parents[1] / "models" / "flows" / MODEL
    path, _ = models.resolve_model(MODEL)
    llm = SteeredLlama(str(path), n_ctx=512, n_batch=512, verbose=False, seed=0)
    b = behaviors.load("honesty")
    pos = [chat_example(llm, p.positive_prompt, p.positive_reply) for p in b.pairs]
    neg = [chat_example(llm, p.negative_prompt, p.negative_reply) for p in b.pairs]
    rows_pos = np.concatenate(capture(llm, pos, [LAYER])[LAYER])
    rows_neg = np.concatenate(capture(llm, neg, [LAYER])[LAYER])
    v = mean_diff(rows_pos, rows_neg)
    digest = hashlib.sha256(json.dumps([vars(p) for p in b.pairs], sort_keys=True).encode()).hexdigest()[:16]
    flow = Flow.linear({LAYER: v}, llm.model_info, method="mean-diff", behavior="honesty",
                       default_strength=DEFAULT_STRENGTH, name="honesty",
                       provenance={"data": "built-in behaviour 'honesty'", "data_sha256_16": digest,
                                   "pairs": len(b.pairs), "rows_positive": int(rows_pos.shape[0]),
                                   "rows_negative": int(rows_neg.shape[0]), "positions": "completion",
                                   "layer": LAYER, "built_by": "scripts/build_shipped_flows.py"})
    flow.save(out_dir / "honesty.gguf")
    print(f"honesty.gguf: |v| = {np.linalg.norm(v):.3f} from {rows_pos.shape[0]}+{rows_neg.shape[0]} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
