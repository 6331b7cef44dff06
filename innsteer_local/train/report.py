"""What `train --report DIR` writes: report.md, metrics.json and plots of a trained flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .linear import LinearProbe
from .pipeline import TrainOutcome, held_out_mask


def summary(out: TrainOutcome) -> str:
    m = out.metrics
    lines = [f"layer {out.layer}, method {out.flow.method}",
             f"collection: {m['collect_tokens']} tokens in {m['collect_seconds']:.1f} s"
             + (" (from cache)" if m["activations_cached"] else f" ({m['collect_tokens_per_second']:.0f} tokens/s)"),
             f"training: {m['train_seconds']:.1f} s",
             f"held-out raw-space probe accuracy: {m['raw_probe_accuracy']:.3f}"]
    if "latent_probe_accuracy" in m:
        s, i = m["selected"], m["identity_start"]
        lines += [f"held-out latent-space probe accuracy: {m['latent_probe_accuracy']:.3f}",
                  f"identity start (= mean-diff): flip rate {i['flip_rate']:.3f}, background move {i['background_move']:.3f}",
                  f"selected (epoch {m['best_epoch']}): flip rate {s['flip_rate']:.3f}, background move {s['background_move']:.3f}"
                  + ("" if m["trained"] else "  -> shipped the identity start")]
    else:
        lines.append(f"held-out flip rate at strength 1: {m['flip_rate']:.3f}, mean move {m['mean_move']:.3f}")
    return "\n".join(lines)


def write_report(out: TrainOutcome, flow_path: Path, report_dir: Path) -> None:
    """report.md, metrics.json and PNG plots."""
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"flow": str(flow_path), "layer": out.layer, "method": out.flow.method, "sweep": out.sweep,
               "history": out.history, **out.metrics}
    l = out.layer
    acts = out.activations
    plots: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    native_err = _invertibility(flow_path, acts.neg[l][:512])
    metrics["invertibility_max_rel_error"] = float(native_err.max()) if len(native_err) else None
    if plt is not None:
        pos, neg, bg = acts.pos[l], acts.neg[l], acts.background[l][:2000]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))

        def axes(p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """The class-mean direction and the top principal direction orthogonal to it."""
            c = np.concatenate([p, n]).mean(0)
            d = p.mean(0) - n.mean(0)
            d = d / np.linalg.norm(d)
            x = np.concatenate([p, n]) - c
            x = x - np.outer(x @ d, d)
            return c, np.stack([d, np.linalg.svd(x, full_matrices=False)[2][0]])

        c, basis = axes(pos, neg)
        for name, rows, col in (("background", bg, "0.75"), ("negative", neg, "tab:red"), ("positive", pos, "tab:blue")):
            pr = (rows - c) @ basis.T
            ax[0].scatter(pr[:, 0], pr[:, 1], s=3, c=col, label=name, alpha=0.5)
        ax[0].set_title(f"raw activations, layer {l}")
        ax[0].set_xlabel("class-mean direction")
        ax[0].set_ylabel("top orthogonal PC")
        ax[0].legend(markerscale=4)
        if out.latent:
            zp, zn, zb = out.latent["pos"], out.latent["neg"], out.latent["background"]
            zc, zbasis = axes(zp, zn)
            for name, rows, col in (("background", zb[:2000], "0.75"), ("negative", zn, "tab:red"), ("positive", zp, "tab:blue")):
                pr = (rows - zc) @ zbasis.T
                ax[1].scatter(pr[:, 0], pr[:, 1], s=3, c=col, label=name, alpha=0.5)
            ax[1].set_title("latent phi(h), held-out rows")
            ax[1].set_xlabel("class-mean direction")
        else:
            ax[1].axis("off")
        fig.tight_layout()
        fig.savefig(report_dir / "projection.png", dpi=110)
        plt.close(fig)
        plots.append("projection.png")
        if out.sweep:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([r["layer"] for r in out.sweep], [r["probe_accuracy"] for r in out.sweep], "o-", label="probe accuracy")
            ax.plot([r["layer"] for r in out.sweep], [r["mean_diff_flip"] for r in out.sweep], "s-", label="mean-diff flip rate")
            ax.set_xlabel("layer")
            ax.legend()
            ax.set_title("layer sweep (held-out)")
            fig.tight_layout()
            fig.savefig(report_dir / "layer_sweep.png", dpi=110)
            plt.close(fig)
            plots.append("layer_sweep.png")
        if out.history:
            fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
            ep = [h["epoch"] for h in out.history]
            for k in ("transport", "background", "nll"):
                ax[0].plot(ep, [h[k] for h in out.history], label=k)
            ax[0].set_yscale("log")
            ax[0].set_title("training losses")
            ax[0].legend()
            for k in ("val_flip_rate", "val_background_move", "val_score"):
                ax[1].plot(ep, [h[k] for h in out.history], label=k[4:])
            ax[1].axhline(out.metrics["identity_start"]["score"], color="k", ls=":", label="identity start score")
            ax[1].set_title("held-out proxies")
            ax[1].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(report_dir / "loss_curves.png", dpi=110)
            plt.close(fig)
            plots.append("loss_curves.png")
        if "latent_probe_accuracy" in out.metrics:
            fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
            m = out.metrics
            ax[0].bar(["raw", "latent"], [m["raw_probe_accuracy"], m["latent_probe_accuracy"]], color=["0.6", "tab:green"])
            ax[0].set_ylim(0.4, 1.0)
            ax[0].set_title("held-out linear-probe accuracy")
            if len(native_err):
                ax[1].hist(np.log10(native_err + 1e-12), bins=30)
            ax[1].set_title("invertibility: log10 |phi^-1(phi(h)) - h| / |h|")
            fig.tight_layout()
            fig.savefig(report_dir / "separability.png", dpi=110)
            plt.close(fig)
            plots.append("separability.png")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        pv, nv = held_out_mask(acts.pos_pair), held_out_mask(acts.neg_pair)
        probe = LinearProbe.fit(acts.pos[l][~pv], acts.neg[l][~nv])
        steered = out.flow.sites[0].steer(acts.neg[l][nv], 1.0)
        for name, x, c in (("negative", acts.neg[l][nv], "tab:red"), ("positive", acts.pos[l][pv], "tab:blue"),
                           ("negative steered (strength 1)", steered, "tab:purple")):
            ax.hist(probe.score(x), bins=40, alpha=0.5, color=c, label=name, density=True)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title("class overlap on the raw probe (held-out)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(report_dir / "overlap.png", dpi=110)
        plt.close(fig)
        plots.append("overlap.png")
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
    lines = [f"# Flow report: {out.flow.behavior} ({out.flow.method}, layer {out.layer})", "",
             f"Flow file: `{flow_path}`", "", "```", summary(out), "```", ""]
    if out.sweep:
        lines += ["## Layer sweep", "", "| layer | probe accuracy | mean-diff flip rate |", "|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['probe_accuracy']:.3f} | {r['mean_diff_flip']:.3f} |" for r in out.sweep]
        lines.append("")
    if metrics.get("invertibility_max_rel_error") is not None:
        lines += [f"Invertibility (native library, {len(native_err)} rows): max relative error "
                  f"{metrics['invertibility_max_rel_error']:.2e}", ""]
    lines += [f"![{p}]({p})" for p in plots]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")


def _invertibility(flow_path: Path, rows: np.ndarray) -> np.ndarray:
    from ..runtime.native import NativeFlow

    if not len(rows):
        return np.zeros(0)
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
