"""From an action to a fragrance formula ("DNA"), and the score of that formula for a brief.

The environment, the baselines and the serving layer share these functions, so a formula served
to a customer is decoded and checked exactly as it was during training.

An action is a vector of `len(catalog) + 1` numbers in [-1, 1]: one logit per ingredient and a
last entry for the total concentration. `decode_action` turns it into shares of the concentrate
(softmax, keep at most `max_ingredients`, drop traces), the percent of each ingredient in the
finished product (shares times the concentration, so they sum to the concentration), the
predicted family profile, the pyramid, and the IFRA check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from lightning_fragrance.fragrance.brief import Brief, Mood, Season
from lightning_fragrance.fragrance.catalog import (
    FAMILIES,
    NOTE_POSITIONS,
    Catalog,
    Family,
    NotePosition,
    default_catalog,
)

# Concentration the action can express, percent of the finished product. The widest usual
# range (a splash at 1 % up to an extrait at 35 %) so every intensity is reachable.
MIN_CONCENTRATION = 1.0
MAX_CONCENTRATION = 35.0

# Reward weights; they sum to MAX_REWARD. Profile match dominates because it is what the
# customer asked for; the pyramid is what makes a formula wearable over hours.
MAX_REWARD = 30.0
PROFILE_WEIGHT = 12.0
PYRAMID_WEIGHT = 7.0
CONCENTRATION_WEIGHT = 4.0
COMPLEXITY_WEIGHT = 3.0
NOTES_WEIGHT = 4.0
# Each IFRA violation costs a fixed amount plus an amount growing with the excess ratio, so a
# policy learns both "do not use it above the limit" and "the further above, the worse".
IFRA_PENALTY_PER_VIOLATION = 2.0
IFRA_PENALTY_PER_EXCESS = 4.0


@dataclass(frozen=True)
class DecoderConfig:
    """How an action becomes a composition.

    Attributes:
        logit_scale: Action entries in [-1, 1] are multiplied by this before the softmax; 5
            lets one material outweigh another by up to e^10.
        max_ingredients: Keep at most this many materials (a real formula has 5 to 15 in its
            top list; the rest are traces).
        min_share: Materials below this share of the concentrate are dropped as traces.
    """

    logit_scale: float = 5.0
    max_ingredients: int = 15
    min_share: float = 0.005


class FormulaIngredient(BaseModel):
    """One line of a formula."""

    model_config = ConfigDict(frozen=True)

    name: str
    cas: str
    note: NotePosition
    percent: float  # of the finished product
    share: float  # of the fragrance concentrate, in [0, 1]
    ifra_max_pct: float | None
    within_ifra: bool


class RewardBreakdown(BaseModel):
    """The reward of a formula for a brief, term by term (all in reward points)."""

    model_config = ConfigDict(frozen=True)

    profile_match: float
    pyramid_balance: float
    concentration: float
    complexity: float
    notes: float
    ifra_penalty: float
    total: float


class FormulaDNA(BaseModel):
    """A decoded formula: what the service returns for a brief."""

    model_config = ConfigDict(frozen=True)

    ingredients: list[FormulaIngredient]
    concentration_pct: float
    predicted_profile: dict[Family, float]
    pyramid: dict[NotePosition, float]
    ifra_compliant: bool
    ifra_violations: list[str]
    reward: RewardBreakdown


@dataclass(frozen=True)
class BriefTargets:
    """A brief pre-computed as arrays for fast scoring."""

    profile: np.ndarray
    pyramid: np.ndarray
    concentration_range: tuple[float, float]
    include: np.ndarray
    avoid: np.ndarray


def target_pyramid(brief: Brief) -> np.ndarray:
    """Target top / heart / base split for a brief.

    A classic balanced pyramid is about 25 / 40 / 35; fresh, playful, spring and summer briefs
    lift the top, warm, sensual, autumn and winter briefs lift the base.
    """
    shift = 0.0
    if brief.mood in (Mood.FRESH, Mood.PLAYFUL) or brief.season in (Season.SPRING, Season.SUMMER):
        shift += 0.1
    if brief.mood in (Mood.WARM, Mood.SENSUAL) or brief.season in (Season.AUTUMN, Season.WINTER):
        shift -= 0.1
    return np.array([0.25 + shift, 0.40, 0.35 - shift])


def brief_targets(brief: Brief, catalog: Catalog) -> BriefTargets:
    """Vectorise a brief against a catalogue."""
    return BriefTargets(
        profile=np.asarray(brief.profile_vector(), dtype=np.float64),
        pyramid=target_pyramid(brief),
        concentration_range=brief.concentration_range,
        include=np.array([catalog.index_of(n) for n in brief.include_notes], dtype=np.int64),
        avoid=np.array([catalog.index_of(n) for n in brief.avoid_notes], dtype=np.int64),
    )


def action_to_composition(
    action: np.ndarray, n_ingredients: int, config: DecoderConfig = DecoderConfig()
) -> tuple[np.ndarray, float]:
    """Shares of the concentrate (summing to 1) and the total concentration of an action.

    Raises:
        ValueError: When the action has the wrong length or is not finite.
    """
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape[0] != n_ingredients + 1:
        raise ValueError(
            f"action has {action.shape[0]} entries; expected {n_ingredients + 1} "
            f"({n_ingredients} ingredient logits + 1 concentration)"
        )
    if not np.all(np.isfinite(action)):
        raise ValueError("action contains NaN or infinite values")
    action = np.clip(action, -1.0, 1.0)
    logits = config.logit_scale * action[:n_ingredients]
    shares = np.exp(logits - logits.max())
    shares /= shares.sum()
    keep = np.argsort(-shares, kind="stable")[: config.max_ingredients]
    kept = np.zeros_like(shares)
    kept[keep] = shares[keep]
    kept[kept < config.min_share] = 0.0
    kept[keep[0]] = shares[keep[0]]  # the leading material is never a trace
    kept /= kept.sum()
    span = MAX_CONCENTRATION - MIN_CONCENTRATION
    concentration = MIN_CONCENTRATION + (action[n_ingredients] + 1.0) / 2.0 * span
    return kept, float(concentration)


def score_composition(
    shares: np.ndarray, concentration: float, targets: BriefTargets, catalog: Catalog
) -> RewardBreakdown:
    """Reward of a composition for a brief as a `RewardBreakdown` (see `reward_terms`)."""
    return RewardBreakdown(**reward_terms(shares, concentration, targets, catalog))


def reward_terms(
    shares: np.ndarray, concentration: float, targets: BriefTargets, catalog: Catalog
) -> dict[str, float]:
    """Reward in [0, MAX_REWARD] of a composition for a brief, term by term, and `total`.

    Terms: cosine match of the predicted family profile, closeness of the pyramid to the
    brief's target, total concentration inside the intensity's range, a wearable number of
    materials, requested notes present and avoided notes absent, minus IFRA penalties.
    """
    predicted = shares @ catalog.profiles
    norm = np.linalg.norm(predicted) * np.linalg.norm(targets.profile)
    cosine = float(predicted @ targets.profile / norm) if norm > 0 else 0.0
    pyramid = shares @ catalog.note_matrix
    pyramid_score = 1.0 - 0.5 * float(np.abs(pyramid - targets.pyramid).sum())

    low, high = targets.concentration_range
    outside = max(low - concentration, concentration - high, 0.0)
    concentration_score = max(0.0, 1.0 - outside / 5.0)

    effective_count = 1.0 / float(np.sum(shares**2))
    complexity_score = min(1.0, max(0.0, (effective_count - 1.0) / 4.0))

    include_score = (
        float(np.mean(np.minimum(1.0, shares[targets.include] / 0.03)))
        if targets.include.size
        else 1.0
    )
    avoid_score = (
        1.0 - min(1.0, float(shares[targets.avoid].sum()) / 0.02) if targets.avoid.size else 1.0
    )
    ratios = shares * concentration / catalog.ifra_limits
    excess = ratios[ratios > 1.0] - 1.0
    penalty = IFRA_PENALTY_PER_VIOLATION * excess.size + IFRA_PENALTY_PER_EXCESS * float(
        np.minimum(excess, 2.0).sum()
    )
    terms = {
        "profile_match": PROFILE_WEIGHT * max(cosine, 0.0),
        "pyramid_balance": PYRAMID_WEIGHT * pyramid_score,
        "concentration": CONCENTRATION_WEIGHT * concentration_score,
        "complexity": COMPLEXITY_WEIGHT * complexity_score,
        "notes": NOTES_WEIGHT * 0.5 * (include_score + avoid_score),
    }
    total = min(MAX_REWARD, max(0.0, sum(terms.values()) - penalty))
    # A plain dict: the environment calls this thousands of times a second and a pydantic
    # model per call cost a third of the step time.
    return {**terms, "ifra_penalty": penalty, "total": total}


def decode_action(
    action: np.ndarray | torch.Tensor | list[float],
    brief: Brief,
    catalog: Catalog | None = None,
    config: DecoderConfig = DecoderConfig(),
) -> FormulaDNA:
    """Decode an action into the formula for `brief`, with its score and IFRA check.

    Args:
        action: `len(catalog) + 1` numbers; values outside [-1, 1] are clipped.
        brief: The brief the formula answers.
        catalog: Defaults to the shipped catalogue.
        config: Decoder settings (must match the ones used in training).

    Raises:
        ValueError: When the action has the wrong length or is not finite.
    """
    catalog = catalog or default_catalog()
    if isinstance(action, torch.Tensor):
        action = action.detach().cpu().numpy()
    shares, concentration = action_to_composition(np.asarray(action), len(catalog), config)
    reward = score_composition(shares, concentration, brief_targets(brief, catalog), catalog)
    lines = []
    violations = []
    order = np.argsort(-shares, kind="stable")
    order = order[shares[order] > 0.0]
    kept = shares[order]
    # Plain floats from one tolist() each: numpy scalar arithmetic per line cost more than the
    # formula's whole score.
    for index, share, percent in zip(
        order.tolist(), kept.tolist(), (kept * concentration).tolist(), strict=True
    ):
        material = catalog[index]
        within = material.ifra_max_pct is None or percent <= material.ifra_max_pct
        if not within:
            violations.append(
                f"{material.name}: {percent:.3f}% > IFRA limit {material.ifra_max_pct}%"
            )
        # model_construct: every field comes from the catalogue or from floats computed
        # here, so validating them again per line only cost time (a tenth of the decode).
        lines.append(
            FormulaIngredient.model_construct(
                name=material.name,
                cas=material.cas,
                note=material.note,
                percent=percent,
                share=share,
                ifra_max_pct=material.ifra_max_pct,
                within_ifra=within,
            )
        )
    predicted = shares @ catalog.profiles
    predicted = predicted / predicted.max() if predicted.max() > 0 else predicted
    pyramid = shares @ catalog.note_matrix
    return FormulaDNA(
        ingredients=lines,
        concentration_pct=concentration,
        predicted_profile={f: float(v) for f, v in zip(FAMILIES, predicted, strict=True)},
        pyramid={p: float(v) for p, v in zip(NOTE_POSITIONS, pyramid, strict=True)},
        ifra_compliant=not violations,
        ifra_violations=violations,
        reward=reward,
    )


class PolicyLike(Protocol):
    """Anything that maps a batch of observations to actions (e.g. `rl.PolicyNetwork`)."""

    def act(self, observations: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Actions for a batch of observations."""
        ...


def formulate(
    policy_net: PolicyLike,
    brief: Brief,
    catalog: Catalog | None = None,
    config: DecoderConfig = DecoderConfig(),
) -> FormulaDNA:
    """The formula a trained policy proposes for a brief (greedy action, no sampling).

    Args:
        policy_net: The trained policy, e.g. `PPO.policy_net` or one rebuilt from an export.
        brief: The brief.
        catalog: Defaults to the shipped catalogue (must be the one the policy was trained on).
        config: Decoder settings used in training.
    """
    # Local import: encode_brief lives with the environment, which imports this module.
    from lightning_fragrance.fragrance.env import encode_brief

    catalog = catalog or default_catalog()
    device = torch.device("cpu")
    if isinstance(policy_net, torch.nn.Module):  # follow the policy to its device
        device = next((p.device for p in policy_net.parameters()), device)
    observation = torch.as_tensor(encode_brief(brief, catalog), device=device).unsqueeze(0)
    with torch.no_grad():
        action = policy_net.act(observation, deterministic=True)[0]
    return decode_action(action, brief, catalog, config)
