"""A tracked parameter used outside the forward of the modules that measure
it (gradnoise/layers/outside_uses.py): refused by name at the first measured
forward, never measured from part of its gradient; tied weights, lent
parameters and ordinary models pass the check."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnoise import GradNoiseTracker


class ParentUsesEmbedding(nn.Module):
    """The head is `F.linear(h, self.embed.weight)` in the parent's own forward."""

    def __init__(self, alias: bool = False):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.alias = alias

    def forward(self, idx):
        h = torch.tanh(self.mix(self.embed(idx)))
        if self.alias:
            return h @ self.embed.weight.t()
        return F.linear(h, self.embed.weight)


class TiedHead(nn.Module):
    """The same tie through modules: both uses are measured."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))))


@pytest.mark.parametrize("alias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_use_outside_the_owner_is_refused_by_name(alias, autocast):
    model = ParentUsesEmbedding(alias)
    idx = torch.randint(0, 11, (4, 5))
    with GradNoiseTracker(model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(RuntimeError, match=r"'embed.weight' by an op whose backward is "
                                                   r"\w+Backward\d.*register_rule.*`layers=`"):
                model(idx)


def test_tied_weights_used_through_modules_pass_the_check():
    torch.manual_seed(0)
    model = TiedHead()
    idx = torch.randint(0, 11, (4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx)
        out.float().square().sum().backward()
        assert tracker.per_sample_sq_norms().shape == (4,)
        assert not tracker._outside_check_pending


def test_the_check_runs_on_the_first_measured_forward_only():
    model = ParentUsesEmbedding()
    idx = torch.randint(0, 11, (4, 5))
    tracker = GradNoiseTracker(model, layers="norm")   # embed.weight is not tracked
    model(idx).sum().backward()
    assert not tracker._outside_check_pending
    tracker.detach()
    with torch.no_grad():
        model(idx)                                      # nothing measured: nothing checked
    tracker = GradNoiseTracker(model)
    with torch.no_grad():
        model(idx)
    assert tracker._outside_check_pending
