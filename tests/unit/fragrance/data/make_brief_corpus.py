"""Build ``brief_corpus.json``: texts and the brief `parse_brief` gave for each (or its error).

The frozen file was written with the quadratic parser of commit 70375e4, before the linear one
replaced it; ``test_brief_corpus.py`` checks that today's parser still gives the same briefs.
Rerunning this script with a later parser would only record that parser's answers, so do it
only to add texts, and review the diff of the answers already there (they must not change).

Run: ``python tests/unit/fragrance/data/make_brief_corpus.py``
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lightning_fragrance.fragrance import brief as brief_module
from lightning_fragrance.fragrance.brief import BriefError, parse_brief

OUT = Path(__file__).with_name("brief_corpus.json")

# The texts the existing tests, the serving warm-up and the benchmarks parse.
TEST_TEXTS = [
    "a fresh citrus scent for summer, not too sweet",
    "romantic floral perfume with rose and jasmine",
    "warm woody amber for winter evenings",
    "spicy and smoky incense, no vanilla",
    "calm lavender and herbs",
    "sweet vanilla and caramel gourmand",
    "여름에 어울리는 상큼한 시트러스 향수, 너무 달지 않게",
    "플로럴하고 로맨틱한 봄 향수",
    "따뜻한 우디 향, 겨울용",
    "과일향 가득한 프루티 향수",
    "머스크와 파우더리한 느낌",
    "스파이시한 후추와 시나몬",
    "그린 풀잎 향",
    "바닐라 구르망",
    "amber and gourmand but no vanilla",
    "앰버 향수, 바닐라는 빼고",
    "rosemary",
    "로즈마리",
    "a strong, elegant perfume for autumn",
    "가벼운 오드뚜왈렛",
    "surprise me",
    "   ",
    "",
    "fresh citrus with bergamot for summer",
    "fresh citrus with bergamot for summer, not too sweet",
    "fresh citrus for summer",
    "warm amber for winter",
    "a warm amber scent",
    "a warm woody scent for winter",
    "warm amber and vanilla for winter evenings",
    "a green floral for spring",
    "woody and spicy, no vanilla",
    "a green floral",
    "woody, no vanilla",
    "citrus",
    "x" * 2001,
    "citrus " * 300,
]

# Edge cases of the clause and negation rules (boundaries, apostrophes, Korean particles).
EDGE_TEXTS = [
    "not citrus",
    "no sweet, citrus",
    "citrus but not sweet",
    "not a very sweet one",
    "not a very very sweet one",
    "don't want vanilla",
    "dont want vanilla",
    "'rose and 'vanilla",
    "no'rose",
    "but's rose",
    "but장미",
    "rose but장미",
    "하지만 장미",
    "장미 하지만 바닐라 없이",
    "달지만 상큼한",
    "덜 달게",
    "노 머스크",
    "안 달게",
    "머스크 안 좋아",
    "바닐라 없이 장미",
    "바닐라는빼고 장미",
    "장미는 싫어요",
    "로즈 제외",
    "머스크 말고 시트러스",
    "sublime lime",
    "rosemary rose",
    "eau de cologne or eau de parfum",
    "skin scent, long lasting",
    "long-lasting, not light",
    "without any musk\nbut with rose",
    "no\nrose",
    "free of vanilla; fruity",
    "zero sugar sweet",
    "I hate lavender!",
    "citrus? no! vanilla.",
    "except iris",
    "ROSE AND VANILLA, NOT CINNAMON",
    "citrus-free wood",
    "nothing floral at all",
]

WORDS = sorted(
    {
        k
        for table in (brief_module._FAMILY_KEYWORDS, brief_module._MOOD_KEYWORDS)
        for ks in table.values()
        for k in ks
    }
    | {
        k
        for table in (brief_module._SEASON_KEYWORDS, brief_module._INTENSITY_KEYWORDS)
        for ks in table.values()
        for k in ks
    }
)
NEGATIONS = [*sorted(brief_module._EN_NEGATIONS), "덜", "노", "안"]
KO_AFTER = ["않은", "없이", "는 빼고", "말고", "싫어", "제외", "안 돼", "는 안 좋아"]
FILLER = [
    "a",
    "and",
    "with",
    "for",
    "scent",
    "perfume",
    "향수",
    "향",
    "느낌",
    "very",
    "too",
    "some",
]
BREAKS = [",", ".", ";", "!", "?", "\n", " but", " 하지만", " 그러나", " 그리고", "지만"]


def random_text(rng: random.Random, n_tokens: int) -> str:
    """Keywords, fillers, negations before and after, and clause breaks in random order."""
    parts: list[str] = []
    for _ in range(n_tokens):
        roll = rng.random()
        if roll < 0.45:
            parts.append(rng.choice(WORDS))
        elif roll < 0.6:
            parts.append(rng.choice(NEGATIONS))
        elif roll < 0.7:
            parts.append(rng.choice(WORDS) + rng.choice(KO_AFTER))
        elif roll < 0.82:
            parts.append(rng.choice(BREAKS))
        else:
            parts.append(rng.choice(FILLER))
    glue = rng.choice([" ", " ", " ", ""])
    text = glue.join(parts)
    return text.upper() if rng.random() < 0.05 else text


def long_text_with_late_negation(length: int) -> str:
    """About `length` characters of praise for citrus and vanilla, then "no vanilla" at the end."""
    head = "fresh citrus and sweet vanilla for summer, "
    tail = " but no vanilla please"
    body = (head * (length // len(head) + 1))[: length - len(tail)]
    return body + tail


def worst_case_text(length: int) -> str:
    """One long clause of keywords, each read with a negation scan over the whole clause."""
    unit = "not sweet vanilla rose musk "
    return (unit * (length // len(unit) + 1))[:length]


def corpus_texts() -> list[str]:
    rng = random.Random(20261201)
    generated = [random_text(rng, rng.randint(1, 14)) for _ in range(400)]
    generated += [random_text(rng, rng.randint(40, 120)) for _ in range(40)]
    long_ones = [
        long_text_with_late_negation(2000),
        long_text_with_late_negation(1000),
        worst_case_text(500),
        worst_case_text(2000),
        "장미 바닐라 " * 200 + "바닐라 없이",
        "rose, " * 300 + "not vanilla",
    ]
    return TEST_TEXTS + EDGE_TEXTS + generated + long_ones


def answer(text: str) -> dict[str, Any]:
    try:
        return {"text": text, "brief": parse_brief(text).model_dump(mode="json")}
    except BriefError as error:
        return {"text": text, "error": str(error)}


def main() -> None:
    entries = [answer(text) for text in corpus_texts()]
    # One entry per line: a reviewable diff when texts are added.
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in entries)
    OUT.write_text(f"[\n{lines}\n]\n", encoding="utf-8")
    print(f"{len(entries)} texts -> {OUT}")


if __name__ == "__main__":
    main()
