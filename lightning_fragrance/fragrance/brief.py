"""The fragrance brief: what a customer asked for, as a validated record, and a rule parser.

`parse_brief("a fresh citrus scent for summer, not too sweet")` turns text (English or Korean)
into a `Brief` with deterministic keyword rules. The serving layer may produce briefs with an
LLM instead; both end in the same pydantic model, so the environment and the decoder see one
schema.
"""

from __future__ import annotations

import functools
import heapq
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightning_fragrance.fragrance.catalog import FAMILIES, Family, default_catalog


class Intensity(str, Enum):
    """Concentration class of the finished product."""

    EDC = "edc"
    EDT = "edt"
    EDP = "edp"
    PARFUM = "parfum"


# Total fragrance-oil concentration in the finished product, percent (usual trade ranges).
CONCENTRATION_RANGES: dict[Intensity, tuple[float, float]] = {
    Intensity.EDC: (2.0, 5.0),
    Intensity.EDT: (5.0, 15.0),
    Intensity.EDP: (15.0, 20.0),
    Intensity.PARFUM: (20.0, 30.0),
}


class Mood(str, Enum):
    """The feeling the customer wants; it tilts the profile and the pyramid."""

    FRESH = "fresh"
    ROMANTIC = "romantic"
    WARM = "warm"
    ELEGANT = "elegant"
    PLAYFUL = "playful"
    CALM = "calm"
    SENSUAL = "sensual"


class Season(str, Enum):
    """When the fragrance will be worn."""

    SPRING = "spring"
    SUMMER = "summer"
    AUTUMN = "autumn"
    WINTER = "winter"


class BriefError(ValueError):
    """A brief that cannot be built; the message says which field and what is allowed."""


class Brief(BaseModel):
    """A validated fragrance brief.

    Attributes:
        profile: Target weight per olfactive family, each in [0, 1]; missing families are 0,
            at least one must be positive.
        intensity: EDC / EDT / EDP / parfum, which fixes the target total concentration.
        include_notes: Catalogue ingredient names the formula should contain.
        avoid_notes: Catalogue ingredient names the formula must not contain.
        avoid_families: Families the customer ruled out (their profile weight is 0).
        mood: Optional mood.
        season: Optional season.
    """

    model_config = ConfigDict(frozen=True, use_enum_values=False)

    profile: dict[Family, float]
    intensity: Intensity = Intensity.EDP
    include_notes: list[str] = Field(default_factory=list)
    avoid_notes: list[str] = Field(default_factory=list)
    avoid_families: list[Family] = Field(default_factory=list)
    mood: Mood | None = None
    season: Season | None = None

    @field_validator("profile")
    @classmethod
    def _complete_profile(cls, profile: dict[Family, float]) -> dict[Family, float]:
        for family, weight in profile.items():
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"profile weight of {family.value!r} is {weight}; use [0, 1]")
        if not any(w > 0 for w in profile.values()):
            raise ValueError(
                "the profile has no positive weight; give at least one of "
                f"{[f.value for f in FAMILIES]} a weight in (0, 1]"
            )
        return {family: float(profile.get(family, 0.0)) for family in FAMILIES}

    @field_validator("include_notes", "avoid_notes")
    @classmethod
    def _known_notes(cls, notes: list[str]) -> list[str]:
        catalog = default_catalog()
        # index_of raises a KeyError that names close matches; surface it as a validation error.
        resolved = []
        for note in notes:
            try:
                resolved.append(catalog[catalog.index_of(note)].name)
            except KeyError as error:
                raise ValueError(str(error.args[0])) from None
        return list(dict.fromkeys(resolved))

    @model_validator(mode="after")
    def _no_contradiction(self) -> Brief:
        both = sorted(set(self.include_notes) & set(self.avoid_notes))
        if both:
            raise ValueError(f"notes both included and avoided: {both}")
        return self

    @property
    def concentration_range(self) -> tuple[float, float]:
        """Target total concentration range in percent."""
        return CONCENTRATION_RANGES[self.intensity]

    def profile_vector(self) -> list[float]:
        """Profile weights in `FAMILIES` order."""
        return [self.profile[f] for f in FAMILIES]

    def top_families(self, k: int = 3) -> list[Family]:
        """The `k` heaviest families with a positive weight, heaviest first."""
        ranked = sorted(FAMILIES, key=lambda f: (-self.profile[f], FAMILIES.index(f)))
        return [f for f in ranked[:k] if self.profile[f] > 0]


# ---------------------------------------------------------------------------------------------
# Rule parser
# ---------------------------------------------------------------------------------------------

_FAMILY_KEYWORDS: dict[Family, tuple[str, ...]] = {
    Family.CITRUS: (
        "citrus",
        "citrusy",
        "zesty",
        "lemon",
        "bergamot",
        "orange",
        "grapefruit",
        "lime",
        "mandarin",
        "yuzu",
        "시트러스",
        "레몬",
        "베르가못",
        "오렌지",
        "자몽",
        "라임",
        "귤",
        "유자",
        "상큼",
    ),
    Family.FLORAL: (
        "floral",
        "flower",
        "flowers",
        "flowery",
        "rose",
        "jasmine",
        "neroli",
        "tuberose",
        "ylang",
        "iris",
        "orris",
        "violet",
        "peony",
        "lily",
        "플로럴",
        "꽃",
        "장미",
        "로즈",
        "자스민",
        "재스민",
        "튜베로즈",
        "네롤리",
        "아이리스",
        "제비꽃",
        "작약",
        "백합",
    ),
    Family.WOODY: (
        "woody",
        "wood",
        "woods",
        "cedar",
        "sandalwood",
        "vetiver",
        "patchouli",
        "우디",
        "나무",
        "시더",
        "샌달우드",
        "백단",
        "베티버",
        "패출리",
    ),
    Family.AMBER: (
        "amber",
        "ambery",
        "resin",
        "resinous",
        "incense",
        "balsamic",
        "oriental",
        "labdanum",
        "앰버",
        "호박",
        "인센스",
        "레진",
        "유향",
    ),
    Family.GREEN: (
        "green",
        "grass",
        "grassy",
        "leafy",
        "leaf",
        "galbanum",
        "그린",
        "풀잎",
        "잎사귀",
        "풀내음",
    ),
    Family.FRUITY: (
        "fruity",
        "fruit",
        "fruits",
        "peach",
        "berry",
        "berries",
        "apple",
        "pear",
        "raspberry",
        "blackcurrant",
        "cassis",
        "프루티",
        "과일",
        "복숭아",
        "베리",
        "사과",
        "라즈베리",
        "블랙커런트",
    ),
    Family.SPICY: (
        "spicy",
        "spice",
        "spices",
        "pepper",
        "peppery",
        "cinnamon",
        "clove",
        "cardamom",
        "ginger",
        "nutmeg",
        "스파이시",
        "향신료",
        "후추",
        "시나몬",
        "계피",
        "정향",
        "카다멈",
        "생강",
    ),
    Family.MUSK: (
        "musk",
        "musky",
        "powdery",
        "powder",
        "skin scent",
        "머스크",
        "사향",
        "파우더리",
        "파우더",
    ),
    Family.AROMATIC: (
        "aromatic",
        "herbal",
        "herb",
        "herbs",
        "lavender",
        "rosemary",
        "mint",
        "minty",
        "sage",
        "basil",
        "아로마틱",
        "허브",
        "라벤더",
        "로즈마리",
        "민트",
        "세이지",
        "바질",
    ),
    Family.GOURMAND: (
        "gourmand",
        "sweet",
        "vanilla",
        "caramel",
        "chocolate",
        "cocoa",
        "coffee",
        "tonka",
        "honey",
        "구르망",
        "달콤",
        "달달",
        "달지",
        "달게",
        "바닐라",
        "카라멜",
        "캐러멜",
        "초콜릿",
        "초콜렛",
        "커피",
        "통카",
        "꿀",
    ),
}

# Keywords that also name a catalogue material: "rose" asks for the floral family AND for rose.
_NOTE_KEYWORDS: dict[str, str] = {
    "lemon": "Lemon oil",
    "레몬": "Lemon oil",
    "bergamot": "Bergamot oil",
    "베르가못": "Bergamot oil",
    "orange": "Sweet orange oil",
    "오렌지": "Sweet orange oil",
    "grapefruit": "Grapefruit oil",
    "자몽": "Grapefruit oil",
    "lime": "Lime oil (expressed)",
    "라임": "Lime oil (expressed)",
    "mandarin": "Mandarin oil",
    "귤": "Mandarin oil",
    "rose": "Rose oil",
    "장미": "Rose oil",
    "로즈": "Rose oil",
    "jasmine": "Jasmine absolute",
    "자스민": "Jasmine absolute",
    "재스민": "Jasmine absolute",
    "neroli": "Neroli oil",
    "네롤리": "Neroli oil",
    "tuberose": "Tuberose absolute",
    "튜베로즈": "Tuberose absolute",
    "ylang": "Ylang-ylang oil",
    "iris": "Orris butter",
    "orris": "Orris butter",
    "아이리스": "Orris butter",
    "violet": "Beta-ionone",
    "제비꽃": "Beta-ionone",
    "cedar": "Cedarwood oil (Virginia)",
    "시더": "Cedarwood oil (Virginia)",
    "sandalwood": "Sandalwood oil",
    "샌달우드": "Sandalwood oil",
    "백단": "Sandalwood oil",
    "vetiver": "Vetiver oil",
    "베티버": "Vetiver oil",
    "patchouli": "Patchouli oil",
    "패출리": "Patchouli oil",
    "incense": "Olibanum oil",
    "인센스": "Olibanum oil",
    "유향": "Olibanum oil",
    "labdanum": "Labdanum resinoid",
    "galbanum": "Galbanum oil",
    "peach": "Gamma-undecalactone",
    "복숭아": "Gamma-undecalactone",
    "raspberry": "Raspberry ketone",
    "라즈베리": "Raspberry ketone",
    "blackcurrant": "Blackcurrant bud absolute",
    "cassis": "Blackcurrant bud absolute",
    "블랙커런트": "Blackcurrant bud absolute",
    "pepper": "Black pepper oil",
    "후추": "Black pepper oil",
    "cinnamon": "Cinnamon bark oil",
    "시나몬": "Cinnamon bark oil",
    "계피": "Cinnamon bark oil",
    "clove": "Clove bud oil",
    "정향": "Clove bud oil",
    "cardamom": "Cardamom oil",
    "카다멈": "Cardamom oil",
    "ginger": "Ginger oil",
    "생강": "Ginger oil",
    "nutmeg": "Nutmeg oil",
    "lavender": "Lavender oil",
    "라벤더": "Lavender oil",
    "rosemary": "Rosemary oil",
    "로즈마리": "Rosemary oil",
    "mint": "Peppermint oil",
    "민트": "Peppermint oil",
    "sage": "Clary sage oil",
    "세이지": "Clary sage oil",
    "basil": "Basil oil",
    "바질": "Basil oil",
    "vanilla": "Vanillin",
    "바닐라": "Vanillin",
    "chocolate": "Cocoa absolute",
    "cocoa": "Cocoa absolute",
    "초콜릿": "Cocoa absolute",
    "초콜렛": "Cocoa absolute",
    "coffee": "Coffee absolute",
    "커피": "Coffee absolute",
    "tonka": "Tonka bean absolute",
    "통카": "Tonka bean absolute",
}

_MOOD_KEYWORDS: dict[Mood, tuple[str, ...]] = {
    Mood.FRESH: (
        "fresh",
        "clean",
        "airy",
        "crisp",
        "refreshing",
        "상쾌",
        "산뜻",
        "청량",
        "프레시",
        "깨끗",
    ),
    Mood.ROMANTIC: ("romantic", "romance", "date", "love", "로맨틱", "사랑", "데이트"),
    Mood.WARM: ("warm", "cozy", "cosy", "comforting", "따뜻", "포근", "아늑"),
    Mood.ELEGANT: ("elegant", "sophisticated", "classy", "chic", "우아", "세련", "고급"),
    Mood.PLAYFUL: ("playful", "fun", "cheerful", "bright", "발랄", "경쾌", "명랑", "밝은"),
    Mood.CALM: ("calm", "relaxing", "soothing", "peaceful", "차분", "편안", "힐링", "잔잔"),
    Mood.SENSUAL: ("sensual", "sexy", "seductive", "관능", "섹시", "유혹"),
}

_SEASON_KEYWORDS: dict[Season, tuple[str, ...]] = {
    Season.SPRING: ("spring", "봄"),
    Season.SUMMER: ("summer", "여름"),
    Season.AUTUMN: ("autumn", "fall", "가을"),
    Season.WINTER: ("winter", "겨울"),
}

_INTENSITY_KEYWORDS: dict[Intensity, tuple[str, ...]] = {
    Intensity.EDC: ("edc", "eau de cologne", "cologne", "splash", "코롱", "오드코롱"),
    Intensity.EDT: (
        "edt",
        "eau de toilette",
        "light",
        "subtle",
        "soft",
        "가벼운",
        "은은",
        "오드뚜왈렛",
        "오드투알렛",
    ),
    Intensity.EDP: ("edp", "eau de parfum", "오드퍼퓸", "오드빠르펭"),
    Intensity.PARFUM: (
        "parfum",
        "extrait",
        "strong",
        "intense",
        "long-lasting",
        "long lasting",
        "진한",
        "강한",
        "오래",
        "지속력",
    ),
}

# Moods and seasons tilt the profile (weight 0.3 next to 1.0 for a named family) so that
# "something warm for winter" still yields a usable target without any family keyword.
_MOOD_PROFILES: dict[Mood, dict[Family, float]] = {
    Mood.FRESH: {Family.CITRUS: 1.0, Family.GREEN: 0.6, Family.AROMATIC: 0.3},
    Mood.ROMANTIC: {Family.FLORAL: 1.0, Family.FRUITY: 0.4, Family.MUSK: 0.4},
    Mood.WARM: {Family.AMBER: 1.0, Family.WOODY: 0.5, Family.GOURMAND: 0.5, Family.SPICY: 0.3},
    Mood.ELEGANT: {Family.FLORAL: 0.8, Family.WOODY: 0.6, Family.MUSK: 0.5},
    Mood.PLAYFUL: {Family.FRUITY: 1.0, Family.CITRUS: 0.5, Family.FLORAL: 0.4},
    Mood.CALM: {Family.AROMATIC: 1.0, Family.WOODY: 0.5, Family.MUSK: 0.4},
    Mood.SENSUAL: {Family.MUSK: 1.0, Family.AMBER: 0.8, Family.WOODY: 0.5, Family.FLORAL: 0.3},
}
_SEASON_PROFILES: dict[Season, dict[Family, float]] = {
    Season.SPRING: {Family.FLORAL: 1.0, Family.GREEN: 0.6},
    Season.SUMMER: {Family.CITRUS: 1.0, Family.GREEN: 0.5},
    Season.AUTUMN: {Family.WOODY: 1.0, Family.SPICY: 0.6},
    Season.WINTER: {Family.AMBER: 1.0, Family.SPICY: 0.5},
}
_DEFAULT_PROFILE = {Family.FLORAL: 0.8, Family.CITRUS: 0.6, Family.WOODY: 0.6, Family.MUSK: 0.4}
_TILT = 0.3

_EN_NEGATIONS = frozenset(
    {
        "not",
        "no",
        "without",
        "avoid",
        "less",
        "never",
        "don't",
        "dont",
        "nothing",
        "hate",
        "except",
        "minus",
        "zero",
        "free",
    }
)
# Korean negation follows the word ("달지 않은", "머스크 없이", "바닐라는 빼고") or, for "덜"/"노",
# precedes it ("덜 달게", "노 머스크").
_KO_NEGATION_AFTER = re.compile(r"^\S{0,3}\s?(않|없|빼|말고|싫|제외|안\s)")
_KO_NEGATION_BEFORE = re.compile(r"(^|\s)(덜|노|안)\s?$")
_CLAUSE_BREAK = re.compile(r"[,.;!?\n]|\bbut\b|하지만|그러나|그리고|지만")


# Reaches of the rules around a keyword, in characters: "negation after" reads at most 6 past it
# ("\S{0,3}", a space, "말고"), "negation before" at most the clause's last 3 before it ("(^|\s)",
# "덜", "\s?"), and a clause break is recognised from 4 characters ("but" and its boundary).
_KO_AFTER_REACH = 6
_KO_BEFORE_REACH = 3
_BREAK_LOOKAHEAD = 4
# The characters without which neither Korean negation rule can match: a text with none of them
# (any English text) skips both per-keyword checks.
_KO_NEGATION_CUE = re.compile(r"[않없빼말싫제안덜노]")
_WORD = re.compile(r"[a-z']+")
# Every position where a clause break starts (overlapping ones too: "지만" inside "하지만").
_BREAK_START = re.compile(rf"(?=(?:{_CLAUSE_BREAK.pattern}))")
# A "but" that ends exactly where a keyword starts ("but장미") ends that keyword's clause, although
# in the whole text no word boundary follows it (Hangul is a word character).
_BUT_JUST_BEFORE = re.compile(r"\bbut\Z")

# Longer texts are read only up to this many characters. The rules' cost grows with the length
# (benchmarks/bench_brief_parse.py), so the cap bounds a request's cost; customers write a few
# hundred characters, and lf-serve refuses `user_text` over 2,000 characters before parsing.
MAX_BRIEF_TEXT_CHARS = 4_000
# ... and up to this many keywords: the negation checks and the rules cost ~1.5 us per keyword,
# and a customer's text holds a few dozen (the 2,000-character texts of the test corpus hold
# 230 to 400); only a keyword salad goes past it, so it reads no further.
MAX_BRIEF_KEYWORDS = 512


# Every keyword the rules look for, gathered once (per call it was a tenth of parse_brief).
_ALL_KEYWORDS: tuple[str, ...] = tuple(
    k
    for table in (_FAMILY_KEYWORDS, _MOOD_KEYWORDS, _SEASON_KEYWORDS, _INTENSITY_KEYWORDS)
    for ks in table.values()
    for k in ks
)
_LONGEST_KEYWORD = max(len(k) for k in _ALL_KEYWORDS)


class _Reading(NamedTuple):
    """A keyword as the rules read it: negated or not."""

    keyword: str
    negated: bool


class _ClauseIndex:
    """Per-position tables of one text, built in one pass each, for the negation rules.

    The rules look at the clause around every keyword. Rescanning the text before each keyword
    cost O(length x keywords): 44 ms for 2,000 characters of repeated keywords against 0.08 ms
    for a typical brief, so a few clients could starve the others (issue 10, item 5). Here a
    keyword's clause start, last English words and next clause break are table lookups.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        size = len(text) + 1
        # clause_left[p]: end of the last break (a left-to-right, non-overlapping scan) at or
        # before p, where the clause of a keyword starting at p begins.
        self.clause_left = _step_table(
            [found.end() for found in _CLAUSE_BREAK.finditer(text)], size, default=0
        )
        words = list(_WORD.finditer(text))
        # last_word[p]: index of the last word starting before p (-1: none);
        # words_ended[p]: how many words end at or before p.
        self.last_word = _step_table(
            [found.start() + 1 for found in words], size, default=-1, values=range(len(words))
        )
        self.words_ended = _step_table(
            [found.end() for found in words], size, default=0, values=range(1, len(words) + 1)
        )
        # negations_before[i]: negation words among the first i words. A word cut by the clause
        # start ("'s" after "but") or by the keyword ("not'" before "'rose") begins or ends with
        # an apostrophe, which no negation word does, so whole words can be counted once.
        self.negations_before = [0]
        for found in words:
            self.negations_before.append(
                self.negations_before[-1] + (found.group() in _EN_NEGATIONS)
            )
        self.korean_cues = _KO_NEGATION_CUE.search(text) is not None
        # Without any negation word or Korean cue no keyword can be negated.
        self.any_cue = self.korean_cues or self.negations_before[-1] > 0
        # next_break[p]: where the first clause break starting at or after p starts. A break is
        # matched at every position with the whole text around it, as a search from p sees it.
        self.next_break: list[int] = []
        if self.korean_cues:
            starts = [found.start() for found in _BREAK_START.finditer(text)]
            self.next_break = _next_table(starts, size, default=size + _KO_AFTER_REACH)

    def readings(self, spans: list[tuple[int, int, str]]) -> list[_Reading]:
        """Each span's keyword with its negation; each distinct reading once, in text order.

        A keyword is negated by one of the last three English words of its clause before it
        ("not too sweet"), by a Korean negation after it in its clause ("달지 않은", "머스크
        없이") or by one just before it ("덜 달게", "노 머스크"). One loop with the tables in
        locals: with thousands of spans, a method call per rule cost as much as the rules.
        """
        if not self.any_cue:
            return [_Reading(keyword, False) for keyword in dict.fromkeys(k for _, _, k in spans)]
        text, clause_left, last_word = self.text, self.clause_left, self.last_word
        words_ended, negations = self.words_ended, self.negations_before
        next_break = self.next_break
        seen: dict[tuple[str, bool], None] = {}
        for start, end, keyword in spans:
            left = clause_left[start]
            if text.endswith("but", 0, start) and _BUT_JUST_BEFORE.search(
                text[max(0, start - 4) : start]
            ):
                left = start
            last = last_word[start]
            first = max(words_ended[left], last - 2)
            negated = first <= last and negations[last + 1] > negations[first]
            if not negated and self.korean_cues:
                tail = text[end : min(next_break[end], end + _KO_AFTER_REACH)]
                before = text[max(left, start - _KO_BEFORE_REACH) : start]
                negated = bool(
                    _KO_NEGATION_AFTER.search(tail) or _KO_NEGATION_BEFORE.search(before)
                )
            seen[keyword, negated] = None  # a repeated reading keeps its first place
        return [_Reading(keyword, negated) for keyword, negated in seen]


def _step_table(
    positions: list[int], size: int, default: int, values: Sequence[int] | None = None
) -> list[int]:
    """table[p] = values[i] of the last positions[i] <= p (positions ascending), else `default`;
    values default to the positions themselves. Filled by slices: O(size), no per-position loop.
    """
    table = [default] * size
    marks = values if values is not None else positions
    for index, position in enumerate(positions):
        stop = positions[index + 1] if index + 1 < len(positions) else size
        if position < stop:
            table[position:stop] = [marks[index]] * (stop - position)
    return table


def _next_table(positions: list[int], size: int, default: int) -> list[int]:
    """table[p] = the first of `positions` (ascending) that is >= p, else `default`."""
    table = [default] * size
    previous = 0
    for position in positions:
        table[previous : position + 1] = [position] * (position + 1 - previous)
        previous = position + 1
    return table


def _is_ascii(text: str) -> bool:
    return all(ord(ch) < 128 for ch in text)


@functools.lru_cache(maxsize=16)
def _keyword_patterns(keywords: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Each keyword with its compiled pattern, longest first (ties by text, so the result never
    depends on set order). Compiled once: building them per request cost ~2 ms of a ~3.5 ms
    `/dna/create` (measured with cProfile on the serving path)."""
    ordered = sorted(set(keywords), key=lambda k: (-len(k), k))
    # ASCII keywords need word boundaries ("lime" is not in "sublime"); Korean ones do not,
    # because particles attach to the word ("장미향", "시트러스한").
    return tuple(
        (k, re.compile(rf"(?<![a-z]){re.escape(k)}(?![a-z])" if _is_ascii(k) else re.escape(k)))
        for k in ordered
    )


def _keyword_spans(text: str, keywords: tuple[str, ...], limit: int) -> list[tuple[int, int, str]]:
    """The first `limit` non-overlapping keyword spans by position; where keywords overlap the
    longest wins ("rosemary" over "rose"), ties by text.

    Keywords are placed longest first. Once `limit` spans start at or before a position
    (`horizon`), no span starting later can be among the first `limit`; a span starting up to
    the longest keyword's length later can still block one before it, so the scans stop there.
    """
    spans: list[tuple[int, int, str]] = []
    # One flag per character taken by an earlier (longer) keyword: checking a span costs its
    # own length, not the number of spans found so far.
    taken = bytearray(len(text))
    any_taken = False
    horizon = len(text)
    horizon_checked_at = 0
    chars = set(text)  # a keyword whose first character is absent is skipped in ~50 ns
    for keyword, pattern in _keyword_patterns(keywords):
        if keyword[0] not in chars or keyword not in text:  # both far cheaper than a scan
            continue
        reach = horizon + _LONGEST_KEYWORD
        found: list[tuple[int, int]] = []
        for match in pattern.finditer(text):
            start, end = match.span()
            if start > reach:
                break
            if any_taken and taken.find(1, start, end) != -1:
                continue
            found.append((start, end))
            if len(found) == limit:  # this keyword alone fills the limit here
                reach = min(reach, start + _LONGEST_KEYWORD)
        if not found:
            continue
        flags = b"\x01" * len(keyword)
        for start, end in found:
            taken[start:end] = flags
        any_taken = True
        spans += [(start, end, keyword) for start, end in found]
        if len(spans) >= max(limit, 2 * horizon_checked_at):  # amortised: O(n log limit)
            horizon_checked_at = len(spans)
            horizon = min(horizon, heapq.nsmallest(limit, spans)[-1][0])
    spans.sort()
    return spans[:limit]


def _keyword_readings(text: str, keywords: tuple[str, ...]) -> list[_Reading]:
    """How the first `MAX_BRIEF_KEYWORDS` keywords of `text` read, each distinct reading once,
    in the order of its first occurrence.

    A brief depends on nothing else: a keyword read again the same way adds nothing, and the
    rules take the first mood, season or intensity. So the rules run over a few dozen readings
    at most, however often a text repeats itself.
    """
    spans = _keyword_spans(text, keywords, MAX_BRIEF_KEYWORDS)
    if not spans:
        return []
    # The negation rules read at most a few characters past the last keyword (and a clause
    # break's boundary after those): index no further.
    clauses = _ClauseIndex(text[: spans[-1][1] + _KO_AFTER_REACH + 2 * _BREAK_LOOKAHEAD])
    return clauses.readings(spans)


_E = TypeVar("_E", bound=Enum)


def _keyword_index(table: Mapping[_E, tuple[str, ...]]) -> dict[str, _E]:
    """Keyword -> the first table entry that lists it (the order the rules try them in)."""
    index: dict[str, _E] = {}
    for value, keywords in table.items():
        for keyword in keywords:
            index.setdefault(keyword, value)
    return index


def _keyword_families() -> dict[str, tuple[Family, ...]]:
    families: dict[str, tuple[Family, ...]] = {}
    for family, keywords in _FAMILY_KEYWORDS.items():
        for keyword in keywords:
            families[keyword] = (*families.get(keyword, ()), family)
    return families


# Keyword -> what it names, built once: looking each match up in every table's tuples was a
# third of the cost of a keyword-dense text.
_FAMILIES_OF = _keyword_families()
_MOOD_OF = _keyword_index(_MOOD_KEYWORDS)
_SEASON_OF = _keyword_index(_SEASON_KEYWORDS)
_INTENSITY_OF = _keyword_index(_INTENSITY_KEYWORDS)


def _first(matches: list[_Reading], index: Mapping[str, _E]) -> _E | None:
    """What the first keyword that is in `index` and not negated names."""
    for match in matches:
        if not match.negated and match.keyword in index:
            return index[match.keyword]
    return None


def parse_brief(text: str) -> Brief:
    """Turn a customer's text (English and/or Korean) into a `Brief` with keyword rules.

    Family keywords set a weight of 1.0; mood and season tilt the profile by 0.3; negated
    keywords ("not too sweet", "바닐라 없이") rule a family or note out. Without any cue the
    profile is a balanced floral-citrus-woody default. The text is read up to
    `MAX_BRIEF_TEXT_CHARS` (4,000) characters and `MAX_BRIEF_KEYWORDS` (512) keywords, so a
    call costs a bounded time (~3 ms at most on a 2-core machine); below the caps the cost
    grows linearly with the length.

    Args:
        text: Free text, e.g. "a fresh citrus scent for summer, not too sweet".

    Raises:
        BriefError: When `text` is empty.
    """
    text = text[:MAX_BRIEF_TEXT_CHARS]
    if not text or not text.strip():
        raise BriefError("the brief text is empty; describe the scent, e.g. 'fresh citrus'")
    lowered = text.lower()
    matches = _keyword_readings(lowered, _ALL_KEYWORDS)

    profile = dict.fromkeys(FAMILIES, 0.0)
    avoid_families: list[Family] = []
    include: list[str] = []
    avoid: list[str] = []
    for match in matches:
        note = _NOTE_KEYWORDS.get(match.keyword)
        for family in _FAMILIES_OF.get(match.keyword, ()):
            if not match.negated:
                profile[family] = 1.0
            elif note is None:  # "no vanilla" rules out vanilla, not every gourmand material.
                avoid_families.append(family)
        if note is not None:
            (avoid if match.negated else include).append(note)

    mood = _first(matches, _MOOD_OF)
    season = _first(matches, _SEASON_OF)
    intensity = _first(matches, _INTENSITY_OF) or Intensity.EDP
    tilts = [_MOOD_PROFILES[mood]] if mood is not None else []
    tilts += [_SEASON_PROFILES[season]] if season is not None else []
    for tilt in tilts:
        for family, weight in tilt.items():
            profile[family] = min(1.0, profile[family] + _TILT * weight)
    for family in avoid_families:
        profile[family] = 0.0
    if not any(profile.values()):
        # No positive cue (or only exclusions): fall back to a balanced, widely liked profile.
        profile.update({f: w for f, w in _DEFAULT_PROFILE.items() if f not in avoid_families})
    if not any(profile.values()):
        raise BriefError(f"every family was ruled out by {text!r}; name at least one you want")
    avoid = [n for n in dict.fromkeys(avoid)]
    include = [n for n in dict.fromkeys(include) if n not in avoid]
    return Brief(
        profile=profile,
        intensity=intensity,
        include_notes=include,
        avoid_notes=avoid,
        avoid_families=list(dict.fromkeys(avoid_families)),
        mood=mood,
        season=season,
    )
