#!/usr/bin/env python3
"""Convert a llama.cpp / repeng control-vector GGUF into a linear flow (same layer numbers), which
every innsteer-local command can then load, evaluate and compare.

    python converters/convert_cvec_to_flow.py vector.gguf -o vector-flow.gguf
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.cvec import read_cvec  # noqa: E402
from innsteer_local.errors import InnsteerError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cvec", help="the control-vector GGUF")
    ap.add_argument("-o", "--output", required=True, help="the flow GGUF to write")
    args = ap.parse_args()
    try:
        flow = read_cvec(args.cvec)
        flow.save(args.output)
    except InnsteerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: layers {flow.layers}, n_embd {flow.model.n_embd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
