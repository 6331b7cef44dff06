"""Training INNSteer flows (needs torch: `pip install innsteer-local[train]`).

phi at one layer = normalise (data mean/std) -> rank-r subspace (the first basis vector is the
normalised mean difference, the rest the top principal directions) -> K affine couplings with
soft-clamped log-scales and zero-initialised output layers, separated by fixed orthogonal mixing.
At initialisation phi is linear and the calibrated shift reproduces mean-diff exactly, so training
starts from linear steering and is kept only if it beats it on held-out steering proxies.

Objective (all distances in raw activation space, relative to |v|^2, v = mean difference):
  transport  |steer(h_neg) - target(h_neg)|^2  the paired positive row (or the pair's positive mean)
  background |steer(h_bg) - h_bg|^2             rows off the class support: prompts, generic chat,
                                                neutral items (weighted neutral_weight)
  density    class-conditional unit-Gaussian NLL in the latent, positive mean = negative mean + delta
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..flow import Affine, Coupling, Flow, Gate, Linear, ModelInfo, Site, Subspace
from .linear import LinearProbe, mean_diff, pair_targets


@dataclass
class InnConfig:
    rank: int = 64
    blocks: int = 4
    hidden: int = 128
    clamp: float = 2.0
    activation: str = "silu"
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


def _torch():
    try:
        import torch
    except ImportError:
        from ..errors import InnsteerError

        raise InnsteerError("training INN flows needs torch: pip install 'innsteer-local[train]'") from None
    return torch


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


class _Model:
    """The torch side of one site: y (subspace coordinates) -> z (latent) and back."""

    def __init__(self, torch, rank: int, cfg: InnConfig):
        nn = torch.nn
        g = torch.Generator().manual_seed(cfg.seed)
        self.torch = torch
        self.d1, self.d2 = rank // 2, rank - rank // 2
        self.couplings = nn.ModuleList()
        self.mixes: list[Any] = []
        act = {"silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU}[cfg.activation]
        for b in range(cfg.blocks):
            first = nn.Linear(self.d1, cfg.hidden)
            last = nn.Linear(cfg.hidden, 2 * self.d2)
            with torch.no_grad():
                first.weight.copy_(torch.randn(first.weight.shape, generator=g) / math.sqrt(self.d1))
                first.bias.zero_()
                last.weight.zero_()  # zero output: the coupling starts as the identity
                last.bias.zero_()
            self.couplings.append(nn.Sequential(first, act(), last))
            if b + 1 < cfg.blocks:
                q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
                self.mixes.append(q.to(torch.float32))
        self.clamp = cfg.clamp

    def parameters(self):
        return self.couplings.parameters()

    def _coupling(self, k: int, x, inverse: bool):
        torch = self.torch
        h = self.couplings[k](x[:, : self.d1])
        s = self.clamp * torch.tanh(h[:, : self.d2] / self.clamp)
        t = h[:, self.d2:]
        x2 = x[:, self.d1:]
        x2 = (x2 - t) * torch.exp(-s) if inverse else x2 * torch.exp(s) + t
        return torch.cat([x[:, : self.d1], x2], dim=1), s.sum(1)

    def forward(self, y):
        logdet = 0.0
        for k in range(len(self.couplings)):
            y, ld = self._coupling(k, y, inverse=False)
            logdet = logdet + ld
            if k < len(self.mixes):
                y = y @ self.mixes[k].T
        return y, logdet

    def inverse(self, z):
        for k in reversed(range(len(self.couplings))):
            if k < len(self.mixes):
                z = z @ self.mixes[k]
            z, _ = self._coupling(k, z, inverse=True)
        return z

    def state(self) -> list:
        return [p.detach().clone() for p in self.couplings.parameters()]

    def load(self, state: list) -> None:
        with self.torch.no_grad():
            for p, v in zip(self.couplings.parameters(), state):
                p.copy_(v)


def train_inn(layer: int, pos: np.ndarray, neg: np.ndarray, background: np.ndarray, neutral: np.ndarray,
              pos_pair: np.ndarray, neg_pair: np.ndarray, neg_target: np.ndarray, model: ModelInfo,
              cfg: InnConfig = InnConfig(), progress: Optional[Callable[[int, int, dict], None]] = None,
              **meta: Any) -> TrainResult:
    """Trains phi at one layer; returns the flow (or the identity start if training does not beat
    it on the held-out proxies), the loss history and held-out metrics."""
    torch = _torch()
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
    rank = min(cfg.rank, model.n_embd)
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
    net = _Model(torch, rank, cfg)
    c_v = T((basis @ (v / sd)) / y_sd)[None]
    with torch.no_grad():
        delta0 = net.forward(c_v)[0][0] - net.forward(torch.zeros_like(c_v))[0][0]
    delta = torch.nn.Parameter(delta0.clone())
    m_neg = torch.nn.Parameter(net.forward(y_neg[T(~neg_val).bool()])[0].mean(0).detach())
    m_bg = torch.nn.Parameter(net.forward(y_bg)[0].mean(0).detach())
    opt = torch.optim.AdamW([*net.parameters(), delta, m_neg, m_bg], lr=cfg.lr, weight_decay=cfg.weight_decay)

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
    best = (start_metrics["score"], net.state(), delta.detach().clone(), 0, start_metrics)
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
            torch.nn.utils.clip_grad_norm_([*net.parameters(), delta], 5.0)
            opt.step()
            sums["transport"] += l_transport.item() / n_steps
            sums["background"] += l_background.item() / n_steps
            sums["nll"] += l_nll.item() / rank / n_steps
        m = evaluate()
        history.append({"epoch": epoch, **sums, **{f"val_{k}": v for k, v in m.items()}})
        if m["score"] > best[0]:
            best = (m["score"], net.state(), delta.detach().clone(), epoch, m)
        if progress:
            progress(epoch, cfg.epochs, history[-1])

    score, state, best_delta, best_epoch, best_metrics = best
    net.load(state)
    with torch.no_grad():
        delta.copy_(best_delta)
    trained = best_epoch > 0
    scale = best_metrics["scale"]
    ops: list[Any] = [Affine(scale=(1.0 / sd).astype(np.float32), bias=(-mu / sd).astype(np.float32)),
                      Subspace(basis=basis.astype(np.float32)),
                      Affine(scale=(1.0 / y_sd).astype(np.float32), bias=(-y_mu / y_sd).astype(np.float32))]
    for k, seq in enumerate(net.couplings):
        ops.append(Coupling(weights=[seq[0].weight.detach().numpy().copy(), seq[2].weight.detach().numpy().copy()],
                            biases=[seq[0].bias.detach().numpy().copy(), seq[2].bias.detach().numpy().copy()],
                            clamp=cfg.clamp, activation=cfg.activation))
        if k < len(net.mixes):
            q = net.mixes[k].numpy()
            ops.append(Linear(matrix=q.copy(), matrix_inv=q.T.copy(), bias=np.zeros(rank, np.float32)))
    final_delta = (best_delta.numpy() * scale).astype(np.float32)
    with torch.no_grad():
        z_pos = net.forward(y_pos)[0].double().numpy()
        z_neg = net.forward(y_neg)[0].double().numpy()
        z_bg = net.forward(y_bg)[0].double().numpy()
    gate = Gate.fit(z_pos[~pos_val], z_neg[~neg_val], np.concatenate([z_pos[pos_val], z_neg[neg_val]]), final_delta)
    site = Site(layer=layer, ops=ops, delta=final_delta, gate=gate)

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
        "config": asdict(cfg),
    }
    if not trained:
        metrics["note"] = "training did not beat the identity start on the held-out proxies; shipped the start (= mean-diff)"
    prov = dict(meta.pop("provenance", {}))
    prov.update({"method": "innsteer", "layer": layer, "hyperparameters": asdict(cfg),
                 "held_out": {k: metrics[k] for k in ("raw_probe_accuracy", "latent_probe_accuracy")} | {
                     "identity_start": start_metrics, "selected": best_metrics, "best_epoch": best_epoch}})
    flow = Flow(model=model, sites=[site], method="innsteer", provenance=prov, **meta)
    latent = {"pos": z_pos[pos_val], "neg": z_neg[neg_val], "background": z_bg[bg_val]}

    def torch_steer(h: np.ndarray, strength: float) -> np.ndarray:
        """The trained torch modules' own steering map (to check the exported file against)."""
        with torch.no_grad():
            y = T(to_y(h))
            moved = net.inverse(net.forward(y)[0] + strength * scale * best_delta) - y
            return f64(h) + (moved.double() @ torch.tensor(lift)).numpy()

    return TrainResult(flow=flow, history=history, metrics=metrics, seconds=time.perf_counter() - t_start, latent=latent,
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
