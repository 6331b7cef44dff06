"""The activation-space objective for INN flows (`train --objective geometry`; the default trains
through the model, train/through/trainer.py). It never sees the logits: kept for models transformers
cannot load and as the baseline the through-the-model objective is measured against.

phi = InnFlow on a rank-r subspace (the first basis vector is the normalised mean difference, the
rest the top principal directions). Objective, all distances in raw activation space relative to
|v|^2, v = mean difference:
  transport  |steer(h_neg) - target(h_neg)|^2  the paired positive row (or the pair's positive mean)
  background |steer(h_bg) - h_bg|^2             rows off the class support: prompts, generic chat,
                                                neutral items (weighted neutral_weight)
  density    class-conditional unit-Gaussian NLL in the latent, positive mean = negative mean + delta
Training is kept only if it beats the identity start (= mean-diff) on held-out steering proxies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ...flow import Flow, Gate, ModelInfo
from ..inn import InnConfig, InnFlow
from ..torch_ops import torch
from ..unit import mean_diff
from .linear import LinearProbe, pair_targets


@dataclass
class GeometryConfig:
    inn: InnConfig = field(default_factory=lambda: InnConfig(rank=64, blocks=4, hidden=128))
    epochs: int = 60
    batch: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-3
    transport_weight: float = 1.0
    background_weight: float = 0.2
    neutral_weight: float = 2.0
    nll_weight: float = 0.02
    val_fraction: float = 0.2
    background_penalty: float = 0.5  # in the selection score: flip rate - penalty * background move
    seed: int = 0


@dataclass
class TrainResult:
    flow: Flow
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    latent: dict[str, np.ndarray] = field(default_factory=dict)  # held-out latents for the report
    torch_steer: Optional[Callable[[np.ndarray, float], np.ndarray]] = None


def _split(n_pairs: int, frac: float, seed: int) -> np.ndarray:
    """A boolean mask of held-out pairs."""
    rng = np.random.default_rng(seed)
    held = np.zeros(n_pairs, dtype=bool)
    k = max(1, int(round(n_pairs * frac))) if n_pairs > 1 else 0
    held[rng.permutation(n_pairs)[:k]] = True
    return held


def build_basis(pos: np.ndarray, neg: np.ndarray, targets: np.ndarray, background: np.ndarray, mu: np.ndarray,
                sd: np.ndarray, rank: int) -> np.ndarray:
    """Orthonormal (rank, n) rows in normalised coordinates: v/sd first (so mean-diff lies exactly
    in the span), then alternately the top principal directions of the per-row pair differences
    (where steering must act) and of the data (where the flow reads its position from)."""
    vn = mean_diff(pos, neg).astype(np.float64) / sd
    rng = np.random.default_rng(0)

    def top(x: np.ndarray, k: int) -> np.ndarray:
        x = x[rng.permutation(len(x))[:4000]]
        return np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:k]

    diffs = top((np.asarray(targets, np.float64) - neg) / sd, rank)
    data = top((np.concatenate([pos, neg, background]).astype(np.float64) - mu) / sd, rank)
    inter = [row for pair in zip(diffs, data) for row in pair] + list(diffs[len(data):]) + list(data[len(diffs):])
    filler = rng.normal(size=(rank, len(vn)))  # only used when there are fewer rows than rank
    cand = np.concatenate([vn[None] / np.linalg.norm(vn), np.array(inter).reshape(-1, len(vn)), filler])
    q, _ = np.linalg.qr(cand.T)
    q = q[:, :rank].T
    if q[0] @ vn < 0:
        q[0] = -q[0]
    return q


def train_geometry(layer: int, pos: np.ndarray, neg: np.ndarray, background: np.ndarray, neutral: np.ndarray,
              pos_pair: np.ndarray, neg_pair: np.ndarray, neg_target: np.ndarray, model: ModelInfo,
              cfg: Optional[GeometryConfig] = None, progress: Optional[Callable[[int, int, dict], None]] = None,
              unit: float = 1.0, **meta: Any) -> TrainResult:
    """Trains phi at one layer; returns the flow (or the identity start if training does not beat
    it on the held-out proxies), the loss history and held-out metrics. At strength 1 the flow
    moves negatives by `unit` times |mean-diff| on average (train() passes the common unit)."""
    cfg = cfg or GeometryConfig()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    n_pairs = int(max(pos_pair.max(initial=-1), neg_pair.max(initial=-1)) + 1)
    held = _split(n_pairs, cfg.val_fraction, cfg.seed)
    pos_val, neg_val = held[pos_pair], held[neg_pair]
    rng = np.random.default_rng(cfg.seed)
    bg_val = rng.random(len(background)) < cfg.val_fraction
    neu_val = rng.random(len(neutral)) < cfg.val_fraction

    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    targets = pair_targets(f64(pos), f64(neg), pos_pair, neg_pair, neg_target)
    v = mean_diff(pos, neg).astype(np.float64)  # the mean-diff baseline's vector, exactly
    v_norm = float(np.linalg.norm(v))
    rows_all = np.concatenate([pos, neg, background]).astype(np.float64)
    mu, sd = rows_all.mean(0), np.maximum(rows_all.std(0), 1e-4)
    rank = min(cfg.inn.rank or 64, model.n_embd)
    basis = build_basis(pos, neg, targets, background[~bg_val], mu, sd, rank)
    y_all = ((rows_all - mu) / sd) @ basis.T
    y_mu, y_sd = y_all.mean(0), np.maximum(y_all.std(0), 1e-4)  # unit scale for the couplings' density term
    to_y = lambda h: (((f64(h) - mu) / sd) @ basis.T - y_mu) / y_sd  # noqa: E731
    lift = (basis * sd) * y_sd[:, None]  # dy @ lift = raw displacement
    gram = torch.tensor(lift @ lift.T, dtype=torch.float32)

    def T(a):
        return torch.tensor(np.asarray(a), dtype=torch.float32)

    y_pos, y_neg, y_tgt = T(to_y(pos)), T(to_y(neg)), T(to_y(targets))
    y_bg, y_neu = T(to_y(background)), T(to_y(neutral)) if len(neutral) else torch.zeros(0, rank)
    flow = InnFlow(mu, sd, v, cfg.inn, basis=basis, y_mu=y_mu, y_sd=y_sd)
    net, delta = flow.couplings, flow.delta
    m_neg = torch.nn.Parameter(net.forward(y_neg[T(~neg_val).bool()])[0].mean(0).detach())
    m_bg = torch.nn.Parameter(net.forward(y_bg)[0].mean(0).detach())
    opt = torch.optim.AdamW([*flow.parameters(), m_neg, m_bg], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def steer_y(y, scale=1.0):
        z, _ = net.forward(y)
        return net.inverse(z + scale * delta)

    def raw_sq(dy):
        return ((dy @ gram) * dy).sum(1)

    probe = LinearProbe.fit(pos[~pos_val], neg[~neg_val])
    neg_tr = np.flatnonzero(~neg_val)
    bg_tr, neu_tr = np.flatnonzero(~bg_val), np.flatnonzero(~neu_val)
    lift_t = T(lift)

    def evaluate() -> dict[str, float]:
        """Held-out proxies at the calibrated strength (negatives move |v| on average)."""
        with torch.no_grad():
            scale = _calibrate(lambda s: raw_sq(steer_y(y_neg[neg_tr[:2000]], s) - y_neg[neg_tr[:2000]]).sqrt().mean().item(),
                               v_norm)
            yv = y_neg[T(neg_val).bool()]
            steered_raw = f64(neg[neg_val]) + ((steer_y(yv, scale) - yv) @ lift_t).double().numpy()
            flip = float((probe.score(steered_raw) > 0).mean()) if len(yv) else float("nan")
            ybg = y_bg[T(bg_val).bool()]
            bg_move = float(raw_sq(steer_y(ybg, scale) - ybg).sqrt().mean().item() / v_norm) if len(ybg) else 0.0
            yn = y_neu[T(neu_val).bool()] if len(y_neu) else y_neu
            neu_move = float(raw_sq(steer_y(yn, scale) - yn).sqrt().mean().item() / v_norm) if len(yn) else float("nan")
            tgt_err = float(raw_sq(steer_y(yv, scale) - y_tgt[T(neg_val).bool()]).mean().item() / v_norm ** 2)
        return {"flip_rate": flip, "background_move": bg_move, "neutral_move": neu_move, "transport_error": tgt_err,
                "scale": scale, "score": flip - cfg.background_penalty * (bg_move if len(yn) == 0 else 0.5 * (bg_move + neu_move))}

    start_metrics = evaluate()
    best = (start_metrics["score"], _state(flow), 0, start_metrics)
    history: list[dict[str, float]] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    n_steps = max(1, len(neg_tr) // cfg.batch)
    for epoch in range(1, cfg.epochs + 1):
        sums = {"transport": 0.0, "background": 0.0, "nll": 0.0}
        for _ in range(n_steps):
            i_neg = T(neg_tr)[torch.randint(len(neg_tr), (cfg.batch,), generator=gen)].long()
            i_bg = T(bg_tr)[torch.randint(len(bg_tr), (cfg.batch,), generator=gen)].long()
            yn, yt, yb = y_neg[i_neg], y_tgt[i_neg], y_bg[i_bg]
            zn, ldn = net.forward(yn)
            zb, ldb = net.forward(yb)
            l_transport = raw_sq(net.inverse(zn + delta) - yt).mean() / v_norm ** 2
            l_background = raw_sq(net.inverse(zb + delta) - yb).mean() / v_norm ** 2
            if len(neu_tr):
                i_neu = T(neu_tr)[torch.randint(len(neu_tr), (min(cfg.batch, len(neu_tr)),), generator=gen)].long()
                yu = y_neu[i_neu]
                zu, _ = net.forward(yu)
                l_background = l_background + cfg.neutral_weight * raw_sq(net.inverse(zu + delta) - yu).mean() / v_norm ** 2
            zp, ldp = net.forward(y_pos[i_neg.clamp(max=len(y_pos) - 1)])
            l_nll = (0.5 * ((zn - m_neg) ** 2).sum(1) - ldn).mean() + (0.5 * ((zp - m_neg - delta) ** 2).sum(1) - ldp).mean() \
                + (0.5 * ((zb - m_bg) ** 2).sum(1) - ldb).mean()
            loss = cfg.transport_weight * l_transport + cfg.background_weight * l_background + cfg.nll_weight * l_nll / rank
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(flow.parameters()), 5.0)
            opt.step()
            sums["transport"] += l_transport.item() / n_steps
            sums["background"] += l_background.item() / n_steps
            sums["nll"] += l_nll.item() / rank / n_steps
        m = evaluate()
        history.append({"epoch": epoch, **sums, **{f"val_{k}": v for k, v in m.items()}})
        if m["score"] > best[0]:
            best = (m["score"], _state(flow), epoch, m)
        if progress:
            progress(epoch, cfg.epochs, history[-1])

    score, state, best_epoch, best_metrics = best
    flow.load_state_dict(state)
    trained = best_epoch > 0
    scale = best_metrics["scale"]
    site = flow.site(layer, delta_scale=scale)
    final_delta = site.delta
    with torch.no_grad():
        z_pos = net.forward(y_pos)[0].double().numpy()
        z_neg = net.forward(y_neg)[0].double().numpy()
        z_bg = net.forward(y_bg)[0].double().numpy()
    site.gate = Gate.fit(z_pos[~pos_val], z_neg[~neg_val], np.concatenate([z_pos[pos_val], z_neg[neg_val]]), final_delta)
    # scaled after the gate, which reads only the shift's direction
    site.delta = (site.delta * unit).astype(np.float32)

    # held-out separability: raw-space vs latent-space probes
    raw_acc = probe.accuracy(pos[pos_val], neg[neg_val])
    latent_probe = LinearProbe.fit(z_pos[~pos_val], z_neg[~neg_val])
    latent_acc = latent_probe.accuracy(z_pos[pos_val], z_neg[neg_val])
    y_probe = LinearProbe.fit(y_pos.double().numpy()[~pos_val], y_neg.double().numpy()[~neg_val])
    f_pos, f_neg = site.forward(pos), site.forward(neg)  # the full n_embd-wide latent
    full_probe = LinearProbe.fit(f_pos[~pos_val], f_neg[~neg_val])
    metrics = {
        "layer": layer, "trained": trained, "best_epoch": best_epoch, "rank": rank,
        "held_out_pairs": int(held.sum()), "train_pairs": int((~held).sum()),
        "rows": {"pos": len(pos), "neg": len(neg), "background": len(background), "neutral": len(neutral)},
        "mean_diff_norm": v_norm,
        "identity_start": start_metrics, "selected": best_metrics,
        # linear probes on held-out pairs: raw h vs the full latent phi(h) (both n_embd wide), and
        # inside the rank-r subspace: its raw coordinates vs phi's coordinates there
        "raw_probe_accuracy": raw_acc, "latent_probe_accuracy": full_probe.accuracy(f_pos[pos_val], f_neg[neg_val]),
        "subspace_raw_probe_accuracy": y_probe.accuracy(y_pos.double().numpy()[pos_val], y_neg.double().numpy()[neg_val]),
        "subspace_latent_probe_accuracy": latent_acc,
        "config": _config(cfg),
    }
    if not trained:
        metrics["note"] = "training did not beat the identity start on the held-out proxies; shipped the start (= mean-diff)"
    prov = dict(meta.pop("provenance", {}))
    prov.update({"method": "innsteer", "objective": "geometry", "layer": layer, "hyperparameters": _config(cfg),
                 "held_out": {k: metrics[k] for k in ("raw_probe_accuracy", "latent_probe_accuracy")} | {
                     "identity_start": start_metrics, "selected": best_metrics, "best_epoch": best_epoch}})
    exported = Flow(model=model, sites=[site], method="innsteer", provenance=prov, **meta)
    latent = {"pos": z_pos[pos_val], "neg": z_neg[neg_val], "background": z_bg[bg_val]}

    def torch_steer(h: np.ndarray, strength: float) -> np.ndarray:
        """The trained torch modules' own steering map (to check the exported file against)."""
        with torch.no_grad():
            return flow.steer(T(h), strength * scale * unit).double().numpy()

    return TrainResult(flow=exported, history=history, metrics=metrics, seconds=time.perf_counter() - t_start, latent=latent,
                       torch_steer=torch_steer)


def _calibrate(move: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 4.0) -> float:
    """The shift scale s with move(s) = target (move grows with s), by bisection."""
    while move(hi) < target and hi < 1e3:
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if move(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _state(flow: InnFlow) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _config(cfg: GeometryConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out.update(out.pop("inn"))
    return out
