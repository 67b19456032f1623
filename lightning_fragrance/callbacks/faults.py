"""`FaultInjection`: break a healthy run on purpose at a chosen step (demos, tests, benchmarks).

Three faults, each a divergence seen in practice:

* ``lr_spike``: every learning rate is multiplied by ``lr_factor`` at ``at_step`` and stays
  there (a bad schedule or a config typo). Only restoring the optimizer state undoes it, which a
  rollback does.
* ``reward_flip``: the reward the learner sees is negated for ``duration`` steps (a broken
  reward model). Needs a module with a ``reward_scale`` attribute, as `lightning_fragrance.rl.PPO`.
* ``nan_grad``: every gradient of the step at ``at_step`` is NaN (an overflow), so the weights
  become NaN.

``global_step`` keeps counting through rollbacks, so a fault fires once and does not come back
after the guard restored an earlier state.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Protocol, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger("lightning_fragrance.callbacks.faults")


class _RewardScaled(Protocol):
    reward_scale: float


def _set_reward_scale(pl_module: pl.LightningModule, value: float) -> None:
    cast(_RewardScaled, pl_module).reward_scale = value


class FaultKind(str, Enum):
    """The divergences `FaultInjection` can cause."""

    LR_SPIKE = "lr_spike"
    REWARD_FLIP = "reward_flip"
    NAN_GRAD = "nan_grad"


class FaultInjection(Callback):
    """Inject a divergence into a run at a chosen optimizer step.

    Args:
        kind: "lr_spike", "reward_flip" or "nan_grad".
        at_step: ``trainer.global_step`` at which the fault starts (for `lightning_fragrance.rl.PPO`
            one step is one PPO update).
        lr_factor: Learning-rate multiplier of "lr_spike".
        duration: Steps during which "reward_flip" negates the reward.
        enabled: False turns the callback into a no-op (handy from the command line).

    Attributes:
        events: One dict per injection: ``{"step", "kind", "detail"}``.
    """

    def __init__(
        self,
        kind: str = "lr_spike",
        at_step: int = 100,
        lr_factor: float = 100.0,
        duration: int = 3,
        enabled: bool = True,
    ) -> None:
        try:
            self.kind = FaultKind(kind)
        except ValueError:
            raise ValueError(
                f"kind={kind!r} is not a fault; use one of {[k.value for k in FaultKind]}"
            ) from None
        if at_step < 0:
            raise ValueError(f"at_step={at_step} must be >= 0")
        if duration < 1:
            raise ValueError(f"duration={duration} must be >= 1")
        if not lr_factor > 0:
            raise ValueError(f"lr_factor={lr_factor} must be > 0")
        self.at_step = at_step
        self.lr_factor = lr_factor
        self.duration = duration
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []
        self._fired = False
        self._flipping = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            self.enabled
            and self.kind is FaultKind.REWARD_FLIP
            and not hasattr(pl_module, "reward_scale")
        ):
            raise TypeError(
                f"FaultInjection(kind='reward_flip') needs a LightningModule with a "
                f"`reward_scale` attribute; {type(pl_module).__name__} has none "
                "(lightning_fragrance.rl.PPO has one). Use kind='lr_spike' or 'nan_grad' instead."
            )

    def _record(self, step: int, detail: str) -> None:
        self.events.append({"step": step, "kind": self.kind.value, "detail": detail})
        log.warning("FaultInjection at step %d: %s", step, detail)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        if self.kind is FaultKind.LR_SPIKE and step == self.at_step and not self._fired:
            self._fired = True
            before = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * self.lr_factor
            self._record(
                step,
                f"learning rate x{self.lr_factor:g} ({before[0]:.3g} -> "
                f"{before[0] * self.lr_factor:.3g})",
            )
        elif self.kind is FaultKind.REWARD_FLIP:
            active = self.at_step <= step < self.at_step + self.duration
            if active and not self._flipping:
                self._flipping = True
                _set_reward_scale(pl_module, -1.0)
                self._record(step, f"reward negated for {self.duration} steps")
            elif not active and self._flipping:
                self._flipping = False
                _set_reward_scale(pl_module, 1.0)
                log.warning("FaultInjection at step %d: reward restored", step)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs inside manual_backward too, so the module's own grad-norm measurement (and any
        # clipping) sees the NaN, as it would after a real overflow.
        if not self.enabled or self.kind is not FaultKind.NAN_GRAD:
            return
        if trainer.global_step != self.at_step:
            return
        for param in pl_module.parameters():
            if param.grad is not None:
                param.grad.fill_(float("nan"))
        if not self._fired:
            self._fired = True
            self._record(trainer.global_step, "every gradient set to NaN")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._flipping:
            self._flipping = False
            _set_reward_scale(pl_module, 1.0)
