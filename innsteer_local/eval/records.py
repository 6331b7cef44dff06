"""The append-only store of finished answers (DIR/records.jsonl) and the settings check that
keeps a resumed run consistent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InnsteerError


class Records:
    """Append-only JSONL store of finished answers, keyed by (experiment, flow, strength, item)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, float, str], dict[str, Any]] = {}
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # a kill cut the last answer short: drop it
                data = data[: data.rfind(b"\n") + 1]
                path.write_bytes(data)
            for line in data.decode("utf-8").splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill: that answer is simply redone
                self.rows[self.key(r["exp"], r["flow"], r["strength"], r["item"])] = r
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def key(exp: str, flow: str, strength: float, item: str) -> tuple[str, str, float, str]:
        return exp, flow, round(float(strength), 6), item

    def has(self, exp: str, flow: str, strength: float, item: str) -> bool:
        return self.key(exp, flow, strength, item) in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows[self.key(row["exp"], row["flow"], row["strength"], row["item"])] = row
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def cell(self, exp: str, flow: str, strength: float) -> list[dict[str, Any]]:
        s = round(float(strength), 6)
        return [r for k, r in self.rows.items() if k[0] == exp and k[1] == flow and k[2] == s]

    def close(self) -> None:
        self._fh.close()


def check_config(out_dir: Path, meta: dict[str, Any]) -> None:
    """A resumed run must answer with the same model and generation settings."""
    path = out_dir / "config.json"
    keys = ("model_sha256", "judge_sha256", "max_tokens", "temperature", "seed", "chat")
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in keys if old.get(k) != meta.get(k)]
        if diff:
            raise InnsteerError(f"{out_dir} holds results made with other settings ({', '.join(diff)}: "
                                f"{', '.join(f'{old.get(k)!r} -> {meta.get(k)!r}' for k in diff)}); "
                                "use a new -o directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: meta.get(k) for k in keys} | {"model": meta.get("model"), "judge": meta.get("judge")}, indent=1))
