"""`lf-export` (also `python -m lightning_fragrance.cli.export`): checkpoint → serving export.

    lf-export ckpt_path=outputs/run/checkpoints/checkpoint_step_1000.ckpt
    lf-export ckpt_path=... export_dir=/srv/exports make_current=true

Prints the new version directory. The checkpoint is read with ``weights_only=True``.

Exits 2, writing nothing, when the export would not serve: a checkpoint whose bytes differ from
its ``checkpoint_history.json`` record (what ``lf-checkpoints verify`` calls CORRUPT), NaN/Inf
weights, weights that do not fit the model its hyperparameters describe (checked on the meta
device, before anything is allocated), or anything ``weights_only=True`` refuses.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from lightning_fragrance.cli.serve import find_config_dir
from lightning_fragrance.serving.loading import ExportError, ModelLoadError, export

log = logging.getLogger("lightning_fragrance.cli.export")


def _hydra_entry(cfg: DictConfig) -> None:
    try:
        path = export(
            str(cfg.ckpt_path),
            str(cfg.export_dir),
            model_class=str(cfg.model_class),
            make_current=bool(cfg.make_current),
        )
    except (ExportError, ModelLoadError) as exc:
        print(f"lf-export: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(path)


def main() -> None:
    """Console-script entry point (``lf-export``)."""
    import hydra

    config_dir = find_config_dir("export")
    hydra.main(version_base="1.3", config_path=str(config_dir), config_name="export")(
        _hydra_entry
    )()


if __name__ == "__main__":
    main()
