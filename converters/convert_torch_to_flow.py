#!/usr/bin/env python3
"""Convert a flow trained in PyTorch (a checkpoint of innsteer_local.train.inn.InnFlow, written by
innsteer_local.convert.torch_flow.save_checkpoint) into a flow GGUF that llama.cpp can steer with.

    python converters/convert_torch_to_flow.py phi.pt -o phi.gguf
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.script import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("torch-to-flow", __doc__))
