#!/usr/bin/env python3
"""Convert a flow GGUF into ONNX graphs (phi, phi^-1 and the steering map of every layer, plus
manifest.json), for runtimes other than llama.cpp. Needs the [onnx] extra.

    python converters/convert_flow_to_onnx.py honesty.gguf -o honesty-onnx/
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout runs as is

from innsteer_local.errors import InnsteerError  # noqa: E402
from innsteer_local.flow import Flow  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("flow", help="the flow GGUF")
    ap.add_argument("-o", "--output", required=True, help="the folder to write the graphs into")
    args = ap.parse_args()
    try:
        from innsteer_local.convert.onnx import export_onnx

        manifest = export_onnx(Flow.load(args.flow), args.output)
    except InnsteerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(2 + len(s["steer"]) for s in manifest["sites"])
    print(f"wrote {n} ONNX graphs and manifest.json to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
