"""INNSteer on a synthetic nonlinear problem: the steering direction depends on where a point is
(negatives on a parabola, positives offset along its normal), which no single vector can do."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [train] extra")

from innsteer_local.flow import Flow, ModelInfo  # noqa: E402
from innsteer_local.runtime.native import NativeFlow  # noqa: E402
from innsteer_local.train.activations.geometry import GeometryConfig, train_geometry  # noqa: E402
from innsteer_local.train.inn import InnConfig  # noqa: E402
from innsteer_local.train.unit import mean_diff  # noqa: E402

D = 24
MODEL = ModelInfo("synthetic", "synthetic", D, 8)


def curved(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = rng.uniform(-2, 2, n)
    normal = np.stack([-2 * t, np.ones_like(t)], 1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    noise = rng.normal(0, 0.05, (n, D))
    neg = noise.copy()
    neg[:, 0], neg[:, 1] = neg[:, 0] + t, neg[:, 1] + t ** 2
    pos = neg.copy()
    pos[:, :2] += normal
    return pos, neg


def off_support(n: int, rng: np.random.Generator) -> np.ndarray:
    bg = rng.normal(0, 0.3, (n, D))
    bg[:, 0] += 6.0
    return bg


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    pos, neg = curved(4000, rng)
    ids = np.arange(len(pos))
    cfg = GeometryConfig(inn=InnConfig(rank=D, hidden=64, seed=0), epochs=30, lr=1e-3, nll_weight=1.0, seed=0)
    res = train_geometry(3, pos, neg, off_support(2000, rng), np.zeros((0, D)), ids, ids, ids.copy(), MODEL, cfg)
    return res, pos, neg


def knn_says_positive(x, pos, neg, k=7):
    """A nonlinear raw-space classifier: nearest neighbours on the curve's plane."""
    ref = np.concatenate([pos[:2000], neg[:2000]])
    labels = np.r_[np.ones(2000), np.zeros(2000)]
    d2 = ((x[:, None, :2] - ref[None, :, :2]) ** 2).sum(-1)
    return labels[np.argsort(d2, axis=1)[:, :k]].mean(1) > 0.5


def test_inn_steers_where_mean_diff_cannot(trained):
    res, pos, neg = trained
    assert res.metrics["trained"], "training must beat the identity start here"
    rng = np.random.default_rng(1)
    test_pos, test_neg = curved(800, rng)
    site = res.flow.sites[0]
    strength = 1.0 / res.metrics["selected"]["scale"]  # the full learned transport
    steered = site.steer(test_neg, strength)
    move = np.linalg.norm(steered - test_neg, axis=1).mean()
    v = mean_diff(pos, neg)
    linear = test_neg + v / np.linalg.norm(v) * move  # mean-diff at the same average displacement

    assert knn_says_positive(test_pos, pos, neg).mean() > 0.95 and knn_says_positive(test_neg, pos, neg).mean() < 0.05
    inn_rate = knn_says_positive(steered, pos, neg).mean()
    linear_rate = knn_says_positive(linear, pos, neg).mean()
    assert inn_rate >= 0.9
    assert linear_rate <= inn_rate - 0.3

    bg = off_support(500, rng)
    bg_move = np.linalg.norm(site.steer(bg, strength) - bg, axis=1).mean()
    assert bg_move < 0.5 * move  # mean-diff moves every point by `move`


def test_latent_separates_what_raw_cannot(trained):
    m = trained[0].metrics
    assert m["raw_probe_accuracy"] < 0.65  # curved classes: no linear separation in raw space
    assert m["latent_probe_accuracy"] >= m["raw_probe_accuracy"] + 0.1


def test_exported_file_matches_torch(trained, tmp_path):
    res = trained[0]
    path = tmp_path / "syn.gguf"
    res.flow.save(path)
    rows = curved(64, np.random.default_rng(2))[1]
    for strength in (0.5, 1.0, 2.0):
        ref = res.torch_steer(rows, strength)
        native = NativeFlow(path).steer(rows, strength)
        assert np.abs(native - ref).max() / np.abs(ref).max() <= 1e-4
        assert np.linalg.norm(ref - rows, axis=1).mean() > 0.1


def test_identity_start_is_mean_diff():
    rng = np.random.default_rng(3)
    pos, neg = curved(600, rng)
    ids = np.arange(len(pos))
    res = train_geometry(3, pos, neg, off_support(300, rng), np.zeros((0, D)), ids, ids, ids.copy(), MODEL,
                         GeometryConfig(inn=InnConfig(rank=D, hidden=32, seed=0), epochs=0, seed=0))
    assert not res.metrics["trained"]
    rows = curved(50, rng)[1]
    np.testing.assert_allclose(res.flow.sites[0].steer(rows, 1.7), rows + 1.7 * mean_diff(pos, neg), atol=1e-4)


def test_same_seed_same_bytes(tmp_path):
    def run(seed: int) -> bytes:
        rng = np.random.default_rng(5)
        pos, neg = curved(600, rng)
        ids = np.arange(len(pos))
        res = train_geometry(3, pos, neg, off_support(300, rng), np.zeros((0, D)), ids, ids, ids.copy(), MODEL,
                             GeometryConfig(inn=InnConfig(rank=16, hidden=32, seed=seed), epochs=3, seed=seed))
        p = tmp_path / f"s{seed}-{len(list(tmp_path.iterdir()))}.gguf"
        res.flow.save(p)
        return p.read_bytes()

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c
    assert isinstance(Flow.load(tmp_path / "s0-0.gguf"), Flow)
