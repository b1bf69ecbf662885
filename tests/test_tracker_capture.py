"""Module classes measured from their functional calls: every use of a
parameter is covered or sends the module to the fallback, never missed."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnoise import GradNoiseTracker
from tests.helpers import loop_truth, copy_double


class _Chunky(nn.Module):          # a parameter split into pieces: the fallback
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        a, b = self.w.chunk(2)
        return x * self.w + torch.cat([x[:, :2] * a, x[:, 2:] * b], 1)


class _SetItem(nn.Module):         # a parameter written into a tensor: the fallback
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = x * self.w
        z = torch.zeros(x.shape[0], 8, dtype=x.dtype)
        z[:, 4:] = self.w
        return torch.cat([y, y], 1) * z


class _SelfTranspose(nn.Module):   # transpose(0, 0) is no transpose
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("c", torch.tensor(2.0))

    def forward(self, x):
        return F.linear(x, self.W.transpose(0, 0)) * self.c + F.linear(x, self.W)


@pytest.mark.parametrize("cls", [_Chunky, _SetItem, _SelfTranspose])
def test_uses_of_a_parameter_the_capture_does_not_cover_are_never_missed(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), cls())
    x = torch.randn(3, 4)
    truth = loop_truth(model, x, lambda o: o.square().sum())
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).square().sum().backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=0)
        assert (tracker.fallback_modules == ["1"]) == (cls is not _SelfTranspose)


def test_a_module_whose_second_call_falls_back_leaves_that_step_unmeasured():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x, odd=False):
            return x * self.w if not odd else x * self.w.cumsum(0)

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.m = Switch()

        def forward(self, x):
            h = self.lin(x)
            return self.m(h) + self.m(h, odd=True)

    torch.manual_seed(0)
    model = TwoCalls()
    x = torch.randn(3, 4)
    truth = loop_truth(model, x, lambda o: o.square().sum())
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).square().sum().backward()
        with pytest.raises(RuntimeError, match=r"module 'm' \(Switch\) was called several times"):
            tracker.per_sample_sq_norms()
        model.zero_grad()
        model(x).square().sum().backward()        # the next step: all by the fallback
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=0)


def test_dropout_on_a_shared_tensor_is_replayed_with_the_steps_mask():
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(11, 6), nn.Embedding(5, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, idx):
            p = F.dropout(self.pos(torch.arange(idx.shape[1])[None]), 0.5, training=True)
            return self.head(self.tok(idx) + p)

    torch.manual_seed(0)
    model = Pos()
    idx = torch.randint(0, 11, (4, 5))
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        torch.manual_seed(1)
        model(idx).square().sum().backward()
        got = tracker.per_layer_sq_norms()["pos"].double()
    after = torch.get_rng_state()
    # the truth, with the same mask: sample i's gradient of pos alone
    torch.manual_seed(1)
    m = copy_double(model)
    mask = F.dropout(torch.ones(1, 5, 6, dtype=torch.float64), 0.5, training=True)
    truth = []
    for i in range(4):
        m.zero_grad()
        h = m.tok(idx[i:i + 1]) + m.pos(torch.arange(5)[None]) * mask
        m.head(h).square().sum().backward()
        truth.append(m.pos.weight.grad.square().sum())
    torch.testing.assert_close(got, torch.stack(truth), rtol=1e-5, atol=0)
    torch.manual_seed(1)
    F.dropout(torch.ones(1, 5, 6), 0.5, training=True)
    assert torch.equal(after, torch.get_rng_state()), "backward moved the RNG"
