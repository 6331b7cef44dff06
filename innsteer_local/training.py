"""The `train` pipeline: data -> activations (cached) -> layer choice -> flow -> report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import behaviors
from .baselines import LinearProbe, linear_flow, mean_diff
from .collect import Activations, collect_dataset
from .data import Dataset, load_file
from .flow import Flow, Gate

METHODS = ("innsteer", "mean-diff", "pca", "affine-ot")
# The default strength moves rows by this share of a typical activation norm: on smollm2-135m,
# mean-diff honesty at layer 15 was visible and still fluent there (strength 4 = 16 %).
DEFAULT_MOVE_FRACTION = 0.16


def default_strength(pos: np.ndarray, neg: np.ndarray) -> float:
    """Strength at which mean-diff (and so every calibrated method) moves rows by
    DEFAULT_MOVE_FRACTION of their median norm, to two significant digits."""
    typical = float(np.median(np.linalg.norm(np.concatenate([pos, neg]), axis=1)))
    a = DEFAULT_MOVE_FRACTION * typical / max(float(np.linalg.norm(mean_diff(pos, neg))), 1e-12)
    return float(f"{a:.2g}")


def load_data(behavior: Optional[str], pairs: Optional[str]) -> Dataset:
    if (behavior is None) == (pairs is None):
        raise ValueError("give exactly one of --behavior NAME or --pairs FILE")
    return behaviors.load(behavior) if behavior else load_file(pairs)  # type: ignore[arg-type]


def candidate_layers(n_layer: int) -> list[int]:
    """Every third layer from the first tenth to the last tenth (llama.cpp cannot capture the last)."""
    lo, hi = max(1, n_layer // 10), min(n_layer - 2, n_layer - n_layer // 10)
    return list(range(lo, hi + 1, 3))


# An INN flow's edit is input-dependent, so equal mean displacement is not equal fluency: the
# shipped honesty flow (smollm2-135m, layer 15) was fluent at strength 2, repeated itself at 3 and
# degenerated at mean-diff's default 4.7, although it moves generated rows less than mean-diff
# (0.61 |v| per unit strength). Until the evaluation harness calibrates strengths at matched
# fluency, INN flows default to 0.4 of mean-diff's default (honesty: 1.9).
INN_DEFAULT_FRACTION = 0.4


def held_out_mask(pair_ids: np.ndarray, frac: float = 0.2, seed: int = 0) -> np.ndarray:
    n = int(pair_ids.max(initial=-1) + 1)
    rng = np.random.default_rng(seed)
    held = np.zeros(n, dtype=bool)
    held[rng.permutation(n)[: max(1, int(round(n * frac)))]] = True
    return held[pair_ids]


def layer_sweep(acts: Activations, seed: int = 0) -> list[dict[str, float]]:
    """Held-out separability and mean-diff flip rate per captured layer."""
    rows = []
    for l in acts.layers:
        pv, nv = held_out_mask(acts.pos_pair, seed=seed), held_out_mask(acts.neg_pair, seed=seed)
        pos, neg = acts.pos[l], acts.neg[l]
        probe = LinearProbe.fit(pos[~pv], neg[~nv])
        v = mean_diff(pos[~pv], neg[~nv])
        flip = float((probe.score(neg[nv] + v) > 0).mean())
        acc = probe.accuracy(pos[pv], neg[nv])
        rows.append({"layer": l, "probe_accuracy": acc, "mean_diff_flip": flip, "score": acc + flip,
                     "mean_diff_norm": float(np.linalg.norm(v))})
    return rows


@dataclass
class TrainOutcome:
    flow: Flow
    layer: int
    activations: Activations
    sweep: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    latent: dict[str, np.ndarray] = field(default_factory=dict)
    collect_seconds: float = 0.0
    train_seconds: float = 0.0


def train(llm: Any, data: Dataset, layer: int | str, method: str = "innsteer", seed: int = 0,
          positions: str = "completion", cache_dir: Optional[Path] = None, inn_config: Any = None,
          collect_progress: Optional[Callable[[int, int], None]] = None,
          train_progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainOutcome:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    layers: Sequence[int]
    if layer == "auto":
        layers = candidate_layers(llm.model_info.n_layer)
    else:
        layers = [int(layer)]
        if not 0 <= layers[0] < llm.model_info.n_layer - 1:
            raise ValueError(f"layer {layers[0]} is outside 0..{llm.model_info.n_layer - 2} for this model "
                             f"({llm.model_info.n_layer} layers; the last one cannot be captured)")
    t0 = time.perf_counter()
    acts = collect_dataset(llm, data, layers, positions=positions, cache_dir=cache_dir, progress=collect_progress)
    collect_seconds = time.perf_counter() - t0
    if not len(acts.pos[layers[0]]) or not len(acts.neg[layers[0]]):
        raise ValueError("the data gave no behaviour rows (empty replies?)")
    sweep = layer_sweep(acts, seed) if len(layers) > 1 else []
    chosen = max(sweep, key=lambda r: r["score"])["layer"] if sweep else layers[0]
    meta = dict(behavior=data.name, name=data.name, default_strength=default_strength(acts.pos[chosen], acts.neg[chosen]),
                provenance={"data": data.name, "data_sha256": data.digest(), "pairs": len(data.pairs),
                            "neutral_items": len(data.neutral), "positions": positions, "seed": seed,
                            "rows": {"positive": int(len(acts.pos[chosen])), "negative": int(len(acts.neg[chosen])),
                                     "background": int(len(acts.background[chosen])),
                                     "neutral": int(len(acts.neutral[chosen]))}})
    if sweep:
        meta["provenance"]["layer_sweep"] = sweep
    t1 = time.perf_counter()
    out = TrainOutcome(flow=None, layer=chosen, activations=acts, sweep=sweep, collect_seconds=collect_seconds)  # type: ignore[arg-type]
    if method == "innsteer":
        from .inn import InnConfig, train_inn

        cfg = inn_config or InnConfig(seed=seed)
        res = train_inn(chosen, acts.pos[chosen], acts.neg[chosen], acts.background[chosen], acts.neutral[chosen],
                        acts.pos_pair, acts.neg_pair, acts.neg_target, llm.model_info, cfg, progress=train_progress,
                        **meta)
        out.flow, out.metrics, out.history, out.latent = res.flow, res.metrics, res.history, res.latent
        out.flow.default_strength = float(f"{INN_DEFAULT_FRACTION * meta['default_strength']:.2g}")
        out.metrics["default_strength"] = out.flow.default_strength
    else:
        out.flow = linear_flow(method, chosen, acts.pos[chosen], acts.neg[chosen], acts.pos_pair, acts.neg_pair,
                               llm.model_info, **meta)
        pv, nv = held_out_mask(acts.pos_pair, seed=seed), held_out_mask(acts.neg_pair, seed=seed)
        probe = LinearProbe.fit(acts.pos[chosen][~pv], acts.neg[chosen][~nv])
        site = out.flow.sites[0]
        # a linear flow's latent is h itself: its gate lives in raw space
        site.gate = Gate.fit(acts.pos[chosen][~pv], acts.neg[chosen][~nv],
                             np.concatenate([acts.pos[chosen][pv], acts.neg[chosen][nv]]), site.delta)
        steered = site.steer(acts.neg[chosen][nv], 1.0)
        out.metrics = {"layer": chosen, "raw_probe_accuracy": probe.accuracy(acts.pos[chosen][pv], acts.neg[chosen][nv]),
                       "flip_rate": float((probe.score(steered) > 0).mean()),
                       "mean_move": float(np.linalg.norm(steered - acts.neg[chosen][nv], axis=1).mean())}
        out.flow.provenance["held_out"] = out.metrics
    out.flow.provenance["layer"] = chosen
    out.train_seconds = time.perf_counter() - t1
    out.metrics["collect_seconds"] = collect_seconds
    out.metrics["collect_tokens"] = acts.n_tokens
    out.metrics["collect_tokens_per_second"] = acts.tokens_per_second
    out.metrics["activations_cached"] = acts.cached
    out.metrics["train_seconds"] = out.train_seconds
    return out


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
    from .native import NativeFlow

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
