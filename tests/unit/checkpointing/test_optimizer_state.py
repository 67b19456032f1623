"""copy_optimizer_state_ restores exactly, never aliases, and refuses other layouts untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_fragrance.checkpointing.optimizer_state import copy_optimizer_state_


def trained(steps: int, lr: float = 1e-2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": lr}], lr=lr
    )
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def test_in_place_copy_equals_load_state_dict_and_does_not_alias() -> None:
    _, optimizer = trained(3)
    saved = copy.deepcopy(optimizer.state_dict())
    model, live = trained(7, lr=5e-3)
    assert copy_optimizer_state_(live, saved)
    restored = live.state_dict()
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value)
            assert restored["state"][index][key].data_ptr() != value.data_ptr()
    assert [g["lr"] for g in live.param_groups] == [1e-2, 1e-2]
    before = {i: v["exp_avg"].clone() for i, v in saved["state"].items()}
    live.zero_grad()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    live.step()
    assert all(torch.equal(saved["state"][i]["exp_avg"], before[i]) for i in before)


def test_different_layout_is_refused_and_nothing_changes() -> None:
    _, fresh = trained(0)  # no state yet
    _, optimizer = trained(2)
    assert not copy_optimizer_state_(fresh, optimizer.state_dict())
    assert len(fresh.state) == 0
    _, other = trained(2)
    wrong = copy.deepcopy(optimizer.state_dict())
    wrong["state"][0]["exp_avg"] = torch.zeros(3)
    snapshot = copy.deepcopy(other.state_dict())
    assert not copy_optimizer_state_(other, wrong)
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], snapshot["state"][0]["exp_avg"])
