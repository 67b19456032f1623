"""Small built-in LightningModule and data for demos, tests and benchmarks."""

from lightning_fragrance.examples.toy import DivergenceSpec, ToyPolicyModule, toy_dataloader

__all__ = ["DivergenceSpec", "ToyPolicyModule", "toy_dataloader"]
