#!/usr/bin/env python3
"""Convert a llama.cpp / repeng control-vector GGUF into a linear flow (same layer numbers), which
every innsteer-local command can then load, evaluate and compare.

    python converters/convert_cvec_to_flow.py vector.gguf -o vector-flow.gguf
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.script import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("cvec-to-flow", __doc__))
