"""The policies act on confidence bounds of B_simple, not on its point
estimate: a young, wide estimate grows nothing."""
import pytest
import torch

from gradnoise.adaptive import AdaptiveBatch, BatchLimits, CriticalBatchPolicy, GoodputPolicy
from gradnoise.estimators import NoiseScale
from tests.helpers import index_dataset


def limits(**kw):
    return BatchLimits(min_batch=8, max_batch=512, unit=8, initial_batch=8, **kw)


def test_a_wide_estimate_grows_nothing_and_a_narrow_one_grows_to_its_lower_bound():
    policy = CriticalBatchPolicy()
    # the built-in task's early reading: B_simple = 73 ± 126 (95%), stderr 64
    wide = NoiseScale(1.0, 73.0, 73.0, 64.3, 12)
    assert policy.decide(24, wide, 0, limits()) == 24
    assert policy.decide(24, wide, 0, limits(confidence=0.0)) == 72     # the point estimate
    narrow = NoiseScale(1.0, 73.0, 73.0, 5.0, 40)
    lower = 73.0 - 1.645 * 5.0                                          # 64.8 → 64
    assert policy.decide(24, narrow, 0, limits()) == 64
    assert BatchLimits.bounds(limits(), narrow) == pytest.approx((lower, 73.0 + 1.645 * 5.0))
    # no standard error (a user's noise source): the point estimate
    assert policy.decide(24, NoiseScale(1.0, 73.0, 73.0, None, 40), 0, limits()) == 72


def test_shrinking_waits_for_the_upper_bound():
    policy = CriticalBatchPolicy()
    lim = limits(grow_only=False)
    # 40 ± 1.645·20: upper bound 72.9 > 64, no shrink; tighter: shrinks to the upper bound
    assert policy.decide(64, NoiseScale(1.0, 40.0, 40.0, 20.0, 30), 0, lim) == 64
    assert policy.decide(64, NoiseScale(1.0, 20.0, 20.0, 2.0, 30), 0, lim) == 24


def test_goodput_grows_on_the_lower_bound():
    pol = GoodputPolicy()
    for _ in range(3):
        pol.observe(16, 1.16)
        pol.observe(64, 1.64)            # α = 1, β = 0.01: B* = sqrt(100·φ)
    lim = BatchLimits(min_batch=8, max_batch=1024, unit=8, initial_batch=16)
    exact = NoiseScale(1.0, 400.0, 400.0, 0.0, 12)
    assert pol.decide(16, exact, 0, lim) == 200
    uncertain = NoiseScale(1.0, 400.0, 400.0, 400.0 / 1.645 * 0.75, 12)   # lower bound 100
    assert pol.decide(16, uncertain, 0, lim) == 96 or pol.decide(16, uncertain, 0, lim) == 104
    useless = NoiseScale(1.0, 400.0, 400.0, 1000.0, 12)                    # lower bound < 0
    assert pol.decide(16, useless, 0, lim) == 16
    # free to shrink: a wide reading whose lower bound asks for less and upper bound for
    # more keeps the batch (never grows on the upper bound)
    lim.grow_only = False
    wide = NoiseScale(1.0, 100.0, 100.0, 60.0 / 1.645, 12)                  # [40, 160]
    assert pol.decide(64, wide, 0, lim) == 64
    # both bounds below: shrinks as far as the upper bound allows
    low = NoiseScale(1.0, 4.0, 4.0, 1.0, 12)                                # [2.4, 5.6]
    assert pol.decide(64, low, 0, lim) == pol.best(64, 4.0 + 1.645, lim)


def test_the_controller_checks_and_passes_the_confidence():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = index_dataset(64, 3)
    for bad in (-1.0, float("nan"), "high", True):
        with pytest.raises(ValueError, match="confidence"):
            AdaptiveBatch(model, opt, data, initial_batch=8, max_batch=32, confidence=bad)
    c = AdaptiveBatch(model, opt, data, initial_batch=8, max_batch=32, confidence=0.5,
                      noise_source="micro_batch")
    assert c.limits.confidence == 0.5
    c.close()
