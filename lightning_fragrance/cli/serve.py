"""`lf-serve` (also `python -m lightning_fragrance.cli.serve`): run the hot-reload service.

    lf-serve
    LF_ADMIN_TOKEN=secret lf-serve port=9000 workers=2
    lf-serve drain_timeout_s=5 keep_previous_s=300
    AWS_ENDPOINT_URL=http://minio:9000 lf-serve export_dir=s3://models/exports  # object store

Settings come from `configs/serve.yaml` (Hydra; every key is a `ServeSettings` field). The
config directory is the repository's `configs/`; `LF_CONFIG_DIR` points elsewhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_fragrance.serving.settings import SETTINGS_ENV, ServeSettings

CONFIG_DIR_ENV = "LF_CONFIG_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("lightning_fragrance.cli.serve")


def find_config_dir(config_name: str) -> Path:
    """The directory holding ``<config_name>.yaml``: ``$LF_CONFIG_DIR``, else ``configs/``.

    Raises:
        FileNotFoundError: when neither holds it; the message says where it looked.
    """
    override = os.environ.get(CONFIG_DIR_ENV)
    candidates = [Path(override).expanduser()] if override else []
    candidates += [parent / "configs" for parent in Path(__file__).resolve().parents]
    for candidate in candidates:
        if (candidate / f"{config_name}.yaml").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no {config_name}.yaml in {[str(c) for c in candidates[:4]]}...; set {CONFIG_DIR_ENV} "
        f"to the directory that holds it"
    )


def settings_from_config(cfg: DictConfig | dict[str, Any]) -> tuple[ServeSettings, str]:
    """Validate the composed config into ``ServeSettings`` (and the log level)."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    assert isinstance(values, dict)
    values = {str(k): v for k, v in values.items() if k != "hydra"}
    log_level = str(values.pop("log_level", "INFO"))
    return ServeSettings.model_validate(values), log_level


def serve(settings: ServeSettings, log_level: str = "INFO") -> None:
    """Run uvicorn with the app; several workers share one port and converge through CURRENT."""
    import uvicorn

    from lightning_fragrance.serving.app import create_app

    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
        "log_level": log_level.lower(),
        "access_log": False,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    # Worker processes rebuild the app from the environment; prometheus_client's multiprocess
    # mode needs its directory set before the workers import it, so /metrics merges them all.
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="lf-serve-metrics-")
    log.info("starting %d workers (metrics in %s)", settings.workers, os.environ[MULTIPROC_ENV])
    uvicorn.run(
        "lightning_fragrance.serving.app:app_from_environment",
        factory=True,
        workers=settings.workers,
        timeout_worker_healthcheck=settings.worker_healthcheck_s,
        **common,
    )


def _hydra_entry(cfg: DictConfig) -> None:
    settings, log_level = settings_from_config(cfg)
    serve(settings, log_level)


def main() -> None:
    """Console-script entry point (``lf-serve``)."""
    import hydra

    config_dir = find_config_dir("serve")
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name="serve")(_hydra_entry)()


if __name__ == "__main__":
    main()
