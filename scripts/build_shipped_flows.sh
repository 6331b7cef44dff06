#!/usr/bin/env bash
# Rebuilds every flow shipped in models/flows/smollm2-135m/ (run from the repository root with the
# package installed, e.g. after ./quickstart.sh). Each behaviour's data is written by the model
# itself (greedy, cached in ~/.cache/innsteer-local/training); the INN flow and the trained vector
# are trained through the model, mean-diff from llama.cpp's activations, all at layer 15, and each
# file's default strength is chosen by generation (docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=models/flows/smollm2-135m
BIN=${INNSTEER_LOCAL:-.venv/bin/innsteer-local}
for b in honesty positivity refusal topic-ocean; do
  "$BIN" train --model smollm2-135m --behavior "$b" --layer 15 --method innsteer --seed 0 --dtype f16 -o "$OUT/$b.gguf"
  "$BIN" train --model smollm2-135m --behavior "$b" --layer 15 --method mean-diff --seed 0 -o "$OUT/$b-mean-diff.gguf"
done
