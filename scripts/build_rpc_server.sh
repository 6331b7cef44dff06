#!/usr/bin/env bash
# Builds llama.cpp's rpc-server from the llama.cpp source that llama-cpp-python 0.3.36 vendors (its
# source distribution, vendor/llama.cpp/tools/rpc), with the same safe CPU flags as the library
# (innsteer_local/runtime/llama_build.py cmake-args --rpc), into the user cache:
#
#   scripts/build_rpc_server.sh            # -> ~/.cache/innsteer-local/bin/rpc-server
#   ~/.cache/innsteer-local/bin/rpc-server -H 127.0.0.1 -p 50052
#
# rpc-server has no authentication: keep it on loopback or a trusted network (docs/EMBEDDING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT="${INNSTEER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/innsteer-local}/bin"
if [ -x "$OUT/rpc-server" ] && [ "${1:-}" != "--force" ]; then
  echo "$OUT/rpc-server"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo ">> fetching the llama-cpp-python 0.3.36 source distribution" >&2
"$PY" -m pip download --quiet --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$work" 2>/dev/null
tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
src="$work/llama_cpp_python-0.3.36/vendor/llama.cpp"
# shellcheck disable=SC2046
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  $("$PY" innsteer_local/runtime/llama_build.py cmake-args --rpc) >&2
echo ">> building rpc-server (a few minutes)" >&2
cmake --build "$work/build" --target ggml-rpc-server -j "$(nproc 2>/dev/null || echo 2)" >&2
mkdir -p "$OUT"
cp "$work/build/bin/ggml-rpc-server" "$OUT/rpc-server"
echo "$OUT/rpc-server"
