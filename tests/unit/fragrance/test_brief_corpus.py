"""The rule parser gives the same briefs as the frozen answers of the parser it replaced.

``data/brief_corpus.json`` was written by ``data/make_brief_corpus.py`` with the quadratic parser
(commit 70375e4): the existing tests' texts, edge cases of the clause and negation rules,
440 generated texts and long ones (a 2,000-character text with a negation near its end).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lightning_fragrance.fragrance import BriefError, parse_brief

CORPUS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "brief_corpus.json").read_text(encoding="utf-8")
)


def test_corpus_holds_a_2000_character_text_with_a_negation_near_its_end() -> None:
    long_ones = [
        e for e in CORPUS if len(e["text"]) == 2000 and e["text"].endswith("no vanilla please")
    ]
    assert long_ones and long_ones[0]["brief"]["avoid_notes"] == ["Vanillin"]


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: f"{len(e['text'])}:{e['text'][:30]!r}")
def test_parser_gives_the_frozen_brief_for_every_corpus_text(entry: dict[str, Any]) -> None:
    if "error" in entry:
        with pytest.raises(BriefError) as raised:
            parse_brief(entry["text"])
        assert str(raised.value) == entry["error"]
    else:
        assert parse_brief(entry["text"]).model_dump(mode="json") == entry["brief"]
