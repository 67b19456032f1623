"""The per-field score and the RL reward."""

from __future__ import annotations

from lightning_fragrance.fragrance.brief import Brief, Intensity, Mood
from lightning_fragrance.fragrance.catalog import Family
from lightning_fragrance.llm.data import brief_to_json
from lightning_fragrance.llm.score import (
    PARSE_REWARD,
    field_score,
    field_scores,
    score_answer,
    set_f1,
)

LABEL = Brief(
    profile={Family.CITRUS: 1.0, Family.GREEN: 0.3},
    intensity=Intensity.EDT,
    include_notes=["Lemon oil"],
    avoid_families=[Family.GOURMAND],
    mood=Mood.FRESH,
)


def test_a_brief_scores_one_against_itself() -> None:
    assert field_score(LABEL, LABEL) == 1.0
    assert score_answer(brief_to_json(LABEL), LABEL).reward == 1.0


def test_set_f1_is_one_for_two_empty_sets_and_zero_without_overlap() -> None:
    assert set_f1([], []) == 1.0
    assert set_f1(["a"], []) == 0.0
    assert set_f1(["a", "b"], ["a"]) == 2 * 0.5 * 1.0 / 1.5


def test_profile_weights_within_the_tolerance_count_as_agreeing() -> None:
    near = LABEL.model_copy(update={"profile": {**LABEL.profile, Family.CITRUS: 0.9}})
    far = LABEL.model_copy(update={"profile": {**LABEL.profile, Family.CITRUS: 0.6}})
    assert field_scores(near, LABEL)["profile"] == 1.0
    assert field_scores(far, LABEL)["profile"] == 0.9


def test_categorical_fields_need_an_exact_match() -> None:
    other = LABEL.model_copy(update={"intensity": Intensity.EDP, "mood": None})
    scores = field_scores(other, LABEL)
    assert scores["intensity"] == 0.0 and scores["mood"] == 0.0 and scores["season"] == 1.0


def test_an_answer_that_needs_repair_earns_nothing_for_json() -> None:
    broken = brief_to_json(LABEL)[:-1] + ",}"  # trailing comma: json-repair would fix it
    result = score_answer(broken, LABEL)
    assert not result.json_valid and result.reward == 0.0


def test_json_that_is_not_a_brief_earns_only_the_parse_reward() -> None:
    result = score_answer('{"profile": {"citrus": 7}}', LABEL)
    assert result.json_valid and not result.brief_valid
    assert result.reward == PARSE_REWARD
