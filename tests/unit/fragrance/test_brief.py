"""`Brief` validation and the English / Korean rule parser."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lightning_fragrance.fragrance import Brief, BriefError, Family, Intensity, parse_brief
from lightning_fragrance.fragrance.brief import (
    CONCENTRATION_RANGES,
    MAX_BRIEF_KEYWORDS,
    MAX_BRIEF_TEXT_CHARS,
    Mood,
    Season,
)

# text, families that must be among the top three, families that must be ruled out
PARSE_TABLE = [
    ("a fresh citrus scent for summer, not too sweet", {Family.CITRUS}, {Family.GOURMAND}),
    ("romantic floral perfume with rose and jasmine", {Family.FLORAL}, set()),
    ("warm woody amber for winter evenings", {Family.WOODY, Family.AMBER}, set()),
    ("spicy and smoky incense, no vanilla", {Family.SPICY, Family.AMBER}, set()),
    ("calm lavender and herbs", {Family.AROMATIC}, set()),
    ("sweet vanilla and caramel gourmand", {Family.GOURMAND}, set()),
    ("여름에 어울리는 상큼한 시트러스 향수, 너무 달지 않게", {Family.CITRUS}, {Family.GOURMAND}),
    ("플로럴하고 로맨틱한 봄 향수", {Family.FLORAL}, set()),
    ("따뜻한 우디 향, 겨울용", {Family.WOODY}, set()),
    ("과일향 가득한 프루티 향수", {Family.FRUITY}, set()),
    ("머스크와 파우더리한 느낌", {Family.MUSK}, set()),
    ("스파이시한 후추와 시나몬", {Family.SPICY}, set()),
    ("그린 풀잎 향", {Family.GREEN}, set()),
    ("바닐라 구르망", {Family.GOURMAND}, set()),
]


@pytest.mark.parametrize(("text", "expected", "ruled_out"), PARSE_TABLE)
def test_parse_brief_finds_the_expected_families(
    text: str, expected: set[Family], ruled_out: set[Family]
) -> None:
    brief = parse_brief(text)
    top = set(brief.top_families(3))
    assert expected <= top, f"{text!r}: top families {top}"
    for family in ruled_out:
        assert brief.profile[family] == 0.0
        assert family in brief.avoid_families


def test_negated_material_is_avoided_without_ruling_out_its_family() -> None:
    brief = parse_brief("amber and gourmand but no vanilla")
    assert brief.avoid_notes == ["Vanillin"]
    assert brief.profile[Family.GOURMAND] == 1.0
    brief_ko = parse_brief("앰버 향수, 바닐라는 빼고")
    assert brief_ko.avoid_notes == ["Vanillin"]


def test_longest_keyword_wins_so_rosemary_is_not_read_as_rose() -> None:
    for text in ("rosemary", "로즈마리"):
        brief = parse_brief(text)
        assert brief.include_notes == ["Rosemary oil"]
        assert brief.profile[Family.FLORAL] == 0.0


def test_mood_season_and_intensity_keywords_are_read() -> None:
    brief = parse_brief("a strong, elegant perfume for autumn")
    assert (brief.mood, brief.season, brief.intensity) == (
        Mood.ELEGANT,
        Season.AUTUMN,
        Intensity.PARFUM,
    )
    assert brief.concentration_range == CONCENTRATION_RANGES[Intensity.PARFUM]
    assert parse_brief("가벼운 오드뚜왈렛").intensity is Intensity.EDT


def test_text_without_cues_gets_the_balanced_default_profile() -> None:
    brief = parse_brief("surprise me")
    assert set(brief.top_families(3)) <= {Family.FLORAL, Family.CITRUS, Family.WOODY}


def test_empty_text_is_rejected_with_an_example() -> None:
    with pytest.raises(BriefError, match=r"empty.*fresh citrus"):
        parse_brief("   ")


def test_brief_with_an_unknown_note_names_close_catalogue_entries() -> None:
    with pytest.raises(ValidationError, match=r"did you mean.*Rose oil"):
        Brief(profile={Family.FLORAL: 1.0}, include_notes=["Rose"])


def test_brief_with_an_all_zero_profile_is_rejected() -> None:
    with pytest.raises(ValidationError, match="no positive weight"):
        Brief(profile={Family.FLORAL: 0.0})


def test_brief_cannot_include_and_avoid_the_same_note() -> None:
    with pytest.raises(ValidationError, match="both included and avoided"):
        Brief(profile={Family.FLORAL: 1.0}, include_notes=["Rose oil"], avoid_notes=["rose oil"])


def test_brief_round_trips_through_json() -> None:
    brief = parse_brief("fresh citrus with bergamot for summer")
    assert Brief.model_validate_json(brief.model_dump_json()) == brief


def test_parser_reads_only_the_first_max_brief_text_chars_characters() -> None:
    filler = "x " * (MAX_BRIEF_TEXT_CHARS // 2)
    assert parse_brief(filler + "rose").include_notes == []
    # Up to the cap the text is read whole, so a negation at its very end still counts.
    tail = "no vanilla"
    unit = "a sweet vanilla scent for you, "
    head = unit * ((MAX_BRIEF_TEXT_CHARS - len(tail)) // len(unit))
    assert parse_brief(head + tail).avoid_notes == ["Vanillin"]


def test_parser_reads_no_further_than_max_brief_keywords_keywords() -> None:
    salad = "rose " * MAX_BRIEF_KEYWORDS
    assert parse_brief(salad + "no vanilla").avoid_notes == []
    assert parse_brief(salad[5:] + "no vanilla").avoid_notes == ["Vanillin"]
