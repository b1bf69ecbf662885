"""GradNoiseTracker(attach=False) plans without touching the model: the
fallback and fused modules are known, the model runs as it is, and a later
attach() measures it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradnoise import GradNoiseTracker


class Cumulative(nn.Module):          # cumsum of its parameter: the fallback
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.w.cumsum(0)


def test_planning_without_attaching_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), Cumulative())
    x = torch.randn(3, 5, 4)
    plain = model(x)
    tracker = GradNoiseTracker(model, loss_reduction="sum", attach=False)
    assert not tracker.attached
    assert tracker.fused_modules == ["0", "2"] and tracker.tracked_modules == ["0", "2", "3"]
    assert "forward" not in model[0].__dict__ and not model._forward_pre_hooks
    out = model(x)
    assert torch.equal(out, plain) and out.grad_fn.name() == plain.grad_fn.name()
    out.square().sum().backward()
    with pytest.raises(RuntimeError, match="nothing measured yet"):
        tracker.per_sample_sq_norms()
    tracker.attach()
    model.zero_grad()
    model(x).square().sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)
    tracker.detach()
