"""`RollbackConditions`: the thresholds and policies that decide when and where to roll back."""

from __future__ import annotations

import dataclasses
from enum import Enum


class BaselineMode(str, Enum):
    """What a step's loss, reward and grad norm are compared with."""

    CHECKPOINT = "checkpoint"
    """The operations guide: the metrics recorded with the checkpoint a rollback would restore."""
    WINDOW_MEDIAN = "window_median"
    """The median of the last ``window`` healthy steps (robust to one noisy batch)."""


@dataclasses.dataclass
class RollbackConditions:
    """Thresholds of the divergence triggers and the policies around a rollback.

    The thresholds default to the operations guide's (KL 0.03, loss 2.0x, reward drop 30 %,
    compared with the checkpoint a rollback would restore, acting on the first bad reading).
    The choice of target does not: a state becomes a rollback target only once fresh evidence
    produced after it was healthy (``certify=True``); ``certify=False`` is the guide's literal
    "roll back to the latest checkpoint". Every other addition is opt-in.

    Args:
        kl_threshold: Roll back when the KL divergence is above this value (absolute; per-update
            k3 KL in PPO, research note "divergence-rollback-practice" §2.8).
        loss_increase_multiplier: Roll back when ``|loss| > multiplier x |baseline loss|``.
        reward_drop_threshold: Roll back when the reward fell by more than this fraction of
            ``|baseline reward|``.
        baseline: ``"checkpoint"`` (the guide) or ``"window_median"``: the median of the last
            ``window`` healthy steps. A window, not the previous step, because one noisy batch
            is not a divergence (research: loss ranged 1.3-15.7 batch to batch on a toy run).
        window: Number of healthy steps in the median window. Relative triggers stay silent
            until the window is full (warm-up), as in Lightning's `SpikeDetection`.
        patience: Consecutive bad steps needed before a trigger fires (llm-foundry uses 5);
            1 = act on the first bad step, as the guide does. Non-finite values ignore it.
        min_baseline_magnitude: Floor for ``|baseline|``: PPO losses cross zero, and a ratio
            to ~0 would fire on noise.
        grad_norm_threshold: Optional: roll back when the gradient norm exceeds this multiple
            of the baseline grad norm (cosmos uses 10x the window median; grad norm leads
            loss spikes by several steps, BLOOM-176B chronicles). None disables it.
        certify: Known-good targets (default): a checkpoint becomes a rollback target only once
            every watched signal produced a healthy value after its state; a checkpoint whose
            first fresh evidence is bad is rejected. A checkpoint saved after a fault but before
            the metrics show it (epoch-level or per-rollout logging) holds damaged weights with
            healthy-looking stale metrics; restoring it restores the fault. False = the guide's
            literal behaviour: every committed checkpoint is a target, the newest first.
        certify_after_steps: With ``certify``, also wait this many steps after a checkpoint
            before it becomes a target (0 = as soon as the evidence is in). PaLM restarted
            ~100 steps before a spike: a longer wait keeps targets further from the onset.
        max_rollbacks: Maximum number of rollbacks within ``rollback_budget_window`` steps;
            one more trigger raises `RollbackBudgetExceeded`. None = unlimited.
        rollback_budget_window: Width in steps of the budget window.
    """

    kl_threshold: float = 0.03
    loss_increase_multiplier: float = 2.0
    reward_drop_threshold: float = 0.3
    baseline: str = BaselineMode.CHECKPOINT.value
    window: int = 20
    patience: int = 1
    min_baseline_magnitude: float = 1e-3
    grad_norm_threshold: float | None = None
    certify: bool = True
    certify_after_steps: int = 0
    max_rollbacks: int | None = 3
    rollback_budget_window: int = 1000

    def thresholds(self) -> dict[str, float]:
        """The three thresholds of the guide, by name (published to metrics per run)."""
        return {
            "kl_threshold": self.kl_threshold,
            "loss_increase_multiplier": self.loss_increase_multiplier,
            "reward_drop_threshold": self.reward_drop_threshold,
        }

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.kl_threshold > 0:
            problems.append(f"kl_threshold={self.kl_threshold} must be > 0")
        if not self.loss_increase_multiplier > 1:  # a huge value switches the trigger off
            problems.append(
                f"loss_increase_multiplier={self.loss_increase_multiplier} must be > 1 "
                "(1 or less would fire on every step whose loss did not go down)"
            )
        if not self.reward_drop_threshold > 0:
            problems.append(
                f"reward_drop_threshold={self.reward_drop_threshold} must be > 0 "
                "(a value above 1 switches the reward trigger off for positive rewards)"
            )
        modes = [m.value for m in BaselineMode]
        if self.baseline not in modes:
            problems.append(f"baseline={self.baseline!r} must be one of {modes}")
        if self.window < 1:
            problems.append(f"window={self.window} must be >= 1")
        if self.patience < 1:
            problems.append(f"patience={self.patience} must be >= 1")
        if not self.min_baseline_magnitude > 0:
            problems.append(f"min_baseline_magnitude={self.min_baseline_magnitude} must be > 0")
        if self.grad_norm_threshold is not None and not self.grad_norm_threshold > 1:
            problems.append(f"grad_norm_threshold={self.grad_norm_threshold} must be > 1 or None")
        if self.certify_after_steps < 0:
            problems.append(f"certify_after_steps={self.certify_after_steps} must be >= 0")
        if self.max_rollbacks is not None and self.max_rollbacks < 0:
            problems.append(f"max_rollbacks={self.max_rollbacks} must be >= 0 or None")
        if self.rollback_budget_window < 1:
            problems.append(f"rollback_budget_window={self.rollback_budget_window} must be >= 1")
        if problems:
            raise ValueError("Invalid RollbackConditions: " + "; ".join(problems))
