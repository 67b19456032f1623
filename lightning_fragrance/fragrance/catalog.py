"""The ingredient catalogue shipped with the package (`fragrance/data/ingredients.csv`).

Each row is a common perfumery material: name, CAS number, note position, weights over the ten
olfactive families, relative volatility and, where a public IFRA restriction exists, the maximum
concentration in a fine fragrance (IFRA Category 4). The family weights and volatilities are
editorial judgements and every IFRA figure was transcribed, not checked against the current
IFRA Standards Library: the `illustrative` column names such fields per row. The catalogue is
for demonstration only, never for regulatory compliance.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np


class Family(str, Enum):
    """The olfactive families every profile (ingredient, brief, formula) is expressed over."""

    CITRUS = "citrus"
    FLORAL = "floral"
    WOODY = "woody"
    AMBER = "amber"
    GREEN = "green"
    FRUITY = "fruity"
    SPICY = "spicy"
    MUSK = "musk"
    AROMATIC = "aromatic"
    GOURMAND = "gourmand"


FAMILIES: tuple[Family, ...] = tuple(Family)


class NotePosition(str, Enum):
    """Where a material sits in the fragrance pyramid (how long it lasts on skin)."""

    TOP = "top"
    HEART = "heart"
    BASE = "base"


NOTE_POSITIONS: tuple[NotePosition, ...] = tuple(NotePosition)

_CAS_PATTERN = re.compile(r"^\d{2,7}-\d{2}-\d$")


class CatalogError(ValueError):
    """The catalogue file is malformed; the message names the row and the field."""


@dataclass(frozen=True)
class Ingredient:
    """One perfumery material of the catalogue.

    Attributes:
        name: Common name ("Bergamot oil").
        cas: CAS registry number ("8007-75-8").
        note: Position in the pyramid.
        profile: Weights over `FAMILIES`, each in [0, 1].
        volatility: Relative volatility in [0, 1] (1 = evaporates first).
        ifra_max_pct: Maximum percent in a finished fine fragrance, None when unrestricted.
        source: Where the IFRA figure (or its absence) comes from.
        illustrative: Fields whose values are editorial or unverified.
    """

    name: str
    cas: str
    note: NotePosition
    profile: tuple[float, ...]
    volatility: float
    ifra_max_pct: float | None
    source: str
    illustrative: tuple[str, ...]


class Catalog:
    """An ordered, immutable set of ingredients with vectorised views for the environment.

    Args:
        ingredients: The materials, in the order actions index them.
    """

    def __init__(self, ingredients: list[Ingredient]) -> None:
        if not ingredients:
            raise CatalogError("the catalogue is empty")
        names = [i.name for i in ingredients]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise CatalogError(f"duplicate ingredient names in the catalogue: {duplicates}")
        self.ingredients: tuple[Ingredient, ...] = tuple(ingredients)
        self._index = {i.name.lower(): k for k, i in enumerate(ingredients)}
        # Vectorised views, computed once: the reward is evaluated thousands of times a second.
        self.profiles = np.array([i.profile for i in ingredients], dtype=np.float64)
        self.note_matrix = np.array(
            [[1.0 if i.note is pos else 0.0 for pos in NOTE_POSITIONS] for i in ingredients]
        )
        self.unit_profiles = self.profiles / np.linalg.norm(self.profiles, axis=1, keepdims=True)
        self.ifra_limits = np.array(
            [np.inf if i.ifra_max_pct is None else i.ifra_max_pct for i in ingredients]
        )

    def __len__(self) -> int:
        return len(self.ingredients)

    def __getitem__(self, index: int) -> Ingredient:
        return self.ingredients[index]

    def index_of(self, name: str) -> int:
        """Position of an ingredient by case-insensitive name.

        Raises:
            KeyError: With the closest names, when no ingredient has this name.
        """
        try:
            return self._index[name.lower()]
        except KeyError:
            close = [i.name for i in self.ingredients if name.lower()[:4] in i.name.lower()]
            raise KeyError(
                f"no ingredient named {name!r} in the catalogue"
                + (f"; did you mean one of {close[:5]}?" if close else "")
            ) from None

    def names(self) -> list[str]:
        """Ingredient names in action order."""
        return [i.name for i in self.ingredients]


def _parse_row(row: dict[str, str], line: int) -> Ingredient:
    def number(field: str, low: float, high: float) -> float:
        raw = (row.get(field) or "").strip()
        try:
            value = float(raw)
        except ValueError:
            raise CatalogError(f"line {line}: {field}={raw!r} is not a number") from None
        if not low <= value <= high:
            raise CatalogError(f"line {line}: {field}={value} is outside [{low}, {high}]")
        return value

    name = (row.get("name") or "").strip()
    cas = (row.get("cas") or "").strip()
    if not name:
        raise CatalogError(f"line {line}: empty name")
    if not _CAS_PATTERN.match(cas):
        raise CatalogError(f"line {line}: CAS number {cas!r} of {name!r} is not NNNNNNN-NN-N")
    try:
        note = NotePosition((row.get("note") or "").strip())
    except ValueError:
        raise CatalogError(
            f"line {line}: note {row.get('note')!r} of {name!r} is not one of "
            f"{[p.value for p in NOTE_POSITIONS]}"
        ) from None
    profile = tuple(number(f.value, 0.0, 1.0) for f in FAMILIES)
    if not any(profile):
        raise CatalogError(f"line {line}: {name!r} has an all-zero family profile")
    ifra_raw = (row.get("ifra_max_pct") or "").strip()
    return Ingredient(
        name=name,
        cas=cas,
        note=note,
        profile=profile,
        volatility=number("volatility", 0.0, 1.0),
        ifra_max_pct=number("ifra_max_pct", 0.0, 100.0) if ifra_raw else None,
        source=(row.get("source") or "").strip(),
        illustrative=tuple(f for f in (row.get("illustrative") or "").split(";") if f),
    )


def load_catalog_file(path: str | Path) -> Catalog:
    """Read and validate a catalogue CSV with the shipped file's columns.

    Raises:
        CatalogError: On a missing column or an invalid value (the message names the line).
    """
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        required = {"name", "cas", "note", "volatility", "ifra_max_pct", "source"}
        required |= {f.value for f in FAMILIES}
        missing = sorted(required - set(reader.fieldnames or []))
        if missing:
            raise CatalogError(f"{path}: missing columns {missing}")
        return Catalog([_parse_row(row, n) for n, row in enumerate(reader, start=2)])


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The catalogue shipped as package data (loaded once per process)."""
    resource = resources.files("lightning_fragrance.fragrance") / "data" / "ingredients.csv"
    with resources.as_file(resource) as path:
        return load_catalog_file(path)
