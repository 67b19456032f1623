"""PrometheusLogger: key mapping, hyperparameters, throttled pushes, scrape mode, ranks."""

from __future__ import annotations

import inspect
import math
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from lightning_fragrance.examples.toy import ToyPolicyModule, toy_dataloader
from lightning_fragrance.loggers import PrometheusLogger


class CountingGateway(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that accepts pushes like a Pushgateway and counts them.

    Stands in for the Pushgateway where only the number and shape of pushes matter; the real
    gateway is exercised by tests/integration/monitoring.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _accept(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                gateway.requests.append((self.command, self.path, self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            do_PUT = do_POST = do_DELETE = _accept

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def gateway() -> Iterator[CountingGateway]:
    server = CountingGateway()
    yield server
    server.shutdown()
    server.server_close()


def group(path: str) -> dict[str, str]:
    """Grouping key of a Pushgateway URL path ``/metrics/job/J/k1/v1/...``."""
    parts = path.split("/")[2:]
    return dict(zip(parts[::2], parts[1::2], strict=True))


def sample(logger: PrometheusLogger, name: str, **labels: str) -> float | None:
    return logger.registry.get_sample_value(name, labels)


def _fit(logger: PrometheusLogger, steps: int, every: int = 1) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        logger=logger,
        log_every_n_steps=every,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(ToyPolicyModule(), toy_dataloader(n=512))


def test_logged_keys_map_to_rl_metrics_and_unknown_keys_become_sanitised_gauges() -> None:
    logger = PrometheusLogger()
    logger.log_metrics(
        {
            "train/policy_loss": 0.1,
            "train/value_loss": 0.2,
            "train/loss_step": 0.3,
            "train/reward": 21.0,
            "train/entropy": 1.2,
            "train/clip_fraction": 0.15,
            "train/approx_kl": 0.01,
            "val/success@5": 0.75,
            "epoch": 0,
        },
        step=9,
    )
    assert sample(logger, "rl_loss", type="policy") == 0.1
    assert sample(logger, "rl_loss", type="value") == 0.2
    assert sample(logger, "rl_loss", type="total") == 0.3  # Lightning's _step suffix stripped
    assert sample(logger, "rl_reward") == 21.0
    assert sample(logger, "rl_entropy") == 1.2
    assert sample(logger, "rl_clip_fraction") == 0.15
    assert sample(logger, "rl_kl_divergence") == 0.01
    assert sample(logger, "rl_metric_val_success_5") == 0.75
    assert sample(logger, "rl_global_step") == 9
    assert sample(logger, "rl_metric_epoch") is None  # Lightning's injected epoch is dropped
    logger.finalize("success")


def test_unknown_keys_are_dropped_when_configured_and_custom_mappings_apply() -> None:
    logger = PrometheusLogger(unknown_keys="drop", metric_map={"ppo/kl": "rl_kl_divergence"})
    logger.log_metrics({"ppo/kl": 0.02, "val/loss": 1.0}, step=0)
    assert sample(logger, "rl_kl_divergence") == 0.02
    assert "rl_metric_val_loss" not in logger.registry._names_to_collectors
    logger.finalize("success")


def test_a_nan_loss_is_exported_not_hidden() -> None:
    logger = PrometheusLogger()
    logger.log_metrics({"train/loss": float("nan")}, step=0)
    value = sample(logger, "rl_loss", type="total")
    assert value is not None and math.isnan(value)
    logger.finalize("success")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric_map": {"train/x": "rl_rewards"}}, "allowed: rl_loss"),
        ({"metric_map": {"train/x": "rl_loss{type=critic}"}}, "allowed: rl_loss"),
        ({"unknown_keys": "keep"}, "'gauge' or 'drop'"),
        ({"push_timeout": 0}, "push_timeout > 0"),
        ({"unknown_prefix": "rl_reward"}, "collides"),
        ({"unknown_prefix": "9bad"}, "valid metric name"),
    ],
)
def test_bad_options_raise_value_error_naming_the_allowed_values(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PrometheusLogger(**kwargs)


def test_hyperparameters_become_run_info_labels_sanitised_and_capped() -> None:
    logger = PrometheusLogger(max_hparams=3)
    logger.log_hyperparams({"optim": {"lr": 3e-4, "betas": (0.9, 0.99)}, "batch-size": 64, "z": 1})
    labels = {"batch_size": "64", "optim_betas": "(0.9, 0.99)", "optim_lr": "0.0003"}
    assert sample(logger, "rl_run_info", **labels) == 1
    logger.finalize("success")


def test_rl_update_total_counts_optimizer_steps_not_log_calls() -> None:
    logger = PrometheusLogger()
    _fit(logger, steps=16, every=4)
    assert sample(logger, "rl_update_total", algorithm="ppo") == 16
    assert sample(logger, "rl_global_step") == 15


def test_pushes_are_throttled_and_finalize_pushes_once_more(gateway: CountingGateway) -> None:
    logger = PrometheusLogger(pushgateway_url=gateway.address, run_id="r1", push_interval=3600)
    _fit(logger, steps=12)

    puts = [r for r in gateway.requests if r[0] == "PUT"]
    assert len(puts) == 2  # first log call + final push, not one per step
    assert logger.pushes_done == 2
    assert group(puts[-1][1]) == {"job": "lightning_fragrance", "run_id": "r1", "rank": "0"}
    assert b"rl_update_total" in puts[-1][2] and b"llm_brief_total" not in puts[-1][2]


def test_delete_on_finish_removes_the_group_after_the_final_push(gateway: CountingGateway) -> None:
    logger = PrometheusLogger(pushgateway_url=gateway.address, run_id="r2", delete_on_finish=True)
    logger.log_metrics({"train/reward": 1.0}, step=0)
    logger.finalize("success")
    assert [r[0] for r in gateway.requests][-2:] == ["PUT", "DELETE"]
    assert group(gateway.requests[-1][1])["run_id"] == "r2"


def test_without_a_gateway_metrics_are_served_on_loopback_until_finalize() -> None:
    logger = PrometheusLogger(http_port=0)
    logger.log_metrics({"train/reward": 5.0}, step=3)
    url = logger.metrics_url
    assert url is not None and url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    assert "rl_reward 5.0" in body
    logger.finalize("success")
    assert logger.metrics_url is None


def test_checkpoint_observer_events_land_in_the_pushed_registry() -> None:
    logger = PrometheusLogger()
    observer = logger.checkpoint_observer
    observer.on_checkpoint_saved(4, 100, 0.001, 0.01)
    observer.on_rollback(10, 8, "kl_spike")
    assert sample(logger, "checkpoint_saves_total", result="success") == 1
    assert sample(logger, "checkpoint_rollbacks_total", reason="kl_spike") == 1


def test_non_zero_ranks_export_nothing_unless_all_ranks(
    monkeypatch: pytest.MonkeyPatch, gateway: CountingGateway
) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    quiet = PrometheusLogger(pushgateway_url=gateway.address)
    quiet.log_metrics({"train/reward": 1.0}, step=0)
    quiet.finalize("success")
    assert math.isnan(sample(quiet, "rl_reward") or 0.0)  # never set: NaN means "no value"
    assert gateway.requests == []

    loud = PrometheusLogger(pushgateway_url=gateway.address, run_id="r3", all_ranks=True)
    loud.log_metrics({"train/reward": 1.0}, step=0)
    loud.finalize("success")
    assert sample(loud, "rl_reward") == 1.0
    assert group(gateway.requests[-1][1]) == {
        "job": "lightning_fragrance",
        "run_id": "r3",
        "rank": "1",
    }


def test_name_and_version_are_job_and_run_id() -> None:
    logger = PrometheusLogger(job="ppo_fragrance", run_id="run-7")
    assert (logger.name, logger.version) == ("ppo_fragrance", "run-7")
    assert logger.experiment is logger.collector


def test_hydra_config_instantiates_the_logger_with_every_argument(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", "127.0.0.1:9")
    path = Path(__file__).parents[3] / "configs" / "logger" / "prometheus.yaml"
    config = OmegaConf.load(path)
    parameters = set(inspect.signature(PrometheusLogger).parameters)
    assert set(config) - {"_target_"} == parameters  # every argument present and documented
    config.metric_map = {"ppo/kl": "rl_kl_divergence"}
    logger = instantiate(config)
    assert isinstance(logger, PrometheusLogger)
    assert logger.pushgateway_url == "127.0.0.1:9"
    logger.log_metrics({"ppo/kl": 0.5}, step=0)
    assert sample(logger, "rl_kl_divergence") == 0.5
    logger.finalize("success")  # nothing listens on port 9: the push fails, counted
    assert logger.push_errors >= 1


class OverClippingModule(ToyPolicyModule):
    """Logs a clip fraction a hair above 1 at every step, as float rounding in PPO can."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("train/clip_fraction", 1.0000001, on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


def test_an_out_of_range_clip_fraction_is_dropped_and_counted_while_fit_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = PrometheusLogger()
    trainer = pl.Trainer(
        max_steps=6,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    with caplog.at_level("WARNING", logger="lightning_fragrance.loggers.prometheus"):
        trainer.fit(OverClippingModule(), toy_dataloader(n=512))

    assert trainer.global_step == 6  # the fit ran to the end
    dropped = {"key": "train/clip_fraction", "reason": "out_of_range"}
    assert sample(logger, "rl_logger_dropped_values_total", **dropped) == 6
    assert math.isnan(sample(logger, "rl_clip_fraction") or 0.0)  # never set to a bad value
    assert sample(logger, "rl_reward") is not None and sample(logger, "rl_global_step") == 5
    warnings = [r for r in caplog.records if "train/clip_fraction" in r.getMessage()]
    assert len(warnings) == 1  # throttled: one per key per minute, the counter has the rest
    assert "rl_clip_fraction takes values in [0, 1]" in warnings[0].getMessage()


def test_a_value_that_is_not_a_number_is_dropped_and_counted() -> None:
    logger = PrometheusLogger()
    logger.log_metrics({"train/reward": "high", "val/score": [1, 2], "train/entropy": 1.5}, step=0)
    for key in ("train/reward", "val/score"):
        assert sample(logger, "rl_logger_dropped_values_total", key=key, reason="not_a_number")
    assert sample(logger, "rl_entropy") == 1.5
    logger.finalize("success")


def test_dropped_keys_beyond_the_cap_share_one_label_so_series_stay_bounded() -> None:
    logger = PrometheusLogger(max_unknown_metrics=2)
    for index in range(5):
        logger.log_metrics({f"train/clip_fraction_{index}": 1.0, f"k{index}": "x"}, step=index)
    labels = {
        s.labels["key"]
        for metric in logger.registry.collect()
        if metric.name == "rl_logger_dropped_values"
        for s in metric.samples
    }
    assert labels == {"k0", "k1", "_other_keys"}
    logger.finalize("success")


def test_logger_observer_publishes_the_guards_thresholds_under_the_loggers_run_id(
    gateway: CountingGateway, tmp_path: Path
) -> None:
    from lightning_fragrance.callbacks import RollbackCheckpoint

    logger = PrometheusLogger(pushgateway_url=gateway.address, run_id="logger-run")
    guard = RollbackCheckpoint(
        dirpath=tmp_path,
        save_every_n_steps=4,
        kl_threshold=0.3,
        observers=[logger.checkpoint_observer],
    )
    trainer = pl.Trainer(
        max_steps=8,
        logger=logger,
        callbacks=[guard],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(ToyPolicyModule(), toy_dataloader(n=256))

    assert sample(logger, "rl_guard_threshold", threshold="kl_threshold") == 0.3
    assert sample(logger, "rl_guard_threshold", threshold="loss_increase_multiplier") == 2.0
    _, path, body = [r for r in gateway.requests if r[0] == "PUT"][-1]
    assert group(path)["run_id"] == "logger-run"
    assert b'rl_guard_threshold{threshold="kl_threshold"} 0.3' in body
