#!/usr/bin/env python3
"""Convert a linear flow GGUF into a llama.cpp control vector (llama-cli --control-vector FILE).
An INN flow has no exact control vector: it is refused with the reason.

    python converters/convert_flow_to_cvec.py mean-diff.gguf -o vector.gguf [--strength 2]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.script import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("flow-to-cvec", __doc__))
