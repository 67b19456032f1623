"""How well a predicted brief agrees with the labelled one, field by field, and the RL reward.

The field score (docs/brief-llm.md) is the mean of seven per-field scores in [0, 1]:

- ``intensity``, ``mood``, ``season``: exact match (``None`` matches ``None``);
- ``include_notes``, ``avoid_notes``, ``avoid_families``: set F1 (two empty sets agree: 1.0);
- ``profile``: the fraction of the ten families whose weight is within ``PROFILE_TOLERANCE``
  of the label's (absent families weigh 0).

The reward of an answer (RL) adds how it was written: it must parse as JSON *without repair*
and validate as a `Brief` before the field score counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lightning_fragrance.fragrance.brief import Brief
from lightning_fragrance.fragrance.catalog import FAMILIES

# Label weights are 0, 0.3, 0.6 and 1.0: a tolerance under half their spacing tells them apart.
PROFILE_TOLERANCE = 0.15
FIELDS = (
    "profile",
    "intensity",
    "include_notes",
    "avoid_notes",
    "avoid_families",
    "mood",
    "season",
)
# Reward = PARSE_REWARD (valid JSON, no repair) + VALID_REWARD (a Brief) + SCORE_REWARD x score.
PARSE_REWARD, VALID_REWARD, SCORE_REWARD = 0.2, 0.2, 0.6


def set_f1(predicted: Iterable[Any], expected: Iterable[Any]) -> float:
    """F1 of two sets; 1.0 when both are empty (nothing asked, nothing given)."""
    pred, gold = set(predicted), set(expected)
    if not pred and not gold:
        return 1.0
    hits = len(pred & gold)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(pred), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def profile_agreement(
    predicted: Brief, expected: Brief, tolerance: float = PROFILE_TOLERANCE
) -> float:
    """Fraction of families whose predicted weight is within `tolerance` of the label's."""
    close = sum(abs(predicted.profile[f] - expected.profile[f]) <= tolerance for f in FAMILIES)
    return close / len(FAMILIES)


def field_scores(predicted: Brief, expected: Brief) -> dict[str, float]:
    """The seven per-field scores, each in [0, 1]."""
    return {
        "profile": profile_agreement(predicted, expected),
        "intensity": float(predicted.intensity is expected.intensity),
        "include_notes": set_f1(predicted.include_notes, expected.include_notes),
        "avoid_notes": set_f1(predicted.avoid_notes, expected.avoid_notes),
        "avoid_families": set_f1(predicted.avoid_families, expected.avoid_families),
        "mood": float(predicted.mood == expected.mood),
        "season": float(predicted.season == expected.season),
    }


def field_score(predicted: Brief, expected: Brief) -> float:
    """Mean of `field_scores`: 1.0 for a brief that agrees with the label in every field."""
    scores = field_scores(predicted, expected)
    return sum(scores.values()) / len(scores)


@dataclass(frozen=True)
class AnswerScore:
    """How one answer of the model fared.

    Attributes:
        json_valid: `json.loads` accepted the answer as it stands (an object, no repair).
        brief_valid: the object validated as a `Brief`.
        score: field score against the label (0 when no brief).
        brief: the validated brief, if any.
    """

    json_valid: bool
    brief_valid: bool
    score: float
    brief: Brief | None = None

    @property
    def reward(self) -> float:
        """The RL reward in [0, 1]."""
        return (
            PARSE_REWARD * self.json_valid
            + VALID_REWARD * self.brief_valid
            + SCORE_REWARD * self.score
        )


def parse_answer(answer: str) -> tuple[bool, Brief | None]:
    """(parsed as a JSON object without repair, the validated `Brief` or None)."""
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError:
        return False, None
    if not isinstance(obj, dict):
        return False, None
    try:
        return True, Brief.model_validate(obj)
    except (ValidationError, ValueError, TypeError):
        return True, None


def score_answer(answer: str, expected: Brief) -> AnswerScore:
    """Score the model's raw answer against the labelled brief (strict: no JSON repair)."""
    json_valid, brief = parse_answer(answer.strip())
    if brief is None:
        return AnswerScore(json_valid=json_valid, brief_valid=False, score=0.0)
    return AnswerScore(True, True, field_score(brief, expected), brief)
