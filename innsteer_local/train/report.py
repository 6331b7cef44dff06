"""What `train` prints and what `train --report DIR` writes: report.md, metrics.json and plots
(the objective's terms over training, the held-out generation scores behind the chosen default,
and for activation-based methods the class geometry)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..measure.metrics import MATCHED_DISTINCT_FACTOR, MATCHED_PPL_FACTOR
from .activations.linear import LinearProbe
from .activations.sweep import held_out_mask
from .outcome import TrainOutcome

LOSS_TERMS = ("loss", "preference", "likelihood", "preservation", "transport", "background", "nll")


def summary(out: TrainOutcome) -> str:
    m = out.metrics
    sec = out.seconds
    lines = [f"layer {out.layer}, method {out.flow.method}"
             + (f" ({out.flow.provenance.get('objective')} objective)" if out.flow.provenance.get("objective") else ""),
             f"data: {len(out.data.pairs)} pairs, {len(out.data.neutral)} neutral items",
             "time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in sec.items())
             + f" (total {sum(sec.values()):.0f} s)"]
    if "start" in m and "end" in m:
        s, e = m["start"], m["end"]
        if "val_loss" in s and "val_loss" in e:
            lines.append(f"held-out objective: {s['val_loss']:.3f} at the start (= mean-diff) -> {e['val_loss']:.3f}"
                         + "".join(f"; {k} {s['val_' + k]:.3f} -> {e['val_' + k]:.3f}" for k in
                                   ("preference", "preservation") if f"val_{k}" in s and f"val_{k}" in e))
    if "raw_probe_accuracy" in m:
        lines.append(f"held-out raw-space probe accuracy: {m['raw_probe_accuracy']:.3f}")
    if "flip_rate" in m:
        lines.append(f"held-out flip rate at strength 1: {m['flip_rate']:.3f}, mean move {m['mean_move']:.3f}")
    sel = m.get("selection")
    if sel:
        c, b = sel["chosen"], sel["baseline"]
        d = sel.get("default", c)
        phase = {"linear": "the end of the linear phase (its shift alone)", "full": "the end of training"}.get(
            sel.get("phase", ""), "")

        def at(r: dict[str, Any]) -> str:
            return (f"behaviour {r['behaviour']:.3f}"
                    + (f", on neutral prompts {r['neutral']:.3f}" if sel["neutral_prompts"] else "")
                    + f", perplexity x{r['ppl_ratio']:.2f}, distinct-2 x{r['distinct_ratio']:.2f}")

        lines.append(f"chosen by generation ({sel['scorer']} score, {sel['prompts']} held-out prompts"
                     + (f" and {sel['neutral_prompts']} neutral ones" if sel["neutral_prompts"] else "")
                     + f", {sel['tokens']} tokens): "
                     + (phase or f"checkpoint {sel['checkpoint_step']}"))
        lines.append(f"calibrated: strength 1 (the default) = {sel['unit']:g}x the trained unit; unsteered: {at(b)}; "
                     f"at strength 1: {at(d)}; best at matched fluency (strength {c['strength'] / sel['unit']:.3g}): "
                     f"{at(c)}")
        if sel.get("note"):
            lines.append(f"note: {sel['note']}")
    return "\n".join(lines)


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_report(out: TrainOutcome, flow_path: Path, report_dir: Path) -> None:
    """report.md, metrics.json and PNG plots."""
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"flow": str(flow_path), "layer": out.layer, "method": out.flow.method, "sweep": out.sweep,
               "history": out.history, "seconds": out.seconds, **out.metrics, "selection_settings": out.selection}
    plt = _plt()
    plots: list[str] = []
    if plt is not None:
        plots += _plot_history(plt, out, report_dir)
        plots += _plot_selection(plt, out, report_dir)
        if out.activations is not None:
            plots += _plot_geometry(plt, out, report_dir)
    rows = out.activations.neg[out.layer][:512] if out.activations is not None else None
    if rows is not None and len(rows):
        err = _invertibility(flow_path, rows)
        metrics["invertibility_max_rel_error"] = float(err.max())
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
    lines = [f"# Flow report: {out.flow.behavior} ({out.flow.method}, layer {out.layer})", "",
             f"Flow file: `{flow_path}`", "", "```", summary(out), "```", ""]
    if out.selection:
        lines += ["## Selection by generation (held-out prompts)", "",
                  "Strengths in the trained unit; *calibrated* is the same setting in the shipped flow's "
                  "strengths (the chosen candidate only).", "",
                  "| checkpoint | strength | calibrated | behaviour | neutral | score | ppl ratio | distinct-2 ratio | repeat-4 | matched fluency |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in out.selection:
            cal = r.get("calibrated")
            lines.append(f"| {r['candidate']} | {r['strength']:g} | {'' if cal is None else format(cal, '.3g')} | "
                         f"{r['behaviour']:.3f} | {r['neutral']:.3f} | "
                         f"{r['score']:.3f} | {r['ppl_ratio']:.2f} | {r['distinct_ratio']:.2f} | {r['repeat4']:.2f} | "
                         f"{'yes' if r['fluent'] else 'no'} |")
        lines.append("")
    if out.sweep:
        lines += ["## Layer sweep", "", "| layer | probe accuracy | mean-diff flip rate |", "|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['probe_accuracy']:.3f} | {r['mean_diff_flip']:.3f} |" for r in out.sweep]
        lines.append("")
    if metrics.get("invertibility_max_rel_error") is not None:
        lines += [f"Invertibility (native library, {len(rows)} rows): max relative error "  # type: ignore[arg-type]
                  f"{metrics['invertibility_max_rel_error']:.2e}", ""]
    lines += [f"![{p}]({p})" for p in plots]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")


def _plot_history(plt: Any, out: TrainOutcome, report_dir: Path) -> list[str]:
    hist = [h for h in out.history if any(k in h for k in LOSS_TERMS)]
    if not hist:
        return []
    key = "step" if "step" in hist[0] else "epoch"
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for k in LOSS_TERMS:
        pts = [(h[key], h[k]) for h in hist if k in h and math.isfinite(h[k])]
        if pts:
            x, y = zip(*pts)
            ax[0].plot(x, _smooth(list(y)), label=k)
    ax[0].set_xlabel(key)
    ax[0].set_title("training objective (smoothed)")
    ax[0].legend(fontsize=8)
    val = [h for h in out.history if any(k.startswith("val_") for k in h)]
    for k in sorted({k for h in val for k in h if k.startswith("val_")}):
        pts = [(h[key], h[k]) for h in val if k in h]
        ax[1].plot(*zip(*pts), "o-", label=k[4:])
    ax[1].set_xlabel(key)
    ax[1].set_title("held-out objective")
    ax[1].legend(fontsize=8)
    return _save(plt, fig, report_dir, "loss_curves.png")


def _save(plt: Any, fig: Any, report_dir: Path, name: str) -> list[str]:
    fig.tight_layout()
    fig.savefig(report_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def _smooth(y: list[float], k: int = 5) -> list[float]:
    return [float(np.mean(y[max(0, i - k + 1): i + 1])) for i in range(len(y))]


def _plot_selection(plt: Any, out: TrainOutcome, report_dir: Path) -> list[str]:
    if not out.selection:
        return []
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    by_cand: dict[int, list[dict[str, Any]]] = {}
    for r in out.selection[1:]:
        by_cand.setdefault(r["candidate"], []).append(r)
    base = out.selection[0]
    for c, rows in sorted(by_cand.items()):
        rows = sorted([base] + rows, key=lambda r: r["strength"])
        label = rows[-1].get("phase") or out.flow.method
        ax[0].plot([r["strength"] for r in rows], [r["score"] for r in rows], "o-", label=label)
        ax[1].plot([r["strength"] for r in rows], [r["ppl_ratio"] for r in rows], "o-", label=f"{label}: perplexity")
        ax[1].plot([r["strength"] for r in rows], [r["distinct_ratio"] for r in rows], "s--", label=f"{label}: distinct-2")
    unit = out.flow.provenance.get("selection", {}).get("unit")
    if unit:
        ax[0].axvline(unit, color="k", ls=":", lw=0.8, label="calibrated strength 1")
    ax[0].set_xlabel("strength (trained unit)")
    ax[0].set_title("held-out behaviour score (generated replies)")
    ax[0].legend(fontsize=8)
    ax[1].axhline(MATCHED_PPL_FACTOR, color="k", ls=":", lw=0.8)
    ax[1].axhline(MATCHED_DISTINCT_FACTOR, color="0.5", ls=":", lw=0.8)
    ax[1].set_xlabel("strength (trained unit)")
    ax[1].set_title("fluency against unsteered (matched: ppl <= 1.25, distinct-2 >= 0.8)")
    ax[1].legend(fontsize=7)
    return _save(plt, fig, report_dir, "selection.png")


def _plot_geometry(plt: Any, out: TrainOutcome, report_dir: Path) -> list[str]:
    acts, l = out.activations, out.layer
    assert acts is not None
    pos, neg, bg = acts.pos[l], acts.neg[l], acts.background[l][:2000]

    def axes(p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The class-mean direction and the top principal direction orthogonal to it."""
        c = np.concatenate([p, n]).mean(0)
        d = p.mean(0) - n.mean(0)
        d = d / np.linalg.norm(d)
        x = np.concatenate([p, n]) - c
        x = x - np.outer(x @ d, d)
        return c, np.stack([d, np.linalg.svd(x, full_matrices=False)[2][0]])

    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    c, basis = axes(pos, neg)
    for name, rows, col in (("background", bg, "0.75"), ("negative", neg, "tab:red"), ("positive", pos, "tab:blue")):
        pr = (rows - c) @ basis.T
        ax[0].scatter(pr[:, 0], pr[:, 1], s=3, c=col, label=name, alpha=0.5)
    ax[0].set_title(f"activations, layer {l}")
    ax[0].set_xlabel("class-mean direction")
    ax[0].set_ylabel("top orthogonal PC")
    ax[0].legend(markerscale=4)
    pv, nv = held_out_mask(acts.pos_pair), held_out_mask(acts.neg_pair)
    probe = LinearProbe.fit(pos[~pv], neg[~nv])
    steered = out.flow.sites[0].steer(neg[nv], out.flow.default_strength)
    for name, x, col in (("negative", neg[nv], "tab:red"), ("positive", pos[pv], "tab:blue"),
                         (f"negative steered (strength {out.flow.default_strength:g})", steered, "tab:purple")):
        ax[1].hist(probe.score(x), bins=40, alpha=0.5, color=col, label=name, density=True)
    ax[1].axvline(0, color="k", lw=0.8)
    ax[1].set_title("class overlap on a linear probe (held-out)")
    ax[1].legend(fontsize=8)
    return _save(plt, fig, report_dir, "geometry.png")


def _invertibility(flow_path: Path, rows: np.ndarray) -> np.ndarray:
    from ..runtime.native import NativeFlow

    nf = NativeFlow(flow_path)
    back = nf.inverse(nf.forward(rows))
    nf.close()
    return np.linalg.norm(back - rows, axis=1) / np.linalg.norm(rows, axis=1)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
