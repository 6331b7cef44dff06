#!/usr/bin/env bash
# innsteer-local in one command.
#
#   ./quickstart.sh         set up .venv, fetch the default model (checksummed, cached), show a
#                           steered vs unsteered reply, then chat (when run in a terminal)
#   ./quickstart.sh test    set up (or refresh) .venv from this checkout and run the test suite
#
# Needs python3 (>= 3.10), a C compiler and cmake; llama-cpp-python builds from source the
# first time (several minutes) and is kept in ~/.cache/innsteer-local/wheels after that.
# CMAKE_ARGS="-DGGML_CUDA=on" ./quickstart.sh builds llama.cpp with CUDA (Metal is the default on macOS).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # llama.cpp first, built our way: on Linux x86-64 without ggml's AMX path (it crashes with
  # SIGILL on CPUs with AMX) but with this CPU's vector extensions; your own CMAKE_ARGS (CUDA,
  # Metal, ...) are added after ours, and llama.cpp's RPC backend (--rpc: a model split across
  # rpc-servers). Built once per set of flags into ~/.cache/innsteer-local/wheels.
  "$VENV/bin/python" innsteer_local/runtime/llama_build.py install --rpc --python "$VENV/bin/python"
  echo ">> installing innsteer-local and its test tools"
  # scikit-build-core builds native/ through CMakeLists.txt into the wheel
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    "$VENV/bin/python" -m pip install --quiet ".[dev]"
  # pip may have swapped llama.cpp for a wheel from its own cache: check what is installed now
  if ! "$VENV/bin/python" innsteer_local/runtime/llama_build.py check --python "$VENV/bin/python"; then
    echo ">> the installed llama.cpp is not the safe build; rebuilding it"
    "$VENV/bin/python" innsteer_local/runtime/llama_build.py install --rpc --python "$VENV/bin/python" --force
  fi
  # rpc-server from the same llama.cpp source, for `--rpc` and its test (cached in ~/.cache/innsteer-local/bin)
  PYTHON="$VENV/bin/python" scripts/build_rpc_server.sh > /dev/null \
    || echo ">> warning: rpc-server was not built; the RPC test will be skipped"
}

case "${1:-demo}" in
  test)
    setup
    shift || true
    exec "$VENV/bin/pytest" "$@"
    ;;
  demo)
    setup
    "$VENV/bin/innsteer-local" models pull
    prompt="I lost my friend's book. What should I tell her?"
    echo
    echo ">> $prompt"
    echo "-- unsteered:"
    "$VENV/bin/innsteer-local" generate --prompt "$prompt" --max-tokens 80
    echo "-- steered with the shipped honesty flow:"
    "$VENV/bin/innsteer-local" generate --prompt "$prompt" --max-tokens 80 --flow honesty.gguf
    if [ -t 0 ]; then
      echo
      echo ">> chatting with the honesty flow (/help for commands, /quit to leave)"
      exec "$VENV/bin/innsteer-local" chat --flow honesty.gguf --compare
    fi
    ;;
  *)
    echo "usage: $0 [demo|test [pytest args]]" >&2
    exit 2
    ;;
esac
