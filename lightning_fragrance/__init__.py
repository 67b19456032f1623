"""lightning_fragrance: operations toolkit for RL training with PyTorch Lightning.

Three pillars (see DESIGN in the README): checkpointing with automatic rollback
(`lightning_fragrance.checkpointing`, `lightning_fragrance.callbacks`), metrics to Prometheus
(`lightning_fragrance.monitoring`, `lightning_fragrance.loggers`) and hot-reload serving
(`lightning_fragrance.serving`), plus the fragrance-formulation reference task
(`lightning_fragrance.fragrance`, `lightning_fragrance.rl`).
"""

__version__ = "0.1.0"
