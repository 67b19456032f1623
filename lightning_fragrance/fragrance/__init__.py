"""The fragrance-formulation reference task: catalogue, brief, environment, decoder, baselines.

Importing this package registers the Gymnasium id `FragranceFormulation-v0`.
"""

import gymnasium as gym

from lightning_fragrance.fragrance.brief import (
    Brief,
    BriefError,
    Intensity,
    Mood,
    Season,
    parse_brief,
)
from lightning_fragrance.fragrance.catalog import (
    FAMILIES,
    Catalog,
    CatalogError,
    Family,
    Ingredient,
    NotePosition,
    default_catalog,
    load_catalog_file,
)
from lightning_fragrance.fragrance.dna import (
    DecoderConfig,
    FormulaDNA,
    FormulaIngredient,
    RewardBreakdown,
    decode_action,
    formulate,
)
from lightning_fragrance.fragrance.env import (
    ENV_ID,
    FormulationEnv,
    encode_brief,
    observation_size,
    sample_brief,
)

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="lightning_fragrance.fragrance.env:FormulationEnv")

__all__ = [
    "ENV_ID",
    "FAMILIES",
    "Brief",
    "BriefError",
    "Catalog",
    "CatalogError",
    "DecoderConfig",
    "Family",
    "FormulaDNA",
    "FormulaIngredient",
    "FormulationEnv",
    "Ingredient",
    "Intensity",
    "Mood",
    "NotePosition",
    "RewardBreakdown",
    "Season",
    "decode_action",
    "default_catalog",
    "encode_brief",
    "formulate",
    "load_catalog_file",
    "observation_size",
    "parse_brief",
    "sample_brief",
]
