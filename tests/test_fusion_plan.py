"""The choice between the fused weight-gradient-and-norms kernel and torch's
GEMM with the norms beside it (gradnoise.ops.fusion): both paths against
float64 ground truth, the probe's decisions and their cache, the cases that
never probe, and the tracker through either path."""
from __future__ import annotations

import pytest
import torch

from gradnoise import GradNoiseTracker, ops
from gradnoise.ops import fusion
from gradnoise.ops import conv as conv_ops
from gradnoise.ops import linear as linear_ops
from tests.ground_truth import conv_per_sample_grads, linear_sq_norms_truth, \
    linear_weight_grad_truth, model_per_sample_sq_norms
from tests.helpers import COMPILED, RTOL, make_case

needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled CPU kernels not built")


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.delenv(fusion.ENV_VAR, raising=False)
    fusion.clear()
    yield
    fusion.clear()


def _inputs(B, T, d, p, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(B, T, p, generator=g, dtype=torch.float64).to(dtype)
    return x, dy


def _spy_paths(monkeypatch):
    """Count the calls of each path (the probe's and the real one), for the
    Linear and the convolution ops."""
    calls = {"fused": 0, "separate": 0}

    def counting(path, fn):
        def counted(*a, **k):
            calls[path] += 1
            return fn(*a, **k)
        return counted

    for module, fused, separate in (
            (linear_ops, "backend_weight_grad_and_sq_norms", "_vendor_gemm_and_sq_norms"),
            (conv_ops, "_backend_conv_grads_and_sq_norms", "_vendor_conv_grad_and_sq_norms")):
        monkeypatch.setattr(module, fused, counting("fused", getattr(module, fused)))
        monkeypatch.setattr(module, separate, counting("separate", getattr(module, separate)))
    return calls


@needs_compiled
@pytest.mark.parametrize("path", ["fused", "separate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 19, 5), (2, 33, 4, 17), (5, 2, 40, 40)])
def test_both_paths_match_ground_truth(monkeypatch, path, dtype, with_bias, shape):
    monkeypatch.setenv(fusion.ENV_VAR, path)
    x, dy = _inputs(*shape, dtype=dtype)
    calls = _spy_paths(monkeypatch)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, dy, with_bias=with_bias)
    assert calls == {"fused": int(path == "fused"), "separate": int(path == "separate")}
    rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4}[dtype]
    torch.testing.assert_close(norms.double(), linear_sq_norms_truth(x, dy, with_bias),
                               rtol=rtol, atol=1e-12)
    truth = linear_weight_grad_truth(x, dy)
    grad_tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7}[dtype]
    assert gw.dtype == dtype
    torch.testing.assert_close(gw.double(), truth, rtol=0,
                               atol=grad_tol * truth.abs().max().item())
    if with_bias:
        torch.testing.assert_close(gb.double(), dy.double().sum((0, 1)), rtol=grad_tol,
                                   atol=grad_tol * dy.double().abs().sum((0, 1)).max().item())
    else:
        assert gb is None


@needs_compiled
@pytest.mark.parametrize("winner", ["fused", "separate"])
def test_the_probe_takes_the_faster_path_and_remembers_it(monkeypatch, winner):
    times = (1.0, 2.0) if winner == "fused" else (2.0, 1.0)
    probes = []
    monkeypatch.setattr(fusion, "_time_pair", lambda f, s, dev: probes.append(1) or times)
    calls = _spy_paths(monkeypatch)
    x, dy = _inputs(4, 6, 8, 5)
    for _ in range(3):
        ops.linear_weight_grad_and_sq_norms(x, dy, with_bias=True)
    assert len(probes) == 1, "one probe per shape, then the cached choice"
    assert calls[winner] == 3 and sum(calls.values()) == 3
    [decision] = fusion.decisions()
    assert (decision.shape, decision.with_bias, decision.path) == ((4, 6, 8, 5), True, winner)
    assert decision.backend == "cpu" and decision.dtype == "float32"
    # B and T in the same power-of-two bucket share the choice (B 3 and 4; T 5 and 6)
    ops.linear_weight_grad_and_sq_norms(x[:3, :5], dy[:3, :5], with_bias=True)
    assert len(probes) == 1
    # another dtype, bias, bucket or thread count is another key
    ops.linear_weight_grad_and_sq_norms(x.double(), dy.double())
    ops.linear_weight_grad_and_sq_norms(x[:2], dy[:2], with_bias=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        ops.linear_weight_grad_and_sq_norms(x, dy, with_bias=True)
    finally:
        torch.set_num_threads(threads)
    assert len(fusion.decisions()) == 4


@needs_compiled
def test_ties_keep_the_vendor_gemm(monkeypatch):
    monkeypatch.setattr(fusion, "_time_pair", lambda f, s, dev: (1.0, 1.0))
    x, dy = _inputs(2, 5, 6, 7)
    ops.linear_weight_grad_and_sq_norms(x, dy)
    assert fusion.decisions()[0].path == "separate"


@needs_compiled
def test_the_real_probe_measures_both_paths_on_this_machine():
    x, dy = _inputs(8, 32, 64, 48)
    gw, _, norms = ops.linear_weight_grad_and_sq_norms(x, dy)
    [decision] = fusion.decisions()
    assert decision.fused_ms > 0 and decision.separate_ms > 0
    assert decision.path == ("fused" if decision.fused_ms < decision.separate_ms else "separate")
    assert decision.ratio == pytest.approx(decision.fused_ms / decision.separate_ms)
    torch.testing.assert_close(norms.double(), linear_sq_norms_truth(x, dy), rtol=1e-4, atol=0)


@needs_compiled
def test_one_position_and_the_reference_never_probe(monkeypatch):
    monkeypatch.setattr(fusion, "_time_pair", lambda *a: pytest.fail("probed"))
    calls = _spy_paths(monkeypatch)
    x, dy = _inputs(4, 1, 8, 5)
    ops.linear_weight_grad_and_sq_norms(x, dy)  # T = 1: Goodfellow beside the GEMM
    assert calls == {"fused": 0, "separate": 1}
    x, dy = _inputs(4, 3, 8, 5)
    ops.linear_weight_grad_and_sq_norms(x, dy, backend="reference")
    ops.linear_weight_grad_and_sq_norms(x, dy, method="fused")  # an explicit method is obeyed
    assert calls == {"fused": 1, "separate": 1} and fusion.decisions() == []


@needs_compiled
def test_no_probe_inside_a_trace(monkeypatch):
    """Timing means nothing while torch.compile traces: the vendor GEMM, uncached."""
    monkeypatch.setattr(fusion, "_time_pair", lambda *a: pytest.fail("probed"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, dy = _inputs(3, 4, 5, 6)
    calls = _spy_paths(monkeypatch)
    ops.linear_weight_grad_and_sq_norms(x, dy)
    assert calls == {"fused": 0, "separate": 1} and fusion.decisions() == []


def test_an_unknown_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(fusion.ENV_VAR, "fastest")
    x, dy = _inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match=f"{fusion.ENV_VAR}='fastest'"):
        ops.linear_weight_grad_and_sq_norms(x, dy, backend="cpu" if COMPILED else "reference")


@needs_compiled
@pytest.mark.parametrize("path", ["fused", "separate"])
@pytest.mark.parametrize("case", [
    # x shape, C_out, kernel, stride, padding, dilation, groups, dtype, channels last
    ((3, 4, 9, 8), 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, False),
    ((2, 6, 11, 7), 4, (3, 2), (2, 1), (0, 1), (1, 2), 2, torch.float32, True),
    ((4, 3, 17), 5, (4,), (3,), (2,), (1,), 1, torch.float32, False),
    ((2, 2, 5, 6, 4), 3, (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2), 1, torch.float32, False),
    ((3, 4, 9, 8), 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, torch.bfloat16, False),
    ((3, 4, 9, 8), 6, (3, 3), (2, 2), (1, 1), (1, 1), 2, torch.float64, False),
])
def test_both_convolution_paths_match_ground_truth(monkeypatch, path, case):
    """torch's convolution weight gradient with the norms-only op beside it,
    or the compiled op's single pass: the same results, in 1-D to 3-D,
    depthwise and grouped, bf16 to float64, channels-last."""
    shape, c_out, k, stride, padding, dilation, groups, dtype, channels_last = case
    monkeypatch.setenv(fusion.ENV_VAR, path)
    calls = _spy_paths(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[len(k)]
    weight = torch.randn(c_out, shape[1] // groups, *k, generator=gen, dtype=torch.float64)
    dy = torch.randn_like(conv(x, weight, None, stride, padding, dilation, groups))
    x, dy = x.to(dtype), dy.to(dtype)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    gw, gb, norms = ops.conv_weight_grad_and_sq_norms(x, dy, k, stride, padding, dilation, groups,
                                                      with_bias=True)
    assert calls[path] == 1 and gw.dtype == gb.dtype == dtype
    w_truth, b_truth = conv_per_sample_grads(x, dy, weight.shape, stride, padding, dilation,
                                             groups, True)
    truth = w_truth.flatten(1).square().sum(1) + b_truth.square().sum(1)
    # norms accumulate in float32 from exact products of the half inputs; the
    # gradients are rounded once to the input dtype
    rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4}[dtype]
    grad_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7}[dtype]
    torch.testing.assert_close(norms.double(), truth, rtol=rtol, atol=0)
    for got, want in ((gw, w_truth.sum(0)), (gb, b_truth.sum(0))):
        torch.testing.assert_close(got.double(), want, rtol=0,
                                   atol=grad_tol * want.abs().max().item())


@needs_compiled
def test_convolutions_probe_under_their_own_key(monkeypatch):
    """A convolution's choice is kept apart from a Linear layer's of the same
    B, T, d, p, and one geometry's from another's."""
    monkeypatch.setattr(fusion, "_time_pair", lambda f, s, dev: (2.0, 1.0))
    x = torch.randn(2, 3, 6, 6)
    dy = torch.randn(2, 4, 6, 6)
    ops.conv_weight_grad_and_sq_norms(x, dy, (3, 3), padding=1)
    ops.conv_weight_grad_and_sq_norms(x, dy, (3, 3), padding=1)
    # the same B, T, d, p: another geometry, another memory format, a Linear layer
    ops.conv_weight_grad_and_sq_norms(x, dy, (3, 3), padding=2, dilation=2)
    ops.conv_weight_grad_and_sq_norms(x.to(memory_format=torch.channels_last),
                                      dy.to(memory_format=torch.channels_last), (3, 3), padding=1)
    ops.linear_weight_grad_and_sq_norms(torch.randn(2, 36, 27), torch.randn(2, 36, 4))
    seen = fusion.decisions()
    assert len(seen) == 4 and len({d.op for d in seen}) == 4 and seen[3].op == "linear"
    assert all(d.shape == (2, 36, 27, 4) for d in seen)


@needs_compiled
def test_a_convolution_without_output_positions_gives_zeros(monkeypatch):
    monkeypatch.setenv(fusion.ENV_VAR, "auto")
    gw, gb, norms = ops.conv_weight_grad_and_sq_norms(
        torch.randn(2, 4, 2, 2), torch.randn(2, 6, 0, 0), (3, 3), with_bias=True)
    assert gw.shape == (6, 4, 3, 3) and not gw.any() and not gb.any() and not norms.any()


@needs_compiled
@pytest.mark.parametrize("name", ["lm", "cnn"])
@pytest.mark.parametrize("winner", ["fused", "separate"])
def test_the_tracker_is_exact_through_either_path(monkeypatch, winner, name):
    """Linear layers with positions (T > 1) and convolutions: the tracker's norms
    against torch.func in float64, and its gradients against plain autograd,
    whichever path the probe picked."""
    times = (1.0, 2.0) if winner == "fused" else (2.0, 1.0)
    monkeypatch.setattr(fusion, "_time_pair", lambda f, s, dev: times)
    calls = _spy_paths(monkeypatch)
    model, x, y, batch_loss, sample_loss = make_case(name, 4, "sum")
    plain = {n: g for n, g in _grads(model, x, batch_loss).items()}
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    tracked = _grads(model, x, batch_loss)
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL,
                               atol=1e-8)
    for name, grad in tracked.items():
        # float32 sums in another order: rounding relative to the largest entry
        torch.testing.assert_close(grad, plain[name], rtol=1e-5,
                                   atol=1e-6 * plain[name].abs().max().item())
    assert calls[winner] > 0 and all(d.path == winner for d in fusion.decisions())
    tracker.detach()


def _grads(model, x, batch_loss):
    model.zero_grad(set_to_none=True)
    batch_loss(model(x)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
