"""The Triton Linear kernels against torch.func ground truth, under the Triton interpreter.

No GPU here: the kernels run on CPU tensors with TRITON_INTERPRET=1, which must
be set before triton (and gradnoise.ops.triton) is imported. The interpreter
is slow, so shapes are tiny but odd: they cross the 16-wide tiles the
interpreter configuration uses, and leave the last tile partly masked.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip(
    "triton", minversion="3.8",
    reason="Triton >= 3.8 is needed (older versions' interpreter breaks with numpy >= 2.4)")

if "gradnoise.ops.triton.linear" in sys.modules and \
        type(sys.modules["gradnoise.ops.triton.linear"]._linear_fused_kernel).__name__ \
        != "InterpretedFunction":
    pytest.skip("gradnoise.ops.triton.linear was imported before TRITON_INTERPRET=1 was set; "
                "run this module in its own process", allow_module_level=True)

with warnings.catch_warnings():
    # A missing compiled extension only matters to the other backends.
    warnings.simplefilter("ignore", RuntimeWarning)
    import gradnoise.ops as ops  # noqa: E402
    from gradnoise.ops.cost_model import choose_linear_norm_method  # noqa: E402
    from gradnoise.ops.triton import linear as triton_linear  # noqa: E402

from tests.ground_truth import (  # noqa: E402
    linear_per_sample_grads,
    linear_sq_norms_truth,
    linear_weight_grad_truth,
)

# Tolerances, relative to the largest entry of the float64 truth (norms are
# sums of squares, so the largest norm sets their scale; gradient entries can
# cancel to ~0, so they get the same absolute floor).
# - float64: products and sums in float64 over at most T·max(d, p) ≈ 1.3e3
#   terms; the error bound n·2⁻⁵³ ≈ 1.5e-13 is far below 1e-10.
# - float32: sums of n ≈ 1.3e3 float32 terms have error ≲ n·2⁻²⁴ ≈ 8e-5 in the
#   worst case, ≈ √n·2⁻²⁴ ≈ 2e-6 typically; 1e-4 bounds the worst case.
# - bfloat16 / float16 norms: the truth is computed from the same half-valued
#   inputs upcast, and the kernels multiply them exactly in float32 and
#   accumulate in float32, so the float32 tolerance applies.
# - bfloat16 / float16 gradients: accumulated in float32 and rounded once to
#   the input dtype, so each entry is off by at most its unit roundoff, 2⁻⁸
#   (bfloat16) or 2⁻¹¹ (float16), plus the float32 accumulation error.
NORM_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4,
             torch.float16: 1e-4}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2.0 ** -8,
             torch.float16: 2.0 ** -11}
GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4,
             torch.float16: 1e-4}

# (leading dims [B, *], d, p): 2-D (T = 1), 3-D and 4-D, B ∈ {0, 1, 3},
# T ∈ {1, 5, 17, 40}, d and p ∈ {1, 3, 17, 33}.
CASES = {
    "2d-B3-d17-p33": ((3,), 17, 33),
    "2d-B1-d1-p3": ((1,), 1, 3),
    "2d-B0": ((0,), 3, 17),
    "3d-B3-T5-d33-p17": ((3, 5), 33, 17),
    "3d-B1-T40-d3-p1": ((1, 40), 3, 1),
    "3d-B3-T17-d17-p3": ((3, 17), 17, 3),
    "3d-B0-T5": ((0, 5), 3, 3),
    "4d-B3-T1-d1-p17": ((3, 1, 1), 1, 17),
    "4d-B3-T40-d3-p33": ((3, 5, 8), 3, 33),
}
# Every case in float32; the other dtypes on one 2-D, one 3-D and one 4-D case.
DTYPE_CASES = {
    torch.float32: list(CASES),
    torch.float64: ["2d-B3-d17-p33", "3d-B3-T5-d33-p17", "4d-B3-T40-d3-p33"],
    torch.bfloat16: ["2d-B3-d17-p33", "3d-B3-T17-d17-p3", "4d-B3-T1-d1-p17"],
    torch.float16: ["2d-B1-d1-p3", "3d-B3-T5-d33-p17", "4d-B3-T40-d3-p33"],
}


def _T(lead):
    t = 1
    for s in lead[1:]:
        t *= s
    return t


def _methods(lead):
    return (["goodfellow"] if _T(lead) == 1 else []) + ["ghost", "fused", "auto"]


def _params():
    for dtype, names in DTYPE_CASES.items():
        for name in names:
            for method in _methods(CASES[name][0]):
                yield pytest.param(name, dtype, method,
                                   id=f"{name}-{str(dtype).removeprefix('torch.')}-{method}")


def _inputs(name, dtype, seed=0):
    lead, d, p = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    g = torch.randn(*lead, p, generator=gen).to(dtype)
    return x, g


def _norms_truth(x, g, with_bias):
    if with_bias or x.shape[0] == 0:
        return linear_sq_norms_truth(x, g, with_bias)
    # linear_sq_norms_truth(..., with_bias=False) hands a None bias to
    # torch.func.grad, which rejects it; take the weight term from the
    # per-sample gradients computed with a bias instead.
    gw, _ = linear_per_sample_grads(x, g, True)
    return gw.square().flatten(1).sum(1)


def _assert_close(actual, expected, rtol, atol_scale):
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol_scale * scale)


@pytest.mark.parametrize("name,dtype,method", list(_params()))
def test_linear_ops_match_ground_truth(name, dtype, method):
    x, g = _inputs(name, dtype)
    B, p = x.shape[0], g.shape[-1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gw_truth = linear_weight_grad_truth(x, g)
    gb_truth = g.double().reshape(-1, p).sum(0)
    for with_bias in (False, True):
        truth = _norms_truth(x, g, with_bias)

        norms = ops.linear_sq_norms(x, g, with_bias, method, backend="triton")
        assert norms.dtype == acc and norms.shape == (B,)
        _assert_close(norms, truth, NORM_RTOL[dtype], NORM_RTOL[dtype])

        gw, gb, norms2 = ops.linear_weight_grad_and_sq_norms(x, g, with_bias, method,
                                                             backend="triton")
        assert norms2.dtype == acc and norms2.shape == (B,)
        _assert_close(norms2, truth, NORM_RTOL[dtype], NORM_RTOL[dtype])
        assert gw.dtype == dtype and gw.shape == gw_truth.shape
        _assert_close(gw, gw_truth, GRAD_RTOL[dtype], GRAD_ATOL[dtype])
        if with_bias:
            assert gb.dtype == dtype and gb.shape == (p,)
            _assert_close(gb, gb_truth, GRAD_RTOL[dtype], GRAD_ATOL[dtype])
        else:
            assert gb is None


@pytest.mark.parametrize("name", ["3d-B3-T5-d33-p17", "3d-B3-T17-d17-p3", "2d-B3-d17-p33"])
def test_auto_runs_the_method_the_cost_model_chooses(name):
    x, g = _inputs(name, torch.float32, seed=1)
    lead, d, p = CASES[name]
    B, T = lead[0], _T(lead)
    chosen = choose_linear_norm_method(B, T, d, p, with_weight_grad=False)
    assert torch.equal(ops.linear_sq_norms(x, g, True, "auto", backend="triton"),
                       ops.linear_sq_norms(x, g, True, chosen, backend="triton"))
    chosen = choose_linear_norm_method(B, T, d, p, with_weight_grad=True)
    auto = ops.linear_weight_grad_and_sq_norms(x, g, True, "auto", backend="triton")
    explicit = ops.linear_weight_grad_and_sq_norms(x, g, True, chosen, backend="triton")
    for a, b in zip(auto, explicit):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["3d-B3-T5-d33-p17", "4d-B3-T40-d3-p33"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vendor_gemm_beside_the_triton_norms(monkeypatch, name, dtype):
    """The path a GPU takes where the fused kernel is slower than cuBLAS
    (gradnoise.ops.fusion): torch's GEMM and the Triton norms-only op."""
    from gradnoise.ops import fusion
    monkeypatch.setenv(fusion.ENV_VAR, "separate")
    x, g = _inputs(name, dtype)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, g, True, backend="triton")
    _assert_close(norms, _norms_truth(x, g, True), NORM_RTOL[dtype], NORM_RTOL[dtype])
    _assert_close(gw, linear_weight_grad_truth(x, g), GRAD_RTOL[dtype], GRAD_ATOL[dtype])
    _assert_close(gb, g.double().reshape(-1, g.shape[-1]).sum(0), GRAD_RTOL[dtype],
                  GRAD_ATOL[dtype])


@pytest.mark.parametrize("method", ["goodfellow", "ghost", "fused"])
def test_strided_inputs(method):
    # Views the kernels read through their strides: a stride-2 feature
    # dimension, and a batch-minor layout that reshape has to copy.
    gen = torch.Generator().manual_seed(2)
    if method == "goodfellow":
        x = torch.randn(3, 34, generator=gen)[:, ::2]
        g = torch.randn(5, 3, generator=gen).T
    else:
        x = torch.randn(3, 5, 34, generator=gen)[..., ::2]
        g = torch.randn(5, 3, 3, generator=gen).transpose(0, 1)
    assert not x.is_contiguous() and not g.is_contiguous()
    truth = _norms_truth(x, g, True)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, g, True, method, backend="triton")
    _assert_close(norms, truth, 1e-4, 1e-4)
    _assert_close(gw, linear_weight_grad_truth(x, g), 1e-4, 1e-4)
    _assert_close(ops.linear_sq_norms(x, g, True, method, backend="triton"), truth, 1e-4, 1e-4)


def test_degenerate_feature_dims():
    # d = 0: no weight gradient, but the bias still has one; T = 0: nothing.
    g = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    x = torch.empty(2, 3, 0)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, g, True, "fused", backend="triton")
    assert gw.shape == (4, 0)
    _assert_close(gb, g.double().sum((0, 1)), 1e-5, 1e-5)
    _assert_close(norms, g.double().sum(1).square().sum(1), 1e-5, 1e-5)
    x, g = torch.randn(2, 0, 3), torch.randn(2, 0, 4)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, g, True, "ghost", backend="triton")
    assert torch.equal(gw, torch.zeros(4, 3)) and torch.equal(gb, torch.zeros(4))
    assert torch.equal(norms, torch.zeros(2))


def test_custom_op_returns_empty_bias_without_bias():
    x, g = _inputs("3d-B3-T5-d33-p17", torch.float32)
    gw, gb, norms = triton_linear.linear_weight_grad_and_sq_norms(x, g, False, "fused")
    assert gb.shape == (0,) and gb.dtype == torch.float32
    assert gw.shape == (17, 33) and norms.shape == (3,)


@pytest.mark.parametrize("with_bias,method,dtype", [
    (True, "fused", torch.float32),
    (False, "ghost", torch.float64),
    (True, "auto", torch.bfloat16),
])
def test_opcheck(with_bias, method, dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, generator=gen).to(dtype)
    g = torch.randn(2, 3, 4, generator=gen).to(dtype)
    torch.library.opcheck(torch.ops.gradnoise_triton.linear_sq_norms.default,
                          (x, g, with_bias, method))
    torch.library.opcheck(torch.ops.gradnoise_triton.linear_weight_grad_and_sq_norms.default,
                          (x, g, with_bias, method))


def test_opcheck_goodfellow_2d():
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(3, 5, generator=gen), torch.randn(3, 2, generator=gen)
    torch.library.opcheck(torch.ops.gradnoise_triton.linear_sq_norms.default,
                          (x, g, True, "goodfellow"))
    torch.library.opcheck(torch.ops.gradnoise_triton.linear_weight_grad_and_sq_norms.default,
                          (x, g, False, "goodfellow"))


def test_invalid_input_is_rejected_by_the_op_too():
    x, g = torch.randn(2, 3, 5), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="must agree"):
        torch.ops.gradnoise_triton.linear_sq_norms(x, g, False, "fused")
    with pytest.raises(ValueError, match="goodfellow"):
        torch.ops.gradnoise_triton.linear_sq_norms(x, torch.randn(2, 3, 4), False, "goodfellow")


def test_conv_ops_run_through_the_triton_linear_kernels():
    """On the Triton backend a convolution is its unfolded patches through the
    fused Linear kernel, group by group."""
    from tests.ground_truth import conv_per_sample_grads
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 6, generator=gen)
    g = torch.randn(2, 6, 3, 3, generator=gen)  # kernel 3, stride 2, padding 1
    gw_t, gb_t = conv_per_sample_grads(x, g, (6, 2, 3, 3), 2, 1, 1, 2, True)
    norms_t = gw_t.flatten(1).square().sum(1) + gb_t.square().sum(1)
    gw, gb, norms = ops.conv_weight_grad_and_sq_norms(x, g, 3, 2, 1, 1, 2, with_bias=True,
                                                      backend="triton")
    torch.testing.assert_close(norms.double(), norms_t, rtol=NORM_RTOL[torch.float32], atol=0)
    torch.testing.assert_close(gw.double(), gw_t.sum(0), rtol=0,
                               atol=GRAD_ATOL[torch.float32] * gw_t.abs().max())
    torch.testing.assert_close(gb.double(), gb_t.sum(0), rtol=0,
                               atol=GRAD_ATOL[torch.float32] * gb_t.abs().max())
    only = ops.conv_sq_norms(x, g, 3, 2, 1, 1, 2, with_bias=True, backend="triton")
    torch.testing.assert_close(only.double(), norms_t, rtol=NORM_RTOL[torch.float32], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_grad", [False, True])
def test_split_k_inside_samples(monkeypatch, dtype, with_grad):
    """One sample whose rows fill one tile: its rows are split over programs,
    the partial gradients summed before squaring (the interpreter's nominal 2
    multiprocessors make B·tiles = 1 too few)."""
    taken = []
    split_k = triton_linear._fused_split_k
    monkeypatch.setattr(triton_linear, "_fused_split_k",
                        lambda *a: taken.append(a[6]) or split_k(*a))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 100, 9, generator=gen).to(dtype)
    g = torch.randn(1, 100, 13, generator=gen).to(dtype)
    if with_grad:
        gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, g, True, "fused", backend="triton")
        _assert_close(gw, linear_weight_grad_truth(x, g), GRAD_RTOL[dtype], GRAD_ATOL[dtype])
    else:
        norms = ops.linear_sq_norms(x, g, True, "fused", backend="triton")
    assert taken == [3], "100 rows in 3 chunks (at most T // 32)"
    _assert_close(norms, _norms_truth(x, g, True), NORM_RTOL[dtype], NORM_RTOL[dtype])


@pytest.mark.parametrize("config", range(2))
def test_every_tile_configuration_is_exact(monkeypatch, config):
    """Each configuration the autotuner may pick, forced in turn, on a shape
    where the larger tiles leave part of the zeroed norm workspace unused."""
    from gradnoise.ops.triton import tuning
    kernel = triton_linear._linear_fused_kernel
    chosen = tuning.INTERPRETER[config]
    monkeypatch.setattr(kernel, "configs", [chosen])
    monkeypatch.setattr(kernel, "cache", {})
    x, g = _inputs("3d-B3-T5-d33-p17", torch.float32)
    gw, _, norms = ops.linear_weight_grad_and_sq_norms(x, g, False, "fused", backend="triton")
    assert kernel.best_config is chosen
    _assert_close(norms, _norms_truth(x, g, False), NORM_RTOL[torch.float32], 1e-4)
    _assert_close(gw, linear_weight_grad_truth(x, g), GRAD_RTOL[torch.float32], 1e-4)


def test_the_autotuner_chooses_between_configurations():
    """Both interpreter tiles fit d = 33, p = 40: the tuner times both, keeps
    one, and zeroes the workspace the losing runs wrote before the real run."""
    kernel = triton_linear._linear_fused_kernel
    kernel.cache.clear()
    x = torch.randn(2, 19, 33, generator=torch.Generator().manual_seed(5))
    g = torch.randn(2, 19, 40, generator=torch.Generator().manual_seed(6))
    norms = ops.linear_sq_norms(x, g, False, "fused", backend="triton")
    assert len(kernel.configs_timings) == 2
    _assert_close(norms, _norms_truth(x, g, False), NORM_RTOL[torch.float32], 1e-4)


@pytest.mark.parametrize("dtype,T,d,p,expect", [
    (torch.bfloat16, 2048, 4096, 14336, "all"),
    (torch.bfloat16, 20, 4096, 4096, "rows<=32"),
    (torch.bfloat16, 512, 4096, 40, "p<=64"),
    (torch.float32, 512, 1024, 1024, "float"),
    (torch.float64, 512, 1024, 1024, "double"),
])
def test_gpu_configurations_fit_the_problem(monkeypatch, dtype, T, d, p, expect):
    """The GPU sets, pruned as on a GPU (the pruning is plain Python)."""
    from gradnoise.ops.triton import tuning
    monkeypatch.setattr(tuning, "INTERPRETED", False)
    configs = tuning.HALF + tuning.FLOAT + tuning.DOUBLE
    named = {"x_ptr": torch.empty(0, dtype=dtype), "T": T, "d": d, "p": p, "B": 8}
    kept = tuning.prune_fused_configs(configs, named, COMPUTE_NORMS=True)
    if expect == "all":
        assert kept == tuning.HALF
    elif expect == "rows<=32":
        assert kept and all(c.kwargs["BLOCK_T"] <= 32 for c in kept)
    elif expect == "p<=64":
        assert kept and all(c.kwargs["BLOCK_P"] <= 64 for c in kept)
    else:
        assert kept == (tuning.FLOAT if expect == "float" else tuning.DOUBLE)


def test_grouped_program_order_covers_every_tile():
    """p = 150 is 10 tiles of 16 (or 5 of 32): more than one group of 8
    p-tiles, the last group short; every weight-gradient tile and norm term
    must be computed exactly once."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 40, generator=gen)
    g = torch.randn(2, 3, 150, generator=gen)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, g, True, "fused", backend="triton")
    _assert_close(gw, linear_weight_grad_truth(x, g), GRAD_RTOL[torch.float32], 1e-4)
    _assert_close(norms, _norms_truth(x, g, True), NORM_RTOL[torch.float32], 1e-4)
