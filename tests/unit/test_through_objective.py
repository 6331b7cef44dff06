"""The through-the-model objective on a tiny transformers model (no GGUF, no llama.cpp): its
gradient equals finite differences, the INN flow starts as the mean-diff vector, training lowers
the objective, and a trained flow's file steers as its torch modules do."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [train] extra")
transformers = pytest.importorskip("transformers", reason="training through the model needs the [train] extra")

from innsteer_local import Flow, ModelInfo  # noqa: E402
from innsteer_local.runtime.prompts import Example  # noqa: E402
from innsteer_local.train.through.hf_model import HFModel  # noqa: E402
from innsteer_local.train.inn import InnConfig, InnFlow, VectorFlow  # noqa: E402
from innsteer_local.train.through.trainer import (  # noqa: E402
    COUPLING_STEPS,
    ThroughConfig,
    ThroughTrainer,
    encode,
    reply_rows,
)

WIDTH, LAYER = 16, 1


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    return HFModel.from_model(model, LAYER)


def texts(seed: int, n: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = list(rng.integers(3, 40, rng.integers(3, 6)))
        reply = list(rng.integers(3, 40, rng.integers(2, 5)))
        out.append(Example(tokens=[1] + [int(t) for t in prompt + reply], start=1 + len(prompt)))
    return out


def data(hf: HFModel):
    pos = [Example(tokens=e.tokens[: e.start] + [5, 6, 7], start=e.start) for e in texts(1, 8)]
    neg = [Example(tokens=e.tokens[: e.start] + [20, 21, 22], start=e.start) for e in texts(1, 8)]
    enc = encode(hf, pos + neg + texts(2, 6), max_reply=4)
    return list(zip(enc[:8], enc[8:16])), enc[16:]


def make_flow(pairs, neutral, blocks: int = 2):
    pos_rows, neg_rows = reply_rows([p for p, _ in pairs]), reply_rows([n for _, n in pairs])
    rows = np.concatenate([pos_rows, neg_rows, reply_rows(neutral)])
    v = pos_rows.mean(0) - neg_rows.mean(0)
    return InnFlow(rows.mean(0), rows.std(0), v, InnConfig(blocks=blocks, hidden=8, seed=3)), v, rows


def test_gradient_matches_finite_differences(tiny):
    pairs, neutral = data(tiny)
    flow, _, _ = make_flow(pairs, neutral)
    with torch.no_grad():  # away from the identity start, so every coupling weight matters
        for p in flow.couplings.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tiny.model.double()
    flow.double()
    # transformers' RMSNorm computes in float32 whatever the input; finite differences need the
    # whole forward in float64
    norms = [m for m in tiny.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms
    for m in norms:
        m.forward = lambda x, m=m: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
    for group in (pairs, neutral):
        for item in (x for g in group for x in (g if isinstance(g, tuple) else (g,))):
            item.hidden, item.base_logp, item.base_final = item.hidden.double(), item.base_logp.double(), item.base_final.double()
    try:
        # every row live: the gradient of the whole objective (by default it stops at the early prompt rows)
        trainer = ThroughTrainer(tiny, flow, pairs, neutral, ThroughConfig(val_fraction=0.0, live_prompt=None))
        a = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64)
        sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
        a_neutral = torch.tensor([1.1, -0.6], dtype=torch.float64)
        params = [flow.delta, *flow.couplings.parameters()]

        def loss(*values):
            with torch.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)
            return trainer.losses(pairs[:3], neutral[:2], a, sign, a_neutral)["loss"]

        # the analytic gradient of the whole objective against central differences
        values = [p.detach().clone() for p in params]
        total = loss(*values)
        grads = torch.autograd.grad(total, params)
        rng = np.random.default_rng(0)
        for p_index, g in enumerate(grads):
            for flat in rng.choice(g.numel(), size=min(3, g.numel()), replace=False):
                eps = 1e-6
                up = [v.clone() for v in values]
                down = [v.clone() for v in values]
                up[p_index].view(-1)[flat] += eps
                down[p_index].view(-1)[flat] -= eps
                numeric = (loss(*up).item() - loss(*down).item()) / (2 * eps)
                assert numeric == pytest.approx(g.view(-1)[flat].item(), rel=1e-4, abs=1e-7)
    finally:
        for m in norms:
            del m.forward
        tiny.model.float()


def test_the_cached_prefix_changes_the_gradient_path_not_the_values(tiny):
    """above() runs the early prompt rows once without gradients and caches their keys and values:
    the objective (and the reply's log-probabilities) are those of one pass over whole texts."""
    pairs, neutral = data(tiny)
    flow, _, _ = make_flow(pairs, neutral)
    with torch.no_grad():
        for p in flow.couplings.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a, sign, a_neutral = torch.tensor([0.7, 1.3, 0.9]), torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.1, -0.6])
    values = []
    for live in (1, 2, None):  # a split right before the reply, one a row earlier, no split at all
        trainer = ThroughTrainer(tiny, flow, pairs, neutral, ThroughConfig(val_fraction=0.0, live_prompt=live))
        with torch.no_grad():
            values.append({k: float(v) for k, v in trainer.losses(pairs[:3], neutral[:2], a, sign, a_neutral).items()})
        lay = tiny.layout([(it.tokens, it.start) for it in neutral], live)
        assert (lay.P > 0) == (live is not None)
    for k in values[0]:
        assert values[0][k] == pytest.approx(values[2][k], rel=1e-5, abs=1e-6)
        assert values[1][k] == pytest.approx(values[2][k], rel=1e-5, abs=1e-6)


def test_identity_start_is_the_mean_diff_vector(tiny):
    pairs, neutral = data(tiny)
    flow, v, rows = make_flow(pairs, neutral, blocks=3)
    vector = VectorFlow(rows.std(0), v)
    h = torch.tensor(rows[:7])
    for a in (1.0, -2.5, 0.3):
        np.testing.assert_allclose(flow.steer(h, a).detach().numpy(), rows[:7] + a * v, rtol=0, atol=1e-4)
        np.testing.assert_allclose(vector.steer(h, a).detach().numpy(), rows[:7] + a * v, rtol=0, atol=1e-4)
    # the written files steer the same way (the NumPy reader of each file)
    info = ModelInfo("tiny", "llama", WIDTH, 3)
    for f in (flow, vector):
        site = Flow(model=info, sites=[f.site(LAYER)]).sites[0]
        np.testing.assert_allclose(site.steer(rows[:7], 1.0), rows[:7] + v, atol=1e-4)


def test_training_lowers_the_held_out_objective(tiny):
    pairs, neutral = data(tiny)
    flow, _, _ = make_flow(pairs, neutral)
    cfg = ThroughConfig(steps=30, coupling_steps=10, pairs_per_step=3, neutral_per_step=2, lr=0.05, coupling_lr=0.01,
                        val_fraction=0.25, checkpoints=1)
    trainer = ThroughTrainer(tiny, flow, pairs, neutral, cfg)
    history, checkpoints = trainer.fit()
    assert history[0]["val_loss"] > history[-1]["val_loss"]
    assert [s for s, _ in checkpoints] == [0, 30, 40]  # the identity start (mean-diff) competes too


def test_exported_flow_steers_like_the_torch_modules(tiny, tmp_path):
    pairs, neutral = data(tiny)
    flow, _, rows = make_flow(pairs, neutral)
    with torch.no_grad():
        for p in flow.couplings.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path / "f.gguf"
    Flow(model=ModelInfo("tiny", "llama", WIDTH, 3), sites=[flow.site(LAYER)]).save(path)
    from innsteer_local.runtime.native import NativeFlow

    native = NativeFlow(path)
    for a in (1.0, -1.5):
        want = flow.steer(torch.tensor(rows[:9]), a).detach().numpy()
        np.testing.assert_allclose(native.steer(rows[:9].astype(np.float32), a), want, rtol=1e-4, atol=1e-4)


def test_a_flow_trains_its_shift_alone_first(tiny):
    """The linear phase: the couplings stay at the identity, so its checkpoint is a vector; the
    coupling phase then moves them. The vector method has only the first phase."""
    pairs, neutral = data(tiny)
    flow, _, rows = make_flow(pairs, neutral)
    start = {k: v.clone() for k, v in flow.couplings.state_dict().items()}
    cfg = ThroughConfig(steps=3, coupling_steps=2, pairs_per_step=3, neutral_per_step=2, val_fraction=0.0)
    trainer = ThroughTrainer(tiny, flow, pairs, neutral, cfg)
    history, checkpoints = trainer.fit()
    assert trainer.linear_steps == 3 and [s for s, _ in checkpoints] == [0, 3, 5] and len(history) == 6
    start_state, linear_state, final_state = (state for _, state in checkpoints)
    assert not torch.equal(start_state["delta"], linear_state["delta"])  # the linear phase moved the shift
    for k, v in start.items():
        assert torch.equal(linear_state[f"couplings.{k}"], v)
    assert any(not torch.equal(final_state[f"couplings.{k}"], v) for k, v in start.items())
    flow.load_state_dict(linear_state)
    h = torch.tensor(rows[:5])
    edit = (flow.steer(h, 1.0) - h).detach().numpy()
    np.testing.assert_allclose(edit, np.broadcast_to(edit[0], edit.shape), atol=1e-5)  # the same shift for every row
    np.testing.assert_allclose((flow.steer(h, 2.0) - h).detach().numpy(), 2 * edit, atol=1e-5)

    vector = VectorFlow(rows.std(0), rows[0] - rows[1])
    v_trainer = ThroughTrainer(tiny, vector, pairs, neutral, cfg)
    _, v_checkpoints = v_trainer.fit()
    assert v_trainer.linear_steps == 0 and [s for s, _ in v_checkpoints] == [3]


def test_encodings_are_read_back_from_the_cache(tiny, tmp_path):
    from innsteer_local.train.through.trainer import EncodingCache

    cache = EncodingCache(tmp_path / "enc")
    examples = texts(5, 6)
    first = encode(tiny, examples, max_reply=4, cache=cache)
    assert len(list((tmp_path / "enc").glob("*.safetensors"))) == 6

    def no_model(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    below, tiny.below = tiny.below, no_model
    try:
        again = encode(tiny, examples, max_reply=4, cache=cache)
    finally:
        tiny.below = below
    for a, b in zip(first, again):
        assert a.tokens == b.tokens and a.start == b.start
        for name in ("hidden", "base_logp", "base_final"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    # one new text is encoded, the others still come from the cache
    mixed = encode(tiny, examples[:2] + texts(9, 1), max_reply=4, cache=cache)
    assert len(mixed) == 3 and len(list((tmp_path / "enc").glob("*.safetensors"))) == 7


def test_the_dequantized_copy_loads_the_same_model(tmp_path):
    from innsteer_local.train.through.hf_model import _load_copy, _save_copy

    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    _save_copy(model, tmp_path / "copy")
    loaded = _load_copy(tmp_path / "copy")
    assert loaded is not None
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight  # still tied
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    (tmp_path / "copy" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert _load_copy(tmp_path / "copy") is None  # a damaged copy is rebuilt, not trusted
    assert _load_copy(tmp_path / "nothing") is None


def test_couplings_train_by_default_only_where_the_data_has_neutral_items(tiny):
    """Unset, the coupling phase runs for a selective behaviour (data with neutral items) and not
    for an always-on one, whose flow is its linear phase; given, it runs for either."""
    pairs, neutral = data(tiny)
    assert neutral
    flow, _, _ = make_flow(pairs, neutral)
    cfg = ThroughConfig(steps=3, pairs_per_step=3, neutral_per_step=2, val_fraction=0.0)
    assert cfg.coupling_steps is None
    selective = ThroughTrainer(tiny, flow, pairs, neutral, cfg)
    assert selective.linear_steps == 3 and selective.total_steps == 3 + COUPLING_STEPS
    always_on = ThroughTrainer(tiny, flow, pairs, [], cfg)
    assert always_on.linear_steps == 3 and always_on.total_steps == 3
    _, checkpoints = always_on.fit()
    assert [s for s, _ in checkpoints] == [0, 3]  # the start and the linear phase
    asked = ThroughTrainer(tiny, flow, pairs, [], ThroughConfig(steps=3, coupling_steps=2, val_fraction=0.0))
    assert asked.total_steps == 5
