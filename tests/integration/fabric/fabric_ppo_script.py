"""A PPO loop written for Lightning Fabric, guarded by `FabricRollbackGuard`, on two gloo ranks;
started by `test_fabric_ddp_rollback.py` through `subprocess`.

Fabric's DDP launcher re-runs the command that started rank 0 (`sys.argv`) for the other rank,
so this must be a plain script, never pytest itself.

Usage: `python fabric_ppo_script.py OUT_DIR`

The task is a contextual bandit (one-step episodes): an observation x, a Gaussian action a, the
reward exp(-|a - A x|^2). Each update collects a rollout per rank, then runs clipped-surrogate
epochs with a value baseline, like PPO on any environment; it logs the loss, the rollout's mean
reward and the k3 KL of the update. The same processes run it twice with the same seeds: a
clean run, then a run with two rank-local faults (`FAULTS`): at an update, one rank alone
multiplies its learning rate by 100, so its replica leaves the other and only its KL shows it.
The first (rank 1) rolls both ranks back to the newest save, from each rank's in-memory snapshot;
the second (rank 0) is the first evidence after that restore, so the restored state is proven
bad and both ranks escalate to the save before it, which only rank 0's file holds.

Each rank writes `OUT_DIR/{run}_rank{r}.json` (rollback events, evaluation reward) and
`OUT_DIR/{run}_rank{r}_final.pt` / `{run}_rank{r}_restored{i}.pt` (its weights at the end and
right after rollback i).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_fragrance.checkpointing import RollbackConditions
from lightning_fragrance.fabric import FabricRollbackGuard

OBS_DIM, ACT_DIM = 4, 2
UPDATES = 80
SAVE_EVERY = 5
FAULTS = {40: 1, 41: 0}  # update -> the one rank whose learning rate goes x100 there
ROLLOUT = 64  # samples per rank and update
EPOCHS = 4
CLIP = 0.2
LR = 3e-3


class ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.policy = nn.Sequential(nn.Linear(OBS_DIM, 32), nn.Tanh(), nn.Linear(32, ACT_DIM))
        self.value = nn.Sequential(nn.Linear(OBS_DIM, 32), nn.Tanh(), nn.Linear(32, 1))
        self.log_std = nn.Parameter(torch.full((ACT_DIM,), -0.5))

    def forward(self, obs: torch.Tensor) -> tuple[torch.distributions.Normal, torch.Tensor]:
        mean = self.policy(obs)
        return torch.distributions.Normal(mean, self.log_std.exp()), self.value(obs).squeeze(-1)


def targets(obs: torch.Tensor) -> torch.Tensor:
    matrix = torch.tensor([[0.5, -0.3, 0.2, 0.0], [0.1, 0.4, -0.2, 0.3]])
    return obs @ matrix.T


def rewards(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((actions - targets(obs)) ** 2).sum(-1))


def ppo_update(
    fabric: Fabric, model: Any, optimizer: Any, generator: torch.Generator
) -> dict[str, float]:
    obs = torch.randn(ROLLOUT, OBS_DIM, generator=generator)
    with torch.no_grad():
        dist, values = model(obs)
        actions = dist.sample()
        old_log_probs = dist.log_prob(actions).sum(-1)
    reward = rewards(obs, actions)
    advantages = reward - values
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    loss = torch.zeros(())
    for _ in range(EPOCHS):
        dist, values = model(obs)
        ratio = (dist.log_prob(actions).sum(-1) - old_log_probs).exp()
        surrogate = torch.maximum(
            -advantages * ratio, -advantages * ratio.clamp(1 - CLIP, 1 + CLIP)
        )
        loss = surrogate.mean() + 0.5 * ((values - reward) ** 2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    with torch.no_grad():
        log_ratio = model(obs)[0].log_prob(actions).sum(-1) - old_log_probs
        kl = ((log_ratio.exp() - 1) - log_ratio).mean()
    return {
        "train/loss": float(loss.detach()),
        "train/reward": float(reward.mean()),
        "train/kl": float(kl),
    }


@torch.no_grad()
def evaluate(model: Any) -> float:
    """Mean reward of the greedy action on a fixed set of observations (same on every rank)."""
    obs = torch.randn(512, OBS_DIM, generator=torch.Generator().manual_seed(99))
    return float(rewards(obs, model(obs)[0].mean).mean())


def train(fabric: Fabric, run: str, fault: bool, out: Path) -> None:
    rank = fabric.global_rank
    torch.manual_seed(1234)  # identical initial weights on every rank
    model = ActorCritic()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    model, optimizer = fabric.setup(model, optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own rollouts
    torch.manual_seed(200 + rank)
    conditions = RollbackConditions(
        kl_threshold=0.5, loss_increase_multiplier=1e9, reward_drop_threshold=0.9
    )
    guard = FabricRollbackGuard(
        fabric,
        out / f"{run}_checkpoints",
        save_every_n_steps=SAVE_EVERY,
        max_checkpoints=UPDATES,  # keep every file: the test compares restored weights with them
        rollback_conditions=conditions,
    )
    state = {"model": model, "optimizer": optimizer}
    guard.start(state)
    fault_kls: dict[int, float] = {}  # this rank's own KL at the fault updates
    restored: list[int] = []
    for step in range(1, UPDATES + 1):
        if fault and FAULTS.get(step) == rank:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * 100
        metrics = ppo_update(fabric, model, optimizer, generator)
        if step in FAULTS:
            fault_kls[step] = metrics["train/kl"]
        outcome = guard.step(step, metrics, state)
        if outcome.restored is not None:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(weights, out / f"{run}_rank{rank}_restored{len(restored)}.pt")
            restored.append(outcome.restored.step)
    guard.close()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(final, out / f"{run}_rank{rank}_final.pt")
    report = {
        "rank": rank,
        "world_size": fabric.world_size,
        "rollback_count": guard.rollback_count,
        "rollback_events": [
            {k: v for k, v in e.items() if isinstance(v, (str, int, float, bool))}
            for e in guard.rollback_events
        ],
        "evaluation": evaluate(model),
        "fault_kls": fault_kls,
        "lr": optimizer.param_groups[0]["lr"],
    }
    (out / f"{run}_rank{rank}.json").write_text(json.dumps(report, indent=2))


def main(out_dir: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    out = Path(out_dir)
    train(fabric, "clean", fault=False, out=out)
    train(fabric, "faulted", fault=True, out=out)


if __name__ == "__main__":
    main(sys.argv[1])
