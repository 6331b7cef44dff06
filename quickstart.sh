#!/usr/bin/env bash
# innsteer-local in one command.
#
#   ./quickstart.sh         set up .venv, fetch the default model (checksummed, cached), show a
#                           steered vs unsteered reply, then chat (when run in a terminal)
#   ./quickstart.sh test    set up (or refresh) .venv from this checkout and run the test suite
#
# Needs python3 (>= 3.10), a C compiler and cmake; llama-cpp-python builds from source the
# first time (several minutes), pip caches the wheel after that.
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
  echo ">> installing innsteer-local and its test tools (first run builds llama-cpp-python: several minutes)"
  # scikit-build-core builds native/ through CMakeLists.txt into the wheel
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    "$VENV/bin/python" -m pip install --quiet ".[dev]"
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
