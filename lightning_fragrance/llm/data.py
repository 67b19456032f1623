"""Labelled customer texts for the brief model, generated from the catalogue's vocabulary.

The generator first draws an *intent* (families with a strength, notes to include or avoid,
families ruled out, mood, season, intensity), then writes it as English or Korean text with
varied frames, paraphrases, negations ("not too sweet", "바닐라 없이") and strength words
("a hint of", "아주"). The label is that intent as a `Brief`: the text is produced from the label,
never the label from the text, so `parse_brief` plays no part in it and can be compared fairly.

Labelling convention (docs/brief-llm.md): a family said strongly weighs 1.0, plainly 0.6,
lightly 0.3; a named note adds its catalogue family at 0.6 unless the family was named; ruled-out
families weigh 0; intensity defaults to EDP when the text says nothing.

Frames (the sentence shapes around the clauses) are split: `Split.TRAIN` texts use the training
frames, `Split.HELDOUT` texts use frames the model never saw, so held-out quality measures more
than memorised sentence shapes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

from lightning_fragrance.fragrance.brief import Brief, Intensity, Mood, Season
from lightning_fragrance.fragrance.catalog import FAMILIES, Family, default_catalog


class Split(str, Enum):
    """Which sentence frames a generated text may use."""

    TRAIN = "train"
    HELDOUT = "heldout"


class Language(str, Enum):
    """The customer's language."""

    EN = "en"
    KO = "ko"


@dataclass(frozen=True)
class LabelledText:
    """A customer text and the brief it was written from."""

    text: str
    brief: Brief
    language: Language


# Strength of a family mention -> profile weight (docs/brief-llm.md). Far apart (0.3 steps and
# more) so that a weight within the score's tolerance (0.15) identifies the strength.
STRONG, PLAIN, LIGHT = 1.0, 0.6, 0.3
NOTE_FAMILY_WEIGHT = 0.6

# family -> (English adjective, English noun, Korean word). Korean words take no particle here;
# the templates add one where grammar needs it.
_FAMILY_WORDS: dict[Family, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    Family.CITRUS: (("citrusy", "zesty"), ("citrus",), ("시트러스", "상큼한 시트러스")),
    Family.FLORAL: (("floral", "flowery"), ("flowers", "florals"), ("플로럴", "꽃향기")),
    Family.WOODY: (("woody",), ("woods", "wood"), ("우디", "나무 향")),
    Family.AMBER: (("ambery", "resinous"), ("amber", "resins"), ("앰버", "레진")),
    Family.GREEN: (("green", "leafy"), ("greenery", "green leaves"), ("그린", "풀내음")),
    Family.FRUITY: (("fruity", "juicy"), ("fruit", "fruits"), ("프루티", "과일 향")),
    Family.SPICY: (("spicy",), ("spice", "spices"), ("스파이시", "향신료")),
    Family.MUSK: (("musky", "powdery"), ("musk", "powder"), ("머스크", "파우더리")),
    Family.AROMATIC: (("herbal", "aromatic"), ("herbs",), ("허브", "아로마틱")),
    Family.GOURMAND: (("sweet", "gourmand"), ("sweetness", "dessert notes"), ("달콤한", "구르망")),
}

# Catalogue material -> (English words, Korean words). Every name is checked against the
# shipped catalogue (`note_lexicon`), so a renamed row fails loudly instead of mislabelling.
_NOTE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Bergamot oil": (("bergamot",), ("베르가못",)),
    "Lemon oil": (("lemon",), ("레몬",)),
    "Grapefruit oil": (("grapefruit",), ("자몽",)),
    "Mandarin oil": (("mandarin",), ("귤", "만다린")),
    "Rose oil": (("rose",), ("장미", "로즈")),
    "Jasmine absolute": (("jasmine",), ("자스민", "재스민")),
    "Neroli oil": (("neroli",), ("네롤리",)),
    "Tuberose absolute": (("tuberose",), ("튜베로즈",)),
    "Orris butter": (("iris", "orris"), ("아이리스",)),
    "Cedarwood oil (Virginia)": (("cedar", "cedarwood"), ("시더우드",)),
    "Sandalwood oil": (("sandalwood",), ("샌달우드", "백단")),
    "Vetiver oil": (("vetiver",), ("베티버",)),
    "Patchouli oil": (("patchouli",), ("패출리",)),
    "Olibanum oil": (("incense", "frankincense"), ("인센스", "유향")),
    "Galbanum oil": (("galbanum",), ("갈바넘",)),
    "Gamma-undecalactone": (("peach",), ("복숭아",)),
    "Raspberry ketone": (("raspberry",), ("라즈베리",)),
    "Blackcurrant bud absolute": (("blackcurrant", "cassis"), ("블랙커런트",)),
    "Black pepper oil": (("black pepper",), ("후추", "블랙페퍼")),
    "Cinnamon bark oil": (("cinnamon",), ("시나몬", "계피")),
    "Cardamom oil": (("cardamom",), ("카다멈",)),
    "Ginger oil": (("ginger",), ("생강",)),
    "Lavender oil": (("lavender",), ("라벤더",)),
    "Rosemary oil": (("rosemary",), ("로즈마리",)),
    "Peppermint oil": (("mint", "peppermint"), ("민트",)),
    "Vanillin": (("vanilla",), ("바닐라",)),
    "Tonka bean absolute": (("tonka", "tonka bean"), ("통카",)),
    "Coffee absolute": (("coffee",), ("커피",)),
    "Cocoa absolute": (("cocoa", "chocolate"), ("초콜릿", "코코아")),
    "Galaxolide": (("white musk",), ("화이트 머스크",)),
}

_MOOD_WORDS: dict[Mood, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Mood.FRESH: (("fresh", "clean", "crisp"), ("상쾌한", "산뜻한", "깨끗한")),
    Mood.ROMANTIC: (("romantic",), ("로맨틱한", "사랑스러운")),
    Mood.WARM: (("warm", "cozy"), ("따뜻한", "포근한")),
    Mood.ELEGANT: (("elegant", "sophisticated"), ("우아한", "세련된")),
    Mood.PLAYFUL: (("playful", "cheerful"), ("발랄한", "경쾌한")),
    Mood.CALM: (("calm", "relaxing"), ("차분한", "편안한")),
    Mood.SENSUAL: (("sensual", "seductive"), ("관능적인", "섹시한")),
}

_SEASON_WORDS: dict[Season, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Season.SPRING: (("for spring", "for springtime"), ("봄에 쓸", "봄용")),
    Season.SUMMER: (("for summer", "for hot summer days"), ("여름에 쓸", "여름용")),
    Season.AUTUMN: (("for autumn", "for fall"), ("가을에 쓸", "가을용")),
    Season.WINTER: (("for winter", "for cold winter nights"), ("겨울에 쓸", "겨울용")),
}

# Intensity words; EDP is also the silent default (no words at all).
_INTENSITY_WORDS: dict[Intensity, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Intensity.EDC: (("as an eau de cologne", "as a body splash"), ("코롱으로", "오드코롱으로")),
    Intensity.EDT: (("light and subtle", "as an eau de toilette"), ("가볍게", "오드뚜왈렛으로")),
    Intensity.EDP: (("as an eau de parfum",), ("오드퍼퓸으로",)),
    Intensity.PARFUM: (("long-lasting", "intense, extrait strength"), ("지속력 좋게", "진하게")),
}

# Clause templates: {x} is an adjective or noun (EN) or the Korean word.
_EN_STRENGTH = {
    STRONG: ("very {adj}", "lots of {noun}", "strongly {adj}", "{noun}-forward"),
    PLAIN: ("{adj}", "with {noun}", "something {adj}"),
    LIGHT: ("a hint of {noun}", "slightly {adj}", "a touch of {noun}"),
}
_KO_STRENGTH = {
    STRONG: ("아주 진한 {ko}", "{ko} 가득한", "확실한 {ko}"),
    PLAIN: ("{ko}", "{ko} 느낌"),
    LIGHT: ("살짝 {ko}", "약간의 {ko}", "{ko} 한 방울"),
}
_EN_AVOID_FAMILY = ("not too {adj}", "nothing {adj}", "no {noun}", "without {noun}")
_KO_AVOID_FAMILY = ("{ko} 없이", "{ko} 느낌은 빼고", "{ko}은 싫어요")
_EN_AVOID_NOTE = ("no {note}", "without {note}", "I hate {note}", "avoid {note}")
_KO_AVOID_NOTE = ("{note} 없이", "{note} 향은 빼고", "{note} 향은 싫어요")
_EN_NOTE = ("with {note}", "{note}", "some {note}", "a {note} note")
_KO_NOTE = ("{note}", "{note} 향", "{note} 노트")
# Gourmand is "sweet": the negation customers actually write gets its own phrasing.
_EN_NOT_SWEET = ("not too sweet", "not sweet at all", "no sugary sweetness")
_KO_NOT_SWEET = ("너무 달지 않게", "달지 않은", "단 향은 빼고")

# Sentence frames; {body} is the joined clauses. The last two of each language are held out.
_EN_FRAMES = (
    "I want {body}.",
    "Hi! I'm looking for {body}.",
    "{body}",
    "Make me a perfume: {body}.",
    "Do you have anything {body}?",
    "I need a gift, {body}.",
    "Here is what I like: {body}.",
    "Hello, {body} please",
    "Looking for a perfume: {body}.",
    "Can you make something {body}?",
    "{body}, please.",
    "A scent that is {body}.",
    "I'd love a fragrance, {body}.",
    "My request: {body}",
    "Please create a perfume {body}.",
    "Could I get {body}?",
    "Something for me: {body}!",
)
_KO_FRAMES = (
    "{body} 향수 만들어 주세요.",
    "안녕하세요, {body} 향수 있을까요?",
    "{body}",
    "선물하려고 하는데 {body} 향으로 해 주세요.",
    "{body} 향이 좋아요.",
    "저는 {body} 느낌을 좋아해요.",
    "{body} 향수로 부탁해요",
    "혹시 {body} 향수 가능할까요?",
    "{body} 향을 원해요.",
    "{body} 향수를 찾고 있어요.",
    "{body}, 부탁해요.",
    "제가 원하는 건 {body}.",
    "{body} 느낌으로 만들어 줘.",
    "{body} 향수 추천해 주세요.",
    "향수 주문: {body}",
    "{body} 향이면 좋겠어요.",
    "{body} 향수 하나 부탁드려요!",
)
_HELDOUT_FRAMES = 2
# Small talk around the request (no brief content): the model learns to read the clauses
# wherever they sit, not a fixed sentence shape.
_EN_FILLERS = (
    "Thanks!",
    "It's a gift for my sister.",
    "I work in an office.",
    "Budget is not an issue.",
    "I usually wear it every day.",
    "Thank you so much.",
)
_KO_FILLERS = (
    "감사합니다!",
    "선물용이에요.",
    "회사에 뿌리고 다닐 거예요.",
    "가격은 상관없어요.",
    "매일 쓸 거예요.",
    "잘 부탁드립니다.",
)
_EN_JOINERS = (", ", " and ", "; ", ", also ")
_KO_JOINERS = (", ", " 그리고 ", ", 또 ", " + ")


@lru_cache(maxsize=1)
def note_lexicon() -> dict[str, Family]:
    """Each lexicon note's catalogue name -> its main family (the heaviest in the catalogue).

    Raises:
        KeyError: A lexicon name is not in the shipped catalogue (the message names it).
    """
    catalog = default_catalog()
    families = {}
    for name in _NOTE_WORDS:
        profile = catalog[catalog.index_of(name)].profile
        families[name] = FAMILIES[max(range(len(FAMILIES)), key=lambda k: profile[k])]
    return families


@dataclass
class _Intent:
    """What the customer wants, before it is written as text (and the source of the label)."""

    families: dict[Family, float]
    include: list[str]
    avoid_notes: list[str]
    avoid_families: list[Family]
    mood: Mood | None
    season: Season | None
    intensity: Intensity
    intensity_said: bool

    def to_brief(self) -> Brief:
        profile = dict(self.families)
        for note in self.include:
            family = note_lexicon()[note]
            profile.setdefault(family, NOTE_FAMILY_WEIGHT)
        return Brief(
            profile=profile,
            intensity=self.intensity,
            include_notes=list(self.include),
            avoid_notes=list(self.avoid_notes),
            avoid_families=list(self.avoid_families),
            mood=self.mood,
            season=self.season,
        )


def _draw_intent(rng: random.Random) -> _Intent:
    n_families = rng.choice((0, 1, 1, 2, 2, 3))
    n_notes = rng.choice((0, 0, 1, 1, 2)) if n_families else rng.choice((1, 2))
    families = {
        f: rng.choice((STRONG, PLAIN, PLAIN, LIGHT)) for f in rng.sample(FAMILIES, n_families)
    }
    notes = list(note_lexicon())
    include = rng.sample(notes, n_notes)
    taken = set(families) | {note_lexicon()[n] for n in include}
    free_families = [f for f in FAMILIES if f not in taken]
    avoid_families = rng.sample(free_families, rng.choice((0, 0, 0, 1)))
    avoid_notes = rng.sample([n for n in notes if n not in include], rng.choice((0, 0, 0, 1)))
    intensity = rng.choice(tuple(Intensity))
    return _Intent(
        families=families,
        include=include,
        avoid_notes=avoid_notes,
        avoid_families=avoid_families,
        mood=rng.choice((None, None, *Mood)),
        season=rng.choice((None, None, *Season)),
        intensity=intensity,
        intensity_said=intensity is not Intensity.EDP or rng.random() < 0.3,
    )


def _clauses(intent: _Intent, language: Language, rng: random.Random) -> list[str]:
    """One short phrase per part of the intent, in the given language, shuffled."""
    en = language is Language.EN
    pick = rng.choice
    clauses = []
    for family, weight in intent.families.items():
        adjs, nouns, kos = _FAMILY_WORDS[family]
        template = pick((_EN_STRENGTH if en else _KO_STRENGTH)[weight])
        clauses.append(template.format(adj=pick(adjs), noun=pick(nouns), ko=pick(kos)))
    for note in intent.include:
        word = pick(_NOTE_WORDS[note][0 if en else 1])
        clauses.append(pick(_EN_NOTE if en else _KO_NOTE).format(note=word))
    for family in intent.avoid_families:
        adjs, nouns, kos = _FAMILY_WORDS[family]
        if family is Family.GOURMAND and rng.random() < 0.6:
            clauses.append(pick(_EN_NOT_SWEET if en else _KO_NOT_SWEET))
            continue
        template = pick(_EN_AVOID_FAMILY if en else _KO_AVOID_FAMILY)
        clauses.append(template.format(adj=pick(adjs), noun=pick(nouns), ko=pick(kos)))
    for note in intent.avoid_notes:
        word = pick(_NOTE_WORDS[note][0 if en else 1])
        clauses.append(pick(_EN_AVOID_NOTE if en else _KO_AVOID_NOTE).format(note=word))
    if intent.mood is not None:
        clauses.append(pick(_MOOD_WORDS[intent.mood][0 if en else 1]))
    if intent.season is not None:
        clauses.append(pick(_SEASON_WORDS[intent.season][0 if en else 1]))
    if intent.intensity_said:
        clauses.append(pick(_INTENSITY_WORDS[intent.intensity][0 if en else 1]))
    rng.shuffle(clauses)
    return clauses


def _frames(language: Language, split: Split) -> tuple[str, ...]:
    frames = _EN_FRAMES if language is Language.EN else _KO_FRAMES
    return frames[-_HELDOUT_FRAMES:] if split is Split.HELDOUT else frames[:-_HELDOUT_FRAMES]


def generate_example(rng: random.Random, split: Split = Split.TRAIN) -> LabelledText:
    """One labelled text (English or Korean, even odds) drawn with `rng`."""
    intent = _draw_intent(rng)
    language = rng.choice(tuple(Language))
    clauses = _clauses(intent, language, rng)
    joiners = _EN_JOINERS if language is Language.EN else _KO_JOINERS
    body = clauses[0]
    for clause in clauses[1:]:
        body += rng.choice(joiners) + clause
    text = rng.choice(_frames(language, split)).format(body=body)
    fillers = _EN_FILLERS if language is Language.EN else _KO_FILLERS
    if rng.random() < 0.25:
        text = f"{rng.choice(fillers)} {text}"
    if rng.random() < 0.25:
        text = f"{text} {rng.choice(fillers)}"
    return LabelledText(text=text, brief=intent.to_brief(), language=language)


def generate_examples(n: int, seed: int, split: Split = Split.TRAIN) -> list[LabelledText]:
    """`n` labelled texts, reproducible from `seed`."""
    rng = random.Random(f"{seed}-{split.value}")
    return [generate_example(rng, split) for _ in range(n)]


# ----------------------------------------------------------------------------- target format


def brief_to_json(brief: Brief) -> str:
    """The canonical answer the model is trained to write: compact JSON, zero weights left out.

    Leaving out the zero weights (the `Brief` fills them in) halves the answer's length, and
    the generation time with it; keys keep the schema's names so the answer is a `Brief` as is.
    """
    catalog = default_catalog()

    def in_catalog_order(notes: list[str]) -> list[str]:
        return sorted(notes, key=catalog.index_of)

    # Lists in one canonical order (catalogue, families' order): the order in which a text
    # names things is arbitrary, and a target that depends on it cannot be learned.
    payload = {
        "profile": {f.value: round(w, 2) for f, w in brief.profile.items() if w > 0},
        "intensity": brief.intensity.value,
        "include_notes": in_catalog_order(brief.include_notes),
        "avoid_notes": in_catalog_order(brief.avoid_notes),
        "avoid_families": [f.value for f in FAMILIES if f in brief.avoid_families],
        "mood": None if brief.mood is None else brief.mood.value,
        "season": None if brief.season is None else brief.season.value,
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def read_labelled_jsonl(path: str | Path) -> list[LabelledText]:
    """Labelled texts from a JSON-lines file of `{"text", "language", "brief"}` objects.

    Raises:
        ValueError: A line is not such an object or its brief does not validate (the message
            names the line).
    """
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            record = json.loads(line)
            brief = Brief.model_validate(record["brief"])
            examples.append(LabelledText(record["text"], brief, Language(record["language"])))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a labelled text ({error})") from error
    return examples
