"""The CUDA and Triton kernels on a GPU, against float64 ground truth.

Without a CUDA device every test here skips, saying why. With
GRADNOISE_REQUIRE_GPU=1 (set by `python -m gradnoise gpu-check`) a test that
cannot run fails instead: a missing GPU, a CUDA extension that did not build,
Triton under its interpreter. Truth: per-sample gradients from torch.func
(Linear), autograd and the reference twins in float64 on the CPU (norm
layers, embeddings, convolutions: the twins are checked against torch.func
by the CPU suite), per-sample loops in float64 (whole models).
"""
from __future__ import annotations

import os

import pytest
import torch

from gradnoise import GradientNoiseScale, GradNoiseTracker, ops
from gradnoise.ops import fusion
from gradnoise.ops.backends import backend_status, resolve_backend
from tests.ground_truth import (linear_per_sample_grads, linear_weight_grad_truth,
                                model_per_sample_sq_norms)
from tests.helpers import RTOL, make_case

REQUIRE = os.environ.get("GRADNOISE_REQUIRE_GPU") == "1"
CUDA = torch.device("cuda")


def need(backend: str | None = None) -> None:
    """Skip (fail under GRADNOISE_REQUIRE_GPU=1) unless a GPU and `backend` can run."""
    why = None if torch.cuda.is_available() else "no CUDA device is visible"
    if why is None and backend is not None:
        why = backend_status(backend, CUDA)
        if why is None and backend == "triton":
            from gradnoise.ops.triton.common import INTERPRETED
            why = "Triton runs under its interpreter (TRITON_INTERPRET=1)" if INTERPRETED else None
    if why is not None:
        (pytest.fail if REQUIRE else pytest.skip)(f"{backend or 'GPU'}: {why}")


@pytest.fixture(autouse=True)
def no_tf32():
    """float64 truth at float32 tolerances: cuDNN's convolutions would run in
    TF32 by default (10 mantissa bits), and matmuls must stay IEEE."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


BACKENDS = ["cuda", "triton"]
# (B, T, d, p): T = 1; odd sizes that leave every tile edge partly masked;
# few samples with long rows (the split paths); more samples than tiles.
SHAPES = [(5, 1, 1000, 513), (3, 17, 33, 65), (2, 300, 129, 257), (1, 1024, 64, 48),
          (64, 9, 70, 30)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# As in tests/test_triton_linear.py: half inputs are multiplied exactly and
# accumulated in float32; gradients are rounded once to the input dtype.
NORM_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4,
             torch.float16: 1e-4}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7,
            torch.float16: 2.0 ** -10}


def _inputs(B, T, d, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (B, T) if T > 1 else (B,)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(*lead, p, generator=gen, dtype=torch.float64).to(dtype)
    return x, g


def _norms_truth(x, g):
    gw, gb = linear_per_sample_grads(x, g, True)
    return gw.square().flatten(1).sum(1) + gb.square().sum(1)


def _check_norms(norms, x, g, dtype):
    """Against the truth, allowing the ghost norm's error, which is relative to
    Σ_ts |x_t·x_s||dy_t·dy_s| (+ Σ_ts |dy_t·dy_s|) rather than to the result."""
    truth = _norms_truth(x, g)
    x3 = x.double().reshape(x.shape[0], -1, x.shape[-1])
    g3 = g.double().reshape(x.shape[0], -1, g.shape[-1])
    gram_g = (g3 @ g3.transpose(1, 2)).abs()
    scale = ((x3 @ x3.transpose(1, 2)).abs() * gram_g).sum((1, 2)) + gram_g.sum((1, 2))
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    excess = (norms.cpu().double() - truth).abs() - (NORM_RTOL[dtype] * truth + 8 * eps * scale)
    assert (excess <= 0).all(), f"norms beyond their bound by {excess.max().item():.3g}"


def _check_close(got, want, tol):
    want = want.double()
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=tol * scale)


def _linear_cases():
    """Every shape in float32 and bfloat16; float64 and float16 on the T = 1
    and split shapes (each new shape and dtype costs Triton compilations)."""
    for dtype in DTYPES:
        shapes = SHAPES if dtype in (torch.float32, torch.bfloat16) else SHAPES[::3]
        for shape in shapes:
            yield pytest.param(dtype, shape, id="{}-B{}-T{}-d{}-p{}".format(
                str(dtype).removeprefix("torch."), *shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape", list(_linear_cases()))
def test_linear_ops_match_ground_truth(backend, dtype, shape):
    need(backend)
    x, g = _inputs(*shape, dtype)
    xc, gc = x.to(CUDA), g.to(CUDA)
    methods = (["goodfellow"] if shape[1] == 1 else []) + ["ghost", "fused", "auto"]
    for method in methods:
        _check_norms(ops.linear_sq_norms(xc, gc, True, method, backend=backend), x, g, dtype)
        gw, gb, norms = ops.linear_weight_grad_and_sq_norms(xc, gc, True, method, backend=backend)
        _check_norms(norms, x, g, dtype)
        assert gw.dtype == dtype and gw.device.type == CUDA.type
        _check_close(gw, linear_weight_grad_truth(x, g), GRAD_TOL[dtype])
        _check_close(gb, g.double().reshape(-1, shape[3]).sum(0), GRAD_TOL[dtype])


@pytest.mark.parametrize("path", ["fused", "separate"])
def test_both_weight_gradient_paths_on_the_gpu(monkeypatch, path):
    need()
    monkeypatch.setenv(fusion.ENV_VAR, path)
    x, g = _inputs(4, 256, 320, 192, torch.bfloat16)
    gw, _, norms = ops.linear_weight_grad_and_sq_norms(x.to(CUDA), g.to(CUDA), True)
    _check_norms(norms, x, g, torch.bfloat16)
    _check_close(gw, linear_weight_grad_truth(x, g), GRAD_TOL[torch.bfloat16])


def test_the_probe_measures_on_the_gpu(monkeypatch):
    need()
    monkeypatch.delenv(fusion.ENV_VAR, raising=False)
    fusion.clear()
    x, g = _inputs(8, 512, 1024, 1024, torch.bfloat16)
    ops.linear_weight_grad_and_sq_norms(x.to(CUDA), g.to(CUDA))
    [decision] = fusion.decisions()
    assert decision.device.startswith("cuda:") and decision.dtype == "bfloat16"
    assert decision.fused_ms > 0 and decision.separate_ms > 0
    assert decision.path == ("fused" if decision.fused_ms < decision.separate_ms else "separate")


def test_matrix_work_takes_the_tensor_cores():
    need("triton")
    assert resolve_backend(CUDA, None, "linear_matrix") == "triton"
    if backend_status("cuda", CUDA) is None:
        assert resolve_backend(CUDA, None, "linear_rows") == "cuda"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_layer_norm_on_the_gpu(backend, rms, dtype):
    need(backend)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 37, 193, generator=gen) * 2 + 0.5).to(dtype)
    g = torch.randn(3, 37, 193, generator=gen).to(dtype)
    w = torch.randn(193, generator=gen).to(dtype)
    truth = ops.layer_norm_sq_norms_ref(x.double(), g.double(), 193, 1e-5, rms,
                                        with_bias=not rms)
    got = ops.layer_norm_sq_norms(x.to(CUDA), g.to(CUDA), 193, 1e-5, rms, with_bias=not rms,
                                  backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 x̂ is rounded before the squares
    torch.testing.assert_close(got.cpu().double(), truth, rtol=tol, atol=0)
    gx, gw, gb, norms = ops.layer_norm_backward_and_sq_norms(
        x.to(CUDA), g.to(CUDA), 193, 1e-5, rms, w.to(CUDA), with_bias=not rms, backend=backend)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    out = (torch.nn.functional.rms_norm(x64, (193,), w64, 1e-5) if rms else
           torch.nn.functional.layer_norm(x64, (193,), w64, None, 1e-5))
    out.backward(g.double())
    _check_close(gx, x64.grad, 1e-4 if dtype == torch.float32 else 2e-2)
    _check_close(gw, w64.grad, 1e-4 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(norms.cpu().double(), truth, rtol=tol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_on_the_gpu(backend):
    need(backend)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(5, 12, 9, 7, generator=gen), torch.randn(5, 12, 9, 7, generator=gen)
    truth = ops.group_norm_sq_norms_ref(x.double(), g.double(), 4, 1e-5)
    got = ops.group_norm_sq_norms(x.to(CUDA), g.to(CUDA), 4, 1e-5, backend=backend)
    torch.testing.assert_close(got.cpu().double(), truth, rtol=1e-4, atol=0)


def test_embedding_conv_and_reductions_on_the_gpu():
    need()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (6, 33), generator=gen)
    idx[0, :5] = 7  # a repeated token
    dy = torch.randn(6, 33, 24, generator=gen)
    truth = ops.embedding_sq_norms_ref(idx, dy.double(), 50, padding_idx=0)
    got = ops.embedding_sq_norms(idx.to(CUDA), dy.to(CUDA), 50, padding_idx=0)
    torch.testing.assert_close(got.cpu().double(), truth, rtol=1e-4, atol=0)
    x, g = torch.randn(3, 6, 11, 13, generator=gen), torch.randn(3, 8, 9, 11, generator=gen)
    truth = ops.conv_sq_norms_ref(x.double(), g.double(), (3, 3), groups=2, with_bias=True)
    got = ops.conv_sq_norms(x.to(CUDA), g.to(CUDA), (3, 3), groups=2, with_bias=True)
    torch.testing.assert_close(got.cpu().double(), truth, rtol=1e-4, atol=0)
    tensors = [torch.randn(s, generator=gen) for s in ((7, 5), (1000,), (3, 3, 3))]
    got = ops.sq_norms([t.to(CUDA) for t in tensors])
    torch.testing.assert_close(got.cpu(), torch.stack([t.double().square().sum()
                                                       for t in tensors]), rtol=1e-5, atol=0)


def _case_on(name, B, reduction, device):
    """tests.helpers.make_case's model, inputs and losses, on `device`."""
    from tests.helpers import lm_case
    model, x, y, _, sample_loss = make_case(name, B, reduction)
    model, x, y = model.to(device), x.to(device), y.to(device)
    if name.startswith("lm"):
        y, batch_loss, sample_loss = lm_case(model, x, reduction)
    else:
        def batch_loss(out):
            return torch.nn.functional.cross_entropy(out, y, reduction=reduction)
    return model, x, y, batch_loss, sample_loss


@pytest.mark.parametrize("name", ["mlp", "lm", "cnn", "mha", "tied"])
def test_the_tracker_on_the_gpu_matches_float64_truth(name):
    need()
    model, x, y, _, sample_loss = make_case(name, 6, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    model, x, y, batch_loss, _ = _case_on(name, 6, "sum", CUDA)
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        batch_loss(model(x)).backward()
        norms = tracker.per_sample_sq_norms()
    assert norms.device.type == CUDA.type
    torch.testing.assert_close(norms.cpu().double(), truth, rtol=RTOL, atol=1e-8)


def test_the_tracker_under_bf16_autocast():
    """bf16 autocast changes the gradient itself; each sample's norm is
    compared with the same sample's own backward under the same autocast, in
    a loop (a bf16 product rounds to 3 significant digits, hence 5e-2)."""
    need()
    model, x, y, batch_loss, sample_loss = _case_on("lm", 4, "sum", CUDA)
    expected = []
    for i in range(x.shape[0]):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sample_loss(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        expected.append(sum(p.grad.double().square().sum() for p in model.parameters()
                            if p.grad is not None))
    model.zero_grad()
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = batch_loss(model(x))
        loss.backward()
        norms = tracker.per_sample_sq_norms()
    torch.testing.assert_close(norms.cpu().double(), torch.stack(expected).cpu(), rtol=5e-2,
                               atol=0)


def noise_scale_readings(devices) -> dict:
    """One GradientNoiseScale reading of the same step on each device."""
    readings = {}
    for device in devices:
        model, x, y, batch_loss, _ = _case_on("lm", 8, "mean", device)
        gns = GradientNoiseScale(model, source="per_sample", beta=0.0)
        batch_loss(model(x)).backward()
        readings[device] = gns.step(batch_size=8)
        gns.close()
    return readings


def test_the_noise_scale_on_the_gpu_equals_the_cpu_one():
    need()
    readings = noise_scale_readings(["cpu", "cuda"])
    for field in ("sq_norm", "trace", "b_simple"):
        assert getattr(readings["cuda"], field) == pytest.approx(
            getattr(readings["cpu"], field), rel=1e-4)
