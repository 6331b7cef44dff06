"""Activation capture through llama.cpp with the native callback: the same GGUF, quantisation
and forward pass that steering later runs in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .errors import SteeringError


def render_chat(llm: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Formats messages with the model's own chat template (plain 'User:/Assistant:' without one)."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(key: str) -> str:
        tid = llm.metadata.get(key)
        return llm.detokenize([int(tid)], special=True).decode("utf-8", errors="ignore") if tid is not None else ""

    fmt = Jinja2ChatFormatter(template=template, eos_token=token_text("tokenizer.ggml.eos_token_id"),
                              bos_token=token_text("tokenizer.ggml.bos_token_id"),
                              add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages).prompt


@dataclass
class Example:
    """One text to run through the model; `start` is the first token position that carries the
    behaviour (the reply), so rows [start:] are the completion tokens."""

    tokens: list[int]
    start: int


def chat_example(llm: Any, user: str, reply: str, system: Optional[str] = None) -> Example:
    """User turn + assistant reply, templated; the reply's tokens are the completion positions."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    prefix = render_chat(llm, messages, add_generation_prompt=True)
    head = llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=True)
    full = llm.tokenize((prefix + reply).encode("utf-8"), add_bos=True, special=True)
    start = len(head)
    if full[:start] != head:  # a merge across the boundary: fall back to the common prefix
        start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
    return Example(tokens=full, start=min(start, len(full) - 1))


def text_example(llm: Any, prefix: str, completion: str) -> Example:
    """Plain text (no template), for base models."""
    head = llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=False)
    full = llm.tokenize((prefix + completion).encode("utf-8"), add_bos=True, special=False)
    return Example(tokens=full, start=min(len(head), len(full) - 1))


def capture(llm: Any, examples: Sequence[Example], layers: Iterable[int], positions: str = "completion",
            progress: Any = None) -> dict[int, list[np.ndarray]]:
    """Runs each example and returns, per layer, one (rows, n_embd) array per example.

    positions: 'completion' (tokens from Example.start), 'last' (final token) or 'all'.
    """
    if positions not in ("completion", "last", "all"):
        raise ValueError(f"positions must be completion, last or all; got {positions!r}")
    layers = sorted(set(int(l) for l in layers))
    st = llm.native_steerer
    last_layer = llm.model_info.n_layer - 1
    if last_layer in layers:
        raise SteeringError(f"layer {last_layer} is the last layer: llama.cpp keeps only output rows there")
    for l in layers:
        st.capture(l, post=False, on=True)
    out: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    try:
        for ex in examples:
            st.clear_captured()
            llm.reset()
            llm.eval(ex.tokens)
            for l in layers:
                rows = st.captured(l)
                if rows.shape[0] != len(ex.tokens):
                    raise SteeringError(f"captured {rows.shape[0]} rows at layer {l} for {len(ex.tokens)} tokens")
                sel = rows[ex.start:] if positions == "completion" else rows[-1:] if positions == "last" else rows
                out[l].append(sel.copy())
            if progress is not None:
                progress.update(1)
    finally:
        for l in layers:
            st.capture(l, post=False, on=False)
        st.clear_captured()
        llm.reset()
    return out
