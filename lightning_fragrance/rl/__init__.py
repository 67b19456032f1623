"""PPO for Gymnasium environments as a Lightning module, with its networks and statistics."""

from lightning_fragrance.rl.evaluation import evaluate_policy
from lightning_fragrance.rl.networks import (
    PolicyNetwork,
    PolicySpec,
    RunningMeanStd,
    ValueNetwork,
    build_policy_net,
)
from lightning_fragrance.rl.ppo import (
    PPO,
    NonFiniteActionError,
    make_vector_env,
    policy_from_state,
    policy_spec_for_env,
)
from lightning_fragrance.rl.rollout import Rollout, clip_fraction, compute_gae, k3_kl

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
