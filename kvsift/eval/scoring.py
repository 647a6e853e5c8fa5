"""Scoring of generated answers against a sample's references."""

from __future__ import annotations

import math
import re
from typing import Sequence


def _contains(prediction: str, answer: str) -> bool:
    """Case-insensitive match of ``answer`` in ``prediction`` that does not cut through a word or
    number (``1234567`` does not match inside ``12345678``)."""
    pat = rf"(?<![0-9a-z]){re.escape(answer.lower().strip())}(?![0-9a-z])"
    return re.search(pat, prediction.lower()) is not None


def score_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any reference appears in the prediction, else 0.0."""
    if not answers:
        raise ValueError("score_any needs at least one reference answer")
    return 1.0 if any(_contains(prediction, a) for a in answers) else 0.0


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the references that appear in the prediction (RULER's string_match_all)."""
    if not answers:
        raise ValueError("score_all needs at least one reference answer")
    return sum(_contains(prediction, a) for a in answers) / len(answers)


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    if metric == "any":
        return score_any(prediction, answers)
    if metric == "all":
        return score_all(prediction, answers)
    raise ValueError(f"metric {metric!r} is not scored from text (use 'any' or 'all')")


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood in nats)."""
    if n_tokens < 1:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / n_tokens)
