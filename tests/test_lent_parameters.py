"""A parameter that a module without a rule holds together with a module
inside it (BERT's and RoBERTa's LM heads and their decoder's bias): measured
once, by the module that uses it, against a float64 loop over the samples;
a use by the outer module's own forward is refused by name."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradnoise import GradNoiseTracker


class Head(nn.Module):
    def __init__(self, direct_use: bool = False, odd_op: bool = False):
        super().__init__()
        self.dense = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 5)
        self.bias = nn.Parameter(torch.randn(5) * 0.1)
        self.decoder.bias = self.bias
        self.scale = nn.Parameter(torch.ones(6))
        self.direct_use, self.odd_op = direct_use, odd_op

    def forward(self, h):
        h = torch.tanh(self.dense(h)) * (self.scale.cumsum(0) if self.odd_op else self.scale)
        out = self.decoder(h)
        return out + self.bias if self.direct_use else out


def _truth(model, x):
    m = copy.deepcopy(model).double()
    rows = []
    for i in range(x.shape[0]):
        m.zero_grad()
        m(x[i:i + 1].double()).square().sum().backward()
        rows.append({n: p.grad.square().sum() for n, p in m.named_parameters()})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def test_a_lent_bias_is_measured_once_by_the_inner_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Head())
    x = torch.randn(3, 7, 4)
    truth = _truth(model, x)
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).square().sum().backward()
        assert tracker.fallback_modules == []
        got = {k: v.double() for k, v in tracker.per_layer_sq_norms().items()}
    torch.testing.assert_close(got["1.decoder"], truth["1.decoder.weight"] + truth["1.bias"],
                               rtol=2e-5, atol=0)
    torch.testing.assert_close(got["1"], truth["1.scale"], rtol=2e-5, atol=0)
    total = sum(truth.values())
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), total, rtol=2e-5, atol=0)


@pytest.mark.parametrize("head, message", [
    # a use in the outer forward: the inner module would see part of the gradient
    (dict(direct_use=True),
     r"module '1' \(Head\) uses its parameter 'bias'.*'1.decoder'.*`layers=`"),
    # a fallback of the outer module: its re-run would not cover the lent bias
    (dict(odd_op=True), r"module '1' \(Head\) cannot be measured.*shares \['bias'\] with "
                        r"\['1.decoder'\]"),
])
def test_a_lent_parameter_that_cannot_be_measured_exactly_is_refused_by_name(head, message):
    model = nn.Sequential(nn.Linear(4, 6), Head(**head))
    with GradNoiseTracker(model):
        with pytest.raises(RuntimeError, match=message):
            model(torch.randn(3, 4)).sum().backward()
