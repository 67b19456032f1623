"""`lf-train` (also `python -m lightning_fragrance.cli.train`): compose the Hydra config, build the
model, callbacks, logger and Trainer from it, fit, and write the report.

    lf-train
    lf-train callbacks.rollback.kl_threshold=0.5 trainer.max_steps=2000
    lf-train experiment=fault_lr_spike
    lf-train env=cartpole model=ppo_cartpole callbacks=none
    lf-train task=brief_llm                  # the brief LLM (SFT, then GRPO), guarded

The config directory is the repository's `configs/`, found from the package location;
`LF_CONFIG_DIR` points elsewhere (e.g. a copy you edit).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_fragrance.reporting import (
    GuardThresholds,
    MetricHistory,
    ReportInputs,
    write_training_report,
)

CONFIG_DIR_ENV = "LF_CONFIG_DIR"
FRAGRANCE_ENV_MARKER = "FragranceFormulation"

log = logging.getLogger("lightning_fragrance.cli.train")


class ConfigDirError(FileNotFoundError):
    """The Hydra config directory cannot be found; the message says where it looked."""


def find_config_dir() -> Path:
    """The directory holding `train.yaml`: `$LF_CONFIG_DIR`, else `configs/` above the package.

    Raises:
        ConfigDirError: When neither holds a `train.yaml`.
    """
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "train.yaml").is_file():
            raise ConfigDirError(f"{CONFIG_DIR_ENV}={override} has no train.yaml")
        return path
    searched = []
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "configs"
        searched.append(str(candidate))
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigDirError(
        f"no configs/train.yaml above the package (looked in {searched[:4]}...); "
        f"set {CONFIG_DIR_ENV} to the directory that holds train.yaml"
    )


@dataclass
class TrainingResult:
    """What a training run produced (the demo prints it; tests inspect it)."""

    trainer: pl.Trainer
    module: pl.LightningModule
    output_dir: Path
    history: MetricHistory
    rollback: Any | None = None  # RollbackCheckpoint, when the guard was configured
    faults: list[Any] = field(default_factory=list)
    metrics_json: Path | None = None
    report_path: Path | None = None
    elapsed_s: float = 0.0

    @property
    def checkpoint_dir(self) -> str | None:
        """Where the guard wrote its checkpoints."""
        return None if self.rollback is None else self.rollback.store.directory

    @property
    def history_json(self) -> str | None:
        """The guard's `checkpoint_history.json`."""
        return None if self.rollback is None else str(self.rollback.store.history_path)

    @property
    def rollback_events(self) -> list[dict[str, Any]]:
        """The guard's rollback events (empty without the guard)."""
        return [] if self.rollback is None else list(self.rollback.rollback_events)

    def final_reward(self, last: int = 10) -> float:
        """Mean logged reward over the last `last` updates (NaN when none was logged)."""
        _, values = self.history.series("train/reward")
        return float(values[-last:].mean()) if values.size else float("nan")


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config section that has a `_target_`."""
    from hydra.utils import instantiate

    if section is None:
        return []
    return [
        instantiate(node, _convert_="all")
        for node in section.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def build_components(
    cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()
) -> tuple[pl.LightningModule, pl.Trainer, MetricHistory, list[Any]]:
    """Model, Trainer, the metric history callback and every callback of a config.

    Args:
        cfg: The composed `train.yaml`.
        extra_callbacks: Added after the configured ones (benchmarks add their probes here).
    """
    from hydra.utils import instantiate

    torch.set_num_threads(int(cfg.get("torch_threads", 1)))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = instantiate(cfg.model, _convert_="all")
    history = MetricHistory()
    callbacks = [*_instantiate_all(cfg.get("callbacks")), history, *extra_callbacks]
    logger_cfg = cfg.get("logger")
    logger: Any = False
    if isinstance(logger_cfg, DictConfig) and "_target_" in logger_cfg:
        logger = instantiate(logger_cfg, _convert_="all")
    _connect_checkpoint_observers(logger, callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, _convert_="all")
    return module, trainer, history, callbacks


def _connect_checkpoint_observers(logger: Any, callbacks: Sequence[Any]) -> None:
    """Let a logger that reports checkpoint events (`PrometheusLogger.checkpoint_observer`)
    hear every guard's saves, rollbacks and write errors, so a Hydra user gets
    `checkpoint_*` metrics by choosing `logger=prometheus`, with no code."""
    from lightning_fragrance.callbacks import RollbackCheckpoint

    observer = getattr(logger, "checkpoint_observer", None)
    if observer is None:
        return
    for callback in callbacks:
        if isinstance(callback, RollbackCheckpoint):
            callback.observers.observers.append(observer)


def _baselines(cfg: DictConfig) -> dict[str, float]:
    episodes = int(cfg.get("report", {}).get("baseline_episodes", 0))
    if episodes <= 0 or FRAGRANCE_ENV_MARKER not in str(cfg.env.id):
        return {}
    from lightning_fragrance.fragrance.baselines import baseline_rewards

    return {name: r.mean_reward for name, r in baseline_rewards(episodes).items()}


def run_training(cfg: DictConfig) -> TrainingResult:
    """Fit the configured model and write metrics.json and the report into paths.output_dir."""
    from lightning_fragrance.callbacks import FaultInjection, RollbackCheckpoint

    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    module, trainer, history, callbacks = build_components(cfg)
    started = time.perf_counter()
    trainer.fit(module)
    result = TrainingResult(
        trainer=trainer,
        module=module,
        output_dir=output_dir,
        history=history,
        rollback=next((c for c in callbacks if isinstance(c, RollbackCheckpoint)), None),
        faults=[c for c in callbacks if isinstance(c, FaultInjection)],
        elapsed_s=time.perf_counter() - started,
    )
    if result.rollback is not None:
        result.rollback.flush()
    if trainer.is_global_zero:
        result.metrics_json = history.write_json(output_dir / "metrics.json")
        report = cfg.get("report", {})
        if report.get("enabled", True):
            result.report_path = write_report(result, cfg)
    return result


def write_report(result: TrainingResult, cfg: DictConfig) -> Path:
    """The PNG training report of a finished run."""
    thresholds = GuardThresholds.from_callback(result.rollback) if result.rollback else None
    faults = [event for fault in result.faults for event in fault.events]
    report = cfg.get("report", {})
    inputs = ReportInputs(
        history=result.history,
        thresholds=thresholds,
        rollbacks=result.rollback_events,
        faults=faults,
        reward_target=report.get("reward_target"),
        baselines=_baselines(cfg),
        title=f"{report.get('title') or 'PPO on ' + cfg.env.id.split(':')[-1]}: "
        f"{result.trainer.global_step} updates, {len(result.rollback_events)} rollback(s)",
    )
    return write_training_report(inputs, result.output_dir / "training_report.png")


def summary_lines(result: TrainingResult) -> list[str]:
    """Human-readable summary: where everything is, what happened."""
    lines = [
        f"Trained {result.trainer.global_step} updates in {result.elapsed_s:.1f} s; "
        f"mean reward over the last 10 updates: {result.final_reward():.2f}",
        f"Output directory : {result.output_dir}",
    ]
    if result.rollback is not None:
        lines += [
            f"Checkpoints      : {result.checkpoint_dir}",
            f"History JSON     : {result.history_json}",
        ]
        for event in result.rollback_events:
            lines.append(
                f"Rollback         : at step {event.get('at_step')} -> step "
                f"{event.get('to_step')} ({event.get('reason')})"
            )
    for fault in result.faults:
        for event in fault.events:
            lines.append(f"Fault injected   : step {event['step']}: {event['detail']}")
    if result.metrics_json is not None:
        lines.append(f"Metrics JSON     : {result.metrics_json}")
    if result.report_path is not None:
        lines.append(f"Report           : {result.report_path}")
    return lines


def _hydra_entry(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    result = run_training(cfg)
    if result.trainer.is_global_zero:
        print("\n".join(summary_lines(result)), flush=True)


def main() -> None:
    """Console script `lf-train`."""
    import hydra

    config_dir = find_config_dir()
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name="train")(_hydra_entry)()


if __name__ == "__main__":
    main()
