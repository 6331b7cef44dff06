"""The command line's drawing of innsteer_local.progress.Progress: one click bar per phase on stderr."""

from __future__ import annotations

import sys
from typing import Any, Optional

import click

from ..progress import Progress


class BarProgress(Progress):
    """One bar per phase on stderr, with the objective's terms where update() gives them."""

    SHOWN = ("loss", "preference", "likelihood", "preservation", "transport", "background", "nll", "val_loss")

    def __init__(self, label_width: int = 36) -> None:
        self.label_width = label_width
        self.bar: Any = None
        self.info: dict[str, float] = {}

    def phase(self, label: str, total: int) -> None:
        self.finish()
        self.info = {}
        self.bar = click.progressbar(length=max(total, 1), label=label.ljust(self.label_width), file=sys.stderr,
                                     show_pos=True, show_eta=True, item_show_func=lambda _: self._terms())
        self.bar.__enter__()
        if total == 0:
            self.update(1)

    def _terms(self) -> str:
        return "  ".join(f"{k} {v:.3f}" for k, v in self.info.items() if k in self.SHOWN)

    def update(self, done: int, info: Optional[dict[str, float]] = None) -> None:
        if self.bar is None:
            return
        if info:
            self.info = {k: v for k, v in info.items() if isinstance(v, (int, float))}
        self.bar.update(done - self.bar.pos, current_item=done)
        if done >= self.bar.length:
            self.finish()

    def message(self, text: str) -> None:
        """Below an open bar (which goes on), or between bars."""
        click.echo(f"\n{text}" if self.bar is not None else text, err=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
