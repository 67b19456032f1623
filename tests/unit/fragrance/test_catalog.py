"""The shipped ingredient catalogue and the catalogue loader's validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_fragrance.fragrance.catalog import (
    FAMILIES,
    CatalogError,
    NotePosition,
    default_catalog,
    load_catalog_file,
)

HEADER = (
    "name,cas,note,citrus,floral,woody,amber,green,fruity,spicy,musk,aromatic,gourmand,"
    "volatility,ifra_max_pct,source,illustrative\n"
)


def test_shipped_catalogue_has_at_least_60_materials_with_complete_rows() -> None:
    catalog = default_catalog()
    assert len(catalog) >= 60
    assert len(FAMILIES) >= 10
    assert len({i.cas for i in catalog.ingredients}) == len(catalog)
    assert {i.note for i in catalog.ingredients} == set(NotePosition)
    for material in catalog.ingredients:
        assert re.fullmatch(r"\d{2,7}-\d{2}-\d", material.cas), material.name
        assert len(material.profile) == len(FAMILIES)
        assert max(material.profile) > 0
        assert 0.0 <= material.volatility <= 1.0
        assert material.source, f"{material.name} has no source"


def test_restricted_materials_carry_an_ifra_limit_a_source_and_an_illustrative_flag() -> None:
    restricted = [i for i in default_catalog().ingredients if i.ifra_max_pct is not None]
    assert len(restricted) >= 10
    for material in restricted:
        assert "IFRA" in material.source
        assert "ifra_max_pct" in material.illustrative  # transcribed, not verified


def test_catalogue_row_with_a_malformed_cas_number_is_rejected_with_its_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "Lemon oil,8008-56,top,1,0,0,0,0,0,0,0,0,0,0.9,,x,\n")
    with pytest.raises(CatalogError, match=r"line 2: CAS number '8008-56'"):
        load_catalog_file(path)


def test_catalogue_with_a_missing_column_is_rejected_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER.replace("gourmand,", "") + "x\n")
    with pytest.raises(CatalogError, match=r"missing columns.*gourmand"):
        load_catalog_file(path)


def test_catalogue_weight_outside_unit_interval_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "Lemon oil,8008-56-8,top,1.5,0,0,0,0,0,0,0,0,0,0.9,,x,\n")
    with pytest.raises(CatalogError, match=r"citrus=1.5 is outside \[0.0, 1.0\]"):
        load_catalog_file(path)


def test_unknown_ingredient_name_suggests_close_matches() -> None:
    with pytest.raises(KeyError, match=r"did you mean.*Rose oil"):
        default_catalog().index_of("Rose")
