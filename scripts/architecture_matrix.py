#!/usr/bin/env python3
"""The compatibility matrix: tiny random-weight GGUF models of every architecture in
innsteer_local/convert/tiny_models.py, plus the registry models as the real rows, each checked end to
end (innsteer_local/runtime/compat.py: runtime, control-vector parity, batched steering, transformers
and training). Writes innsteer_local/runtime/architectures.json (what `doctor` and `inspect` read)
and the table of docs/ARCHITECTURES.md.

    python scripts/architecture_matrix.py                 # all rows (about 10 minutes on 2 cores)
    python scripts/architecture_matrix.py --only qwen3,phi3 --no-real
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import llama_cpp
    import transformers

    from innsteer_local.convert.tiny_models import ARCHITECTURES, write_tiny_model
    from innsteer_local.runtime import compat, registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated architectures of the tiny rows")
    ap.add_argument("--no-real", action="store_true", help="skip the registry models")
    ap.add_argument("--render", action="store_true", help="only rewrite the table from architectures.json")
    args = ap.parse_args()
    if args.render:
        table = json.loads((ROOT / "innsteer_local" / "runtime" / compat.MATRIX.name).read_text())
        _write_doc(compat.render_matrix(table["rows"], table["transformers"], table["llama_cpp_python"]))
        return 0
    names = [n for n in args.only.split(",") if n] or list(ARCHITECTURES)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="innsteer-matrix-"))
    models = [(f"tiny-{n}", lambda n=n: write_tiny_model(n, work / f"tiny-{n}.gguf", seed=0),
               ARCHITECTURES[n].quant) for n in names]
    if not args.no_real:
        for key in ("smollm2-135m", "gemma3-270m"):
            q = re.search(r"(Q\d_[A-Z0-9_]+|BF16|F16|F32)", registry.entry(key).file, re.I)
            models.append((key, lambda key=key: registry.resolve_model(key)[0], q.group(1).upper() if q else "?"))
    for label, make, quant in models:
        t = time.time()
        path = make()
        folder = work / label
        folder.mkdir(exist_ok=True)
        row = {"model": label, "quant": quant}
        row.update(compat.check_runtime(path, folder))
        if row.get("runtime") == "ok":
            row.update(compat.check_training(path, folder))
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    table = {"llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__,
             "written": time.strftime("%Y-%m-%d"), "rows": rows}
    if not args.only and not args.no_real:
        # into the checkout (the imported package may be an installed copy)
        (ROOT / "innsteer_local" / "runtime" / compat.MATRIX.name).write_text(json.dumps(table, indent=1) + "\n")
        _write_doc(compat.render_matrix(rows, transformers.__version__, llama_cpp.__version__))
        print(f"wrote innsteer_local/runtime/{compat.MATRIX.name} and docs/ARCHITECTURES.md", file=sys.stderr)
    print(compat.render_matrix(rows, transformers.__version__, llama_cpp.__version__))
    return 0 if all(r.get("runtime") == "ok" or str(r.get("runtime", "")).startswith("refused") for r in rows) else 1


def _write_doc(body: str) -> None:
    doc = ROOT / "docs" / "ARCHITECTURES.md"
    start, end = "<!-- matrix: scripts/architecture_matrix.py -->", "<!-- end of matrix -->"
    doc.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m: f"{start}\n{body}{end}",
                          doc.read_text(), flags=re.S))


if __name__ == "__main__":
    sys.exit(main())
