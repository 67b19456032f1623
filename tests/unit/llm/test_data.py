"""The labelled-text generator: labels are valid briefs written by the generator, texts vary."""

from __future__ import annotations

import random

from lightning_fragrance.fragrance.brief import Brief
from lightning_fragrance.fragrance.catalog import Family, default_catalog
from lightning_fragrance.llm import data
from lightning_fragrance.llm.data import Language, Split, brief_to_json, generate_examples


def test_every_lexicon_note_is_a_catalogue_material() -> None:
    names = set(default_catalog().names())
    assert set(data.note_lexicon()) <= names


def test_generation_is_reproducible_from_the_seed() -> None:
    first = generate_examples(20, seed=3)
    again = generate_examples(20, seed=3)
    assert [e.text for e in first] == [e.text for e in again]
    assert [e.text for e in generate_examples(20, seed=4)] != [e.text for e in first]


def test_texts_come_in_english_and_korean_with_distinct_wordings() -> None:
    examples = generate_examples(200, seed=0)
    languages = {e.language for e in examples}
    assert languages == {Language.EN, Language.KO}
    assert len({e.text for e in examples}) > 190
    korean = [e.text for e in examples if e.language is Language.KO]
    assert all(any("\uac00" <= ch <= "\ud7a3" for ch in text) for text in korean)


def test_heldout_texts_use_frames_the_training_texts_never_use() -> None:
    train_frames = set(data._EN_FRAMES[: -data._HELDOUT_FRAMES])
    held_frames = set(data._EN_FRAMES[-data._HELDOUT_FRAMES :])
    assert train_frames.isdisjoint(held_frames)
    held = generate_examples(100, seed=0, split=Split.HELDOUT)
    english = [e.text for e in held if e.language is Language.EN]
    prefixes = {frame.split("{body}")[0] for frame in held_frames}
    assert all(any(p in text for p in prefixes) for text in english)
    train_english = [e.text for e in generate_examples(300, seed=0) if e.language is Language.EN]
    assert not any(p in text for p in prefixes for text in train_english)


def test_a_not_too_sweet_clause_rules_out_the_gourmand_family() -> None:
    rng = random.Random(0)
    found = None
    for _ in range(2000):
        example = data.generate_example(rng)
        if "not too sweet" in example.text:
            found = example
            break
    assert found is not None
    assert Family.GOURMAND in found.brief.avoid_families
    assert found.brief.profile[Family.GOURMAND] == 0.0


def test_the_canonical_answer_validates_back_to_the_same_brief() -> None:
    for example in generate_examples(50, seed=1):
        answer = brief_to_json(example.brief)
        parsed = Brief.model_validate_json(answer)
        assert parsed.profile == example.brief.profile
        assert set(parsed.include_notes) == set(example.brief.include_notes)
        assert brief_to_json(parsed) == answer  # canonical: one answer per brief
        assert '":0,' not in answer and '":0}' not in answer  # zero weights are left out


def test_named_notes_add_their_family_when_the_family_was_not_named() -> None:
    for example in generate_examples(200, seed=2):
        for note in example.brief.include_notes:
            assert example.brief.profile[data.note_lexicon()[note]] > 0
