"""Reading the guard's watched values from Lightning, with the step each one was produced at.

`trainer.callback_metrics` keeps the last value of every key: a reward logged once per rollout
or ``on_epoch=True`` sits there for minutes, and judging it at every step (or again after a
rollback) judges a state it never saw. So each value is taken where Lightning produced it:

- the dict returned by ``training_step``: produced at this step;
- ``self.log(..., on_step=True)``: produced at the step of the ``log`` call. Lightning's
  result objects count their ``update`` calls (torchmetrics' ``_update_count``, reset with the
  epoch); a new call is a new value, whatever the number (a reward that levels off is still
  fresh). Looked at before and after each batch, so a value logged in the module's
  ``on_train_batch_end`` (after this callback's hook) is dated to its own step;
- ``self.log(..., on_epoch=True)`` only: an epoch aggregate, read at the end of the epoch and
  reflecting every state since the epoch began; validation metrics at the end of validation,
  reflecting exactly the state evaluated;
- anything else found in ``callback_metrics``: a new tensor object is a new value.

Private Lightning API: ``trainer._results`` (the active loop's `_ResultCollection`) and the
validation loop's results, read as `dump_checkpoint` is elsewhere; pyproject pins
``lightning<2.7`` and tests/unit/callbacks/test_evidence.py breaks when the layout changes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fragrance.checkpointing import Reading

ON_STEP = "on_step"
ON_EPOCH = "on_epoch"
RETURNED = "returned"
VALIDATION = "validation"
OTHER = "callback_metrics"


@dataclasses.dataclass
class _Seen:
    epoch: int
    count: int


class LoggedEvidence:
    """Tracks the production of the watched keys (one instance per callback).

    Args:
        keys: Watched signal -> the key the module logs or returns.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)
        self._seen: dict[str, _Seen] = {}
        self._pending: dict[str, Reading] = {}
        self._objects: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self.produced: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ result objects
    @staticmethod
    def _results(results: Any, key: str) -> Iterator[tuple[str, Any]]:
        if results is None:
            return
        # items(), not valid_items(): a result reset at the epoch's end is hidden from the
        # latter until its next update, and must still count as registered (not missing).
        for name, metric in results.items():
            meta = getattr(metric, "meta", None)
            if meta is not None and meta.name == key:
                yield name, metric

    def _new_updates(self, trainer: pl.Trainer, name: str, metric: Any) -> bool:
        """Whether ``metric`` was updated since the last look (an epoch resets the count)."""
        count = int(getattr(metric, "_update_count", 0))
        seen = self._seen.get(name)
        epoch = trainer.current_epoch
        self._seen[name] = _Seen(epoch, count)
        if seen is None or seen.epoch != epoch:
            return count > 0
        return count > seen.count

    def before_batch(self, trainer: pl.Trainer) -> None:
        """Date the values logged since the last batch's end (the module's on_train_batch_end
        runs after the callbacks') to the step they belong to."""
        step = trainer.global_step
        for signal, key in self.keys.items():
            for name, metric in self._results(trainer._results, key):
                if metric.meta.on_step and self._new_updates(trainer, name, metric):
                    value = _number(metric._forward_cache)
                    if value is not None:
                        self._pending[signal] = Reading(value, step)
                        self.sources[signal] = ON_STEP

    def step_readings(self, trainer: pl.Trainer, outputs: Any) -> dict[str, Reading]:
        """Values produced during this batch (or left pending by `before_batch`)."""
        step = trainer.global_step
        readings: dict[str, Reading | None] = dict(self._pending)
        self._pending = {}
        logged: Mapping[str, Any] | None = None
        for signal, key in self.keys.items():
            if isinstance(outputs, Mapping) and key in outputs:
                value = outputs[key]
                if key == "loss":  # Lightning divides the returned loss by the accumulation
                    value = value * trainer.accumulate_grad_batches
                readings[signal] = self._reading(signal, value, step, RETURNED)
                continue
            registered = False
            for name, metric in self._results(trainer._results, key):
                registered = True
                if metric.meta.on_step and self._new_updates(trainer, name, metric):
                    readings[signal] = self._reading(signal, metric._forward_cache, step, ON_STEP)
            if registered or self._validation_key(trainer, key):
                continue  # a validation metric is read once, at the validation's end
            logged = trainer.callback_metrics if logged is None else logged
            value = logged.get(key)
            if value is not None and self._objects.get(key) != id(value):
                self._objects[key] = id(value)  # the dict holds the object: ids stay unique
                readings[signal] = self._reading(signal, value, step, OTHER)
        return {s: r for s, r in readings.items() if r is not None}

    def epoch_readings(self, trainer: pl.Trainer, epoch_start_step: int) -> dict[str, Reading]:
        """Epoch aggregates of keys logged ``on_epoch`` only (call at the train epoch's end,
        after the module's hook: Lightning then serves epoch values in callback_metrics)."""
        readings: dict[str, Reading] = {}
        metrics = trainer.callback_metrics
        for signal, key in self.keys.items():
            for name, metric in self._results(trainer._results, key):
                if metric.meta.on_step or not self._new_updates(trainer, name, metric):
                    continue
                reading = self._reading(
                    signal, metrics.get(key), trainer.global_step, ON_EPOCH, epoch_start_step
                )
                if reading is not None:
                    readings[signal] = reading
        return readings

    def validation_readings(self, trainer: pl.Trainer) -> dict[str, Reading]:
        """Watched keys logged in the validation loop: they judge the state just evaluated."""
        readings: dict[str, Reading] = {}
        results = trainer._results  # in on_validation_end: the running validation loop's
        step = trainer.global_step
        for signal, key in self.keys.items():
            for _, metric in self._results(results, key):
                # Called once per validation run: anything it logged is a new value (two runs
                # in one epoch can log the same number of times, so counts cannot tell).
                if int(getattr(metric, "_update_count", 0)) == 0:
                    continue
                value = trainer.callback_metrics.get(key)
                reading = self._reading(signal, value, step, VALIDATION, step)
                if reading is not None:
                    readings[signal] = reading
        return readings

    def _validation_key(self, trainer: pl.Trainer, key: str) -> bool:
        # The validation loop that runs inside fit (not trainer.validate_loop).
        val_loop = getattr(trainer.fit_loop.epoch_loop, "val_loop", None)
        return any(True for _ in self._results(getattr(val_loop, "_results", None), key))

    def registered(self, trainer: pl.Trainer, key: str) -> str | None:
        """How ``key`` is logged in the training loop (``on_step``/``on_epoch``), if it is."""
        for _, metric in self._results(trainer._results, key):
            return ON_STEP if metric.meta.on_step else ON_EPOCH
        return None

    def _reading(
        self, signal: str, value: Any, step: int, source: str, since: int | None = None
    ) -> Reading | None:
        number = _number(value)
        if number is None:
            return None
        self.sources[signal] = source
        history = self.produced.setdefault(signal, [])
        history.append(step)
        del history[:-8]
        return Reading(number, step, since)

    def cadence(self, signal: str) -> str:
        """How often ``signal`` arrived, in words (for the log)."""
        steps = self.produced.get(signal, [])
        gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
        source = {
            ON_STEP: "logged on_step",
            ON_EPOCH: "logged on_epoch (an epoch aggregate)",
            RETURNED: "returned by training_step",
            VALIDATION: "logged in validation",
            OTHER: "found in trainer.callback_metrics",
        }.get(self.sources.get(signal, ""), "not seen yet")
        if not gaps:
            return source
        every = sorted(gaps)[len(gaps) // 2]
        return f"{source}, every {every} step(s)" if every > 1 else f"{source}, every step"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        return float(value.item())  # one host sync per value (none on CPU)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
