"""The Hydra configs of RollbackCheckpoint compose, instantiate and cover every parameter."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_fragrance.callbacks import RollbackCheckpoint

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "callbacks"


def composed(name: str, overrides: list[str] | None = None) -> dict[str, object]:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name=name, overrides=overrides or [])  # type: ignore[return-value]


def test_rollback_yaml_lists_every_constructor_parameter_with_the_guide_defaults() -> None:
    config = composed("rollback")["rollback"]
    parameters = inspect.signature(RollbackCheckpoint.__init__).parameters
    expected = {name for name in parameters if name not in ("self", "fs")}
    assert set(config) - {"_target_"} == expected  # type: ignore[arg-type]
    for name in expected - {"dirpath", "observers"}:
        assert config[name] == parameters[name].default, name  # type: ignore[index]


def test_overrides_reach_the_callback(tmp_path: Path) -> None:
    config = composed("rollback", [f"rollback.dirpath={tmp_path}", "rollback.kl_threshold=0.05"])
    callback = instantiate(config["rollback"])  # type: ignore[index]
    assert isinstance(callback, RollbackCheckpoint)
    assert callback.conditions.kl_threshold == 0.05
    assert callback.dirpath == str(tmp_path)


def test_relaxed_yaml_uses_the_troubleshooting_values() -> None:
    callback = instantiate(composed("rollback_relaxed")["rollback"])  # type: ignore[index]
    conditions = callback.conditions
    assert (conditions.kl_threshold, conditions.loss_increase_multiplier) == (0.05, 3.0)
    assert conditions.reward_drop_threshold == 0.4
    assert conditions.max_rollbacks == 3  # everything else from rollback.yaml


def test_invalid_value_from_config_is_a_clear_error() -> None:
    config = composed("rollback", ["rollback.patience=0"])
    with pytest.raises(Exception, match="patience=0 must be >= 1"):
        instantiate(config["rollback"])  # type: ignore[index]
