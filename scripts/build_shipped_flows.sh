#!/usr/bin/env bash
# Rebuilds every flow shipped in models/flows/smollm2-135m/ (run from the repository root with the
# package installed, e.g. after ./quickstart.sh). Deterministic: same model, data and seed give the
# same bytes. The refusal behaviour reads AdvBench from the package's datasets (or $INNSTEER_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=models/flows/smollm2-135m
BIN=${INNSTEER_LOCAL:-.venv/bin/innsteer-local}
for b in honesty positivity refusal; do
  "$BIN" train --model smollm2-135m --behavior "$b" --layer 15 --method innsteer --seed 0 --dtype f16 -o "$OUT/$b.gguf"
  "$BIN" train --model smollm2-135m --behavior "$b" --layer 15 --method mean-diff --seed 0 -o "$OUT/$b-mean-diff.gguf"
done
