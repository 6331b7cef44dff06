"""The one progress protocol: what long work (training, eval, bench) reports while it runs. The
library calls it; the command line draws it (apps/progress_bar.py: one bar per phase on stderr);
Progress itself reports nothing, the default for library callers that pass none."""

from __future__ import annotations

from typing import Optional


class Progress:
    """phase() starts a bar of `total` steps (ending the previous one), update() sets how many are
    done (with the numbers worth showing, e.g. the loss terms), message() says something between
    bars, finish() ends the last bar."""

    def phase(self, label: str, total: int) -> None: ...
    def update(self, done: int, info: Optional[dict[str, float]] = None) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...
