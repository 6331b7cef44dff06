#!/usr/bin/env python3
"""Convert a linear flow GGUF into a llama.cpp control vector (llama-cli --control-vector FILE).
An INN flow has no exact control vector: it is refused with the reason.

    python converters/convert_flow_to_cvec.py mean-diff.gguf -o vector.gguf [--strength 2]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.convert.cvec import write_cvec  # noqa: E402
from innsteer_local.errors import InnsteerError  # noqa: E402
from innsteer_local.flow import Flow  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("flow", help="a linear flow GGUF (mean-diff, vector, an imported control vector)")
    ap.add_argument("-o", "--output", required=True, help="the control-vector GGUF to write")
    ap.add_argument("--strength", type=float, default=None, help="baked into the vector [default: the flow's default]")
    args = ap.parse_args()
    try:
        flow = Flow.load(args.flow)
        write_cvec(flow, args.output, args.strength)
    except (InnsteerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: llama.cpp --control-vector, layers {flow.layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
