#!/usr/bin/env python3
"""Convert a flow GGUF into ONNX graphs (phi, phi^-1 and the steering map of every layer, plus
manifest.json), for runtimes other than llama.cpp. Needs the [onnx] extra.

    python converters/convert_flow_to_onnx.py honesty.gguf -o honesty-onnx/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.script import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("flow-to-onnx", __doc__))
