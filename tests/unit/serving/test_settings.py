"""configs/serve.yaml and configs/export.yaml stay in step with the code that reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from pydantic import ValidationError

from lightning_fragrance.cli.serve import find_config_dir, settings_from_config
from lightning_fragrance.serving.hot_reload import DrainTimeoutAction
from lightning_fragrance.serving.settings import ADMIN_TOKEN_ENV, ServeSettings

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_serve_yaml_validates_into_the_safe_defaults() -> None:
    settings, log_level = settings_from_config(OmegaConf.load(CONFIGS / "serve.yaml"))
    assert settings == ServeSettings()
    assert settings.host == "127.0.0.1" and settings.admin_token is None
    assert settings.drain_timeout_action is DrainTimeoutAction.REJECT
    assert log_level == "INFO"


def test_an_unknown_or_invalid_serve_key_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="drain_timeout"):
        settings_from_config({"drain_timeout": 5})
    with pytest.raises(ValidationError, match="max_inflight"):
        settings_from_config({"max_inflight": 0})


def test_the_environment_token_wins_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "env-token")
    assert ServeSettings(admin_token="config-token").resolved_admin_token() == "env-token"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "")
    assert ServeSettings(admin_token="").resolved_admin_token() is None


def test_config_dir_is_found_from_the_package_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_config_dir("serve") == CONFIGS.resolve()
    assert (find_config_dir("export") / "export.yaml").is_file()
    monkeypatch.setenv("LF_CONFIG_DIR", str(tmp_path))
    (tmp_path / "serve.yaml").write_text("port: 1\n")
    assert find_config_dir("serve") == tmp_path.resolve()


def test_the_load_deadline_has_a_documented_default_and_must_be_positive() -> None:
    assert ServeSettings().load_timeout_s == 60.0
    with pytest.raises(ValidationError, match="load_timeout_s"):
        settings_from_config({"load_timeout_s": 0})


def test_policy_exports_are_read_in_place_or_from_a_policy_folder_and_the_llm_has_its_own(
    tmp_path: Path,
) -> None:
    settings = ServeSettings(export_dir=tmp_path)
    assert settings.policy_store_dir() == tmp_path  # exports/<version>/, exports/CURRENT
    assert settings.brief_llm_store_dir() == tmp_path / "brief_llm"
    (tmp_path / "policy").mkdir()
    assert settings.policy_store_dir() == tmp_path / "policy"  # exports/<model>/<version>/
    custom = ServeSettings(export_dir=tmp_path, llm_export_dir=tmp_path / "llm")
    assert custom.brief_llm_store_dir() == tmp_path / "llm"
