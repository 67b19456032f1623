"""Policy and value networks for PPO, and the observation normaliser they carry.

Every piece of RL state a trained policy needs at inference (observation statistics, action
bounds) is a registered buffer, so a checkpoint, a rollback and an export all carry it. A
`PolicySpec` (primitives only) is enough to rebuild a `PolicyNetwork` before loading its state
dict, which is how serving rebuilds the model from an exported `config.json`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, Normal

ActionKind = Literal["discrete", "box"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of vectors (Chan et al. parallel update).

    Args:
        shape: Shape of one sample.
        clip: Normalised values are clipped to [-clip, clip].
        epsilon: Added to the variance before the square root, and the initial count.
    """

    mean: Tensor
    var: Tensor
    count: Tensor

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.clip = clip
        self.epsilon = epsilon
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(epsilon))

    @torch.no_grad()
    def update_from_moments(self, batch_mean: Tensor, batch_var: Tensor, batch_count: int) -> None:
        """Merge the moments of a batch (e.g. all-reduced across ranks) into the statistics."""
        delta = batch_mean - self.mean
        total = self.count + batch_count
        new_mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count
        m2 = m2 + delta.pow(2) * self.count * batch_count / total
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    @torch.no_grad()
    def update(self, batch: Tensor) -> None:
        """Merge a batch of samples (leading dimension = samples)."""
        flat = batch.reshape(-1, *self.mean.shape).to(self.mean.device, self.mean.dtype)
        self.update_from_moments(flat.mean(0), flat.var(0, unbiased=False), flat.shape[0])

    def normalize(self, x: Tensor) -> Tensor:
        """`(x - mean) / std`, clipped."""
        scaled = (x - self.mean) / torch.sqrt(self.var + self.epsilon)
        return scaled.clamp(-self.clip, self.clip)

    def scale(self, x: Tensor) -> Tensor:
        """`x / std` (no centring: used for rewards, whose sign carries meaning)."""
        return x / torch.sqrt(self.var + self.epsilon)


@dataclass(frozen=True)
class PolicySpec:
    """Everything needed to rebuild a `PolicyNetwork` (all primitives: JSON and
    `torch.load(weights_only=True)` safe).

    Attributes:
        observation_dim: Length of a flat observation.
        action_kind: "discrete" (Categorical) or "box" (diagonal Gaussian).
        action_dim: Number of discrete actions, or the length of a box action.
        action_low: Lower bounds of a box action (empty for discrete).
        action_high: Upper bounds of a box action (empty for discrete).
        hidden_sizes: Widths of the hidden layers.
        activation: "tanh", "relu" or "gelu".
        init_log_std: Initial log standard deviation of a Gaussian policy.
        normalize_observations: Whether observations go through the running normaliser.
    """

    observation_dim: int
    action_kind: ActionKind
    action_dim: int
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    init_log_std: float = -0.5
    normalize_observations: bool = True

    def __post_init__(self) -> None:
        if self.action_kind not in ("discrete", "box"):
            raise ValueError(f"action_kind={self.action_kind!r}; use 'discrete' or 'box'")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {sorted(_ACTIVATIONS)}")
        if self.action_kind == "box" and not (
            len(self.action_low) == len(self.action_high) == self.action_dim
        ):
            raise ValueError(
                f"a box action of dimension {self.action_dim} needs {self.action_dim} bounds, "
                f"got {len(self.action_low)} low and {len(self.action_high)} high"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for hyperparameters and export configs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PolicySpec:
        """Inverse of `to_dict`; unknown keys are ignored so a full hparams dict works."""
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        known["hidden_sizes"] = [int(h) for h in known.get("hidden_sizes", [64, 64])]
        known["action_low"] = [float(v) for v in known.get("action_low", [])]
        known["action_high"] = [float(v) for v in known.get("action_high", [])]
        return cls(**known)


def _mlp(sizes: list[int], activation: str, out_dim: int, out_gain: float) -> nn.Sequential:
    """An MLP with orthogonal init (gain sqrt(2) hidden, `out_gain` output), as in CleanRL."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layer = nn.Linear(fan_in, fan_out)
        nn.init.orthogonal_(layer.weight, math.sqrt(2.0))
        nn.init.zeros_(layer.bias)
        layers += [layer, _ACTIVATIONS[activation]()]
    head = nn.Linear(sizes[-1], out_dim)
    nn.init.orthogonal_(head.weight, out_gain)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


class PolicyNetwork(nn.Module):
    """The actor: observation -> action distribution.

    Args:
        spec: Architecture and action space.
    """

    action_low: Tensor
    action_high: Tensor

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        self.obs_normalizer = RunningMeanStd((spec.observation_dim,))
        sizes = [spec.observation_dim, *spec.hidden_sizes]
        # A small output gain makes the initial policy close to uniform / zero-mean (CleanRL).
        self.body = _mlp(sizes, spec.activation, spec.action_dim, out_gain=0.01)
        self.log_std: nn.Parameter | None = None
        if spec.action_kind == "box":
            self.log_std = nn.Parameter(torch.full((spec.action_dim,), spec.init_log_std))
        self.register_buffer("action_low", torch.tensor(spec.action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.tensor(spec.action_high, dtype=torch.float32))

    def _features(self, observations: Tensor) -> Tensor:
        observations = observations.to(self.action_low.dtype).flatten(1)
        if self.spec.normalize_observations:
            observations = self.obs_normalizer.normalize(observations)
        return observations

    def distribution(self, observations: Tensor) -> Distribution:
        """The action distribution for a batch of observations.

        Argument validation is off on purpose: a diverged policy (NaN parameters) must produce
        NaN statistics that the rollback guard can see, not an exception inside the update.
        """
        out = self.body(self._features(observations))
        if self.log_std is None:
            return Categorical(logits=out, validate_args=False)
        std = self.log_std.exp().expand_as(out)
        return Independent(Normal(out, std, validate_args=False), 1, validate_args=False)

    def evaluate(self, observations: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability of `actions` and the entropy, per sample."""
        dist = self.distribution(observations)
        return dist.log_prob(actions), dist.entropy()

    def act(self, observations: Tensor, deterministic: bool = True) -> Tensor:
        """Actions ready for the environment: clipped to the box, or class indices.

        Args:
            observations: A batch `(n, observation_dim)`.
            deterministic: The mode (argmax / Gaussian mean) instead of a sample.
        """
        if deterministic:
            # The mode needs no distribution object: argmax of the logits, or the Gaussian
            # mean. Building Normal + Independent was a third of a served request's policy time.
            out = self.body(self._features(observations))
            return out.argmax(-1) if self.log_std is None else self.clip_action(out)
        dist = self.distribution(observations)
        return self.clip_action(dist.sample())

    def clip_action(self, action: Tensor) -> Tensor:
        """Clip a box action to the bounds (identity for discrete actions)."""
        if self.log_std is None:
            return action
        return torch.maximum(torch.minimum(action, self.action_high), self.action_low)

    def forward(self, observations: Tensor) -> Tensor:
        """Greedy actions (what an exported policy serves)."""
        return self.act(observations, deterministic=True)


class ValueNetwork(nn.Module):
    """The critic: observation -> state value.

    Args:
        spec: The same spec as the policy (observation size, widths, activation).
    """

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        self.obs_normalizer = RunningMeanStd((spec.observation_dim,))
        self.body = _mlp([spec.observation_dim, *spec.hidden_sizes], spec.activation, 1, 1.0)

    def forward(self, observations: Tensor) -> Tensor:
        """Values, shape `(n,)`."""
        observations = observations.to(self.obs_normalizer.mean.dtype).flatten(1)
        if self.spec.normalize_observations:
            observations = self.obs_normalizer.normalize(observations)
        return self.body(observations).squeeze(-1)


def build_policy_net(spec: PolicySpec | dict[str, Any]) -> PolicyNetwork:
    """A fresh `PolicyNetwork` for a spec (or its dict form, e.g. a checkpoint's hparams)."""
    return PolicyNetwork(spec if isinstance(spec, PolicySpec) else PolicySpec.from_dict(spec))
