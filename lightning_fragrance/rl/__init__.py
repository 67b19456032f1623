"""PPO for Gymnasium environments as a Lightning module, with its networks and statistics.

The networks and the rollout maths need torch alone and import eagerly. ``PPO`` and the
helpers in ``ppo`` / ``evaluation`` import Lightning and Gymnasium, so they load on first
attribute access (PEP 562): a serving process that only rebuilds ``PolicyNetwork`` from an
export never pays Lightning's import (9-20 s per process on a 2-core machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_fragrance.lazy_exports import lazy_exports
from lightning_fragrance.rl.networks import (
    PolicyNetwork,
    PolicySpec,
    RunningMeanStd,
    ValueNetwork,
    build_policy_net,
)
from lightning_fragrance.rl.rollout import Rollout, clip_fraction, compute_gae, k3_kl

if TYPE_CHECKING:
    from lightning_fragrance.rl.evaluation import evaluate_policy
    from lightning_fragrance.rl.ppo import (
        PPO,
        NonFiniteActionError,
        make_vector_env,
        policy_from_state,
        policy_spec_for_env,
    )

# Names that need Lightning (or Gymnasium), with the module that defines them.
_LAZY: dict[str, str] = {
    "PPO": "lightning_fragrance.rl.ppo",
    "NonFiniteActionError": "lightning_fragrance.rl.ppo",
    "make_vector_env": "lightning_fragrance.rl.ppo",
    "policy_from_state": "lightning_fragrance.rl.ppo",
    "policy_spec_for_env": "lightning_fragrance.rl.ppo",
    "evaluate_policy": "lightning_fragrance.rl.evaluation",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "PPO",
    "NonFiniteActionError",
    "PolicyNetwork",
    "PolicySpec",
    "Rollout",
    "RunningMeanStd",
    "ValueNetwork",
    "build_policy_net",
    "clip_fraction",
    "compute_gae",
    "evaluate_policy",
    "k3_kl",
    "make_vector_env",
    "policy_from_state",
    "policy_spec_for_env",
]
