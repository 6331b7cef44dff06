"""The through-the-model objective: what the steered model says, scored against the unsteered one.

For a pair (prompt x, positive reply y+, negative reply y-) steered at strength s*a (a > 0 sampled
from a range, s = +1 or -1):
  preference  -log sigmoid( beta * s * (r(y+) - r(y-)) ),  r(y) = sum_t log p_a(y_t) - log p_0(y_t)
              (bi-directional, as in BiPO: +a prefers the positive reply, -a the negative one)
  likelihood  mean_t -log p_a(y_t) of the reply that s prefers (keeps what it says fluent)
On neutral contexts (the model's own replies to prompts whose behaviour must not change):
  preservation  mean_t KL( p_a || p_0 ) over the vocabulary at every reply token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..torch_ops import torch

F = torch.nn.functional


@dataclass
class Weights:
    """How much each term counts; beta scales the preference margin (as in DPO/BiPO)."""

    preference: float = 1.0
    likelihood: float = 0.5  # of the reply the strength's sign prefers: keeps it fluent
    preservation: float = 1.0  # a recipe sets its own (train/behaviors/*.json)
    beta: float = 0.1


def preference(r_pos: Any, r_neg: Any, sign: Any, beta: float) -> Any:
    """Mean bi-directional preference loss over pairs (r: summed log-ratios to the unsteered model)."""
    return -F.logsigmoid(beta * sign * (r_pos - r_neg)).mean()


def likelihood(nll_pos: Any, nll_neg: Any, sign: Any) -> Any:
    """Mean per-token negative log-likelihood of the reply each pair's sign prefers."""
    return torch.where(sign > 0, nll_pos, nll_neg).mean()


def preservation(logp: Any, logp_base: Any) -> Any:
    """Mean over rows of KL(p || p_base) from log-probabilities (rows, vocab)."""
    return (logp.exp() * (logp - logp_base)).sum(-1).mean()


def segment_sums(values: Any, counts: list[int]) -> Any:
    """Sums of consecutive segments of a 1-D tensor (one per sequence)."""
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.zeros(len(counts), dtype=values.dtype).index_add(0, index, values)


def total(parts: dict[str, Any], w: Weights) -> Any:
    return (w.preference * parts.get("preference", 0.0) + w.likelihood * parts.get("likelihood", 0.0)
            + w.preservation * parts.get("preservation", 0.0))
