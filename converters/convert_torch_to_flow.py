#!/usr/bin/env python3
"""Convert a flow trained in PyTorch (a checkpoint of innsteer_local.train.inn.InnFlow, written by
innsteer_local.convert.torch_flow.save_checkpoint) into a flow GGUF that llama.cpp can steer with.

    python converters/convert_torch_to_flow.py phi.pt -o phi.gguf
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.torch_flow import read_checkpoint  # noqa: E402
from innsteer_local.errors import InnsteerError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="the .pt file (read with weights_only: no pickled code runs)")
    ap.add_argument("-o", "--output", required=True, help="the flow GGUF to write")
    args = ap.parse_args()
    try:
        flow = read_checkpoint(args.checkpoint)
        flow.save(args.output)
    except InnsteerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: layers {flow.layers}, model {flow.model.name} (n_embd {flow.model.n_embd})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
