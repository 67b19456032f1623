"""`FormulationEnv`: the fragrance-formulation task as a Gymnasium environment.

One episode is one brief: `reset` draws a brief (or takes the one given), the observation
encodes it, the agent answers with one action (a composition over the catalogue plus a
concentration, see `dna.py`) and the episode ends with a reward in [0, 30]. A contextual bandit,
then: the hard part is the 97-dimensional continuous action, not credit assignment.

Registered as `FragranceFormulation-v0` when `lightning_fragrance.fragrance` is imported, so
`gymnasium.make("lightning_fragrance.fragrance:FragranceFormulation-v0")` works from anywhere.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lightning_fragrance.fragrance.brief import Brief, Intensity, Mood, Season, parse_brief
from lightning_fragrance.fragrance.catalog import (
    FAMILIES,
    Catalog,
    Family,
    default_catalog,
    load_catalog_file,
)
from lightning_fragrance.fragrance.dna import (
    MAX_REWARD,
    DecoderConfig,
    FormulaDNA,
    action_to_composition,
    brief_targets,
    decode_action,
    reward_terms,
)

ENV_ID = "FragranceFormulation-v0"

_INTENSITIES = tuple(Intensity)
_MOODS = tuple(Mood)
_SEASONS = tuple(Season)


def observation_size(catalog: Catalog) -> int:
    """Length of an encoded brief for `catalog`."""
    return (
        len(FAMILIES) + len(_INTENSITIES) + len(_MOODS) + 1 + len(_SEASONS) + 1 + 2 * len(catalog)
    )


def encode_brief(brief: Brief, catalog: Catalog) -> np.ndarray:
    """The observation for a brief: every entry in [0, 1].

    Layout: family profile (10) | intensity one-hot (4) | mood one-hot with "none" (8) |
    season one-hot with "none" (5) | include mask over the catalogue | avoid mask.
    """
    intensity = np.zeros(len(_INTENSITIES), dtype=np.float32)
    intensity[_INTENSITIES.index(brief.intensity)] = 1.0
    mood = np.zeros(len(_MOODS) + 1, dtype=np.float32)
    mood[_MOODS.index(brief.mood) + 1 if brief.mood else 0] = 1.0
    season = np.zeros(len(_SEASONS) + 1, dtype=np.float32)
    season[_SEASONS.index(brief.season) + 1 if brief.season else 0] = 1.0
    include = np.zeros(len(catalog), dtype=np.float32)
    include[[catalog.index_of(n) for n in brief.include_notes]] = 1.0
    avoid = np.zeros(len(catalog), dtype=np.float32)
    avoid[[catalog.index_of(n) for n in brief.avoid_notes]] = 1.0
    profile = np.asarray(brief.profile_vector(), dtype=np.float32)
    return np.concatenate([profile, intensity, mood, season, include, avoid])


def sample_brief(rng: np.random.Generator, catalog: Catalog) -> Brief:
    """A random but plausible brief: 1 to 3 families, maybe a mood, season and notes.

    Requested and avoided notes are drawn among materials that fit the profile, so that
    honouring them is a real trade-off and not a free rule.
    """
    count = 1 + int(np.searchsorted([0.3, 0.75], rng.random()))
    chosen = rng.permutation(len(FAMILIES))[:count]
    weights = [1.0] + [float(rng.uniform(0.3, 1.0)) for _ in range(count - 1)]
    profile: dict[Family, float] = {
        FAMILIES[int(i)]: w for i, w in zip(chosen, weights, strict=True)
    }
    target = np.array([profile.get(f, 0.0) for f in FAMILIES])
    candidates = np.argsort(-(catalog.unit_profiles @ target))[:12]
    include: list[str] = []
    avoid: list[str] = []
    if rng.random() < 0.5:
        include.append(catalog[int(candidates[rng.integers(len(candidates))])].name)
    if rng.random() < 0.3:
        options = [c for c in candidates if catalog[int(c)].name not in include]
        avoid.append(catalog[int(options[rng.integers(len(options))])].name)
    # model_construct skips validation: every field is valid by construction here, and
    # validating cost as much as the rest of an environment step.
    return Brief.model_construct(
        profile={f: profile.get(f, 0.0) for f in FAMILIES},
        intensity=_INTENSITIES[int(rng.integers(len(_INTENSITIES)))],
        include_notes=include,
        avoid_notes=avoid,
        avoid_families=[],
        mood=_MOODS[int(rng.integers(len(_MOODS)))] if rng.random() < 0.5 else None,
        season=_SEASONS[int(rng.integers(len(_SEASONS)))] if rng.random() < 0.5 else None,
    )


def _as_brief(value: Brief | dict[str, Any] | str) -> Brief:
    if isinstance(value, Brief):
        return value
    if isinstance(value, str):
        return parse_brief(value)
    return Brief.model_validate(dict(value))


class FormulationEnv(gym.Env[np.ndarray, np.ndarray]):
    """Fragrance formulation as a one-step Gymnasium environment.

    Args:
        brief: A fixed brief for every episode (a `Brief`, its dict form, or text for
            `parse_brief`); None draws a random brief at each reset.
        catalog_path: A catalogue CSV with the shipped columns; None uses the shipped one.
        max_ingredients: At most this many materials per formula.
        render_mode: "ansi" renders the last formula as text.

    Observation: `encode_brief` of the episode's brief, `Box(0, 1, (obs_size,))`.
    Action: `Box(-1, 1, (len(catalog) + 1,))`: ingredient logits and the concentration.
    Reward: in [0, 30]; `info["reward_terms"]` holds each term, `info["ifra_violations"]` the
    number of materials above their IFRA limit.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        brief: Brief | dict[str, Any] | str | None = None,
        catalog_path: str | None = None,
        max_ingredients: int = 15,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; supported: {self.metadata}")
        self.catalog = load_catalog_file(catalog_path) if catalog_path else default_catalog()
        self.decoder = DecoderConfig(max_ingredients=max_ingredients)
        self.fixed_brief = _as_brief(brief) if brief is not None else None
        self.render_mode = render_mode
        size = observation_size(self.catalog)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(size,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(len(self.catalog) + 1,), dtype=np.float32)
        self.reward_range = (0.0, MAX_REWARD)
        self.brief: Brief | None = None
        self._observation = np.zeros(size, dtype=np.float32)
        self._last_action: np.ndarray | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; `options={"brief": ...}` sets its brief."""
        super().reset(seed=seed)
        if options and options.get("brief") is not None:
            self.brief = _as_brief(options["brief"])
        elif self.fixed_brief is not None:
            self.brief = self.fixed_brief
        else:
            self.brief = sample_brief(self.np_random, self.catalog)
        self._targets = brief_targets(self.brief, self.catalog)
        self._observation = encode_brief(self.brief, self.catalog)
        self._last_action = None
        return self._observation.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Score one formula; the episode always ends."""
        if self.brief is None:
            raise RuntimeError("call reset() before step()")
        shares, concentration = action_to_composition(
            np.asarray(action), len(self.catalog), self.decoder
        )
        terms = reward_terms(shares, concentration, self._targets, self.catalog)
        total = terms.pop("total")
        violations = int(np.sum(shares * concentration > self.catalog.ifra_limits))
        self._last_action = np.asarray(action, dtype=np.float64)
        info = {"reward_terms": terms, "ifra_violations": violations}
        return self._observation.copy(), total, True, False, info

    def decode(self, action: np.ndarray) -> FormulaDNA:
        """The formula of `action` for the current brief."""
        if self.brief is None:
            raise RuntimeError("call reset() before decode()")
        return decode_action(action, self.brief, self.catalog, self.decoder)

    def render(self) -> str | None:
        """The last formula as text ("ansi" mode)."""
        if self.render_mode != "ansi":
            return None
        if self._last_action is None:
            return ""
        dna = self.decode(self._last_action)
        lines = [f"{i.percent:6.2f}%  {i.name} ({i.note.value})" for i in dna.ingredients]
        return "\n".join([*lines, f"total {dna.concentration_pct:.2f}%"])
