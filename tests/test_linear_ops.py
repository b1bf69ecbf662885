"""The Linear per-sample-norm ops on the CPU backends (C++ kernels for every
instruction set this CPU runs, and the pure-PyTorch reference) against
float64 per-sample gradients from torch.func."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradnoise import ops
from gradnoise.ops.cost_model import choose_linear_norm_method
from tests.ground_truth import linear_sq_norms_truth, linear_weight_grad_truth
from tests.helpers import COMPILED, GRAD_RTOL, NORM_RTOL, VARIANTS

def _inputs(shape_x, p, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape_x, generator=g, dtype=torch.float64) * scale).to(dtype)
    grad_out = (torch.randn(*shape_x[:-1], p, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x, grad_out


def _methods(T):
    return ["auto", "goodfellow", "ghost", "fused"] if T == 1 else ["auto", "ghost", "fused"]


def _check_norms(norms, truth, dtype, error_scale=None):
    """Norms against float64 truth with the dtype's relative tolerance; with
    `error_scale` [B], also allowing 8·ε·error_scale per sample (see
    _ghost_error_scale)."""
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert norms.shape == truth.shape
    if error_scale is None:
        torch.testing.assert_close(norms.double(), truth, rtol=NORM_RTOL[dtype], atol=1e-12)
        return
    bound = NORM_RTOL[dtype] * truth + 8 * torch.finfo(dtype).eps * error_scale
    excess = (norms.double() - truth).abs() - bound
    assert (excess <= 0).all(), f"norms beyond their error bound by {excess.max().item():.3g}"


def _ghost_error_scale(x, grad_out, with_bias):
    """A_i = Σ_ts |x_t·x_s||dy_t·dy_s| (+ Σ_ts |dy_t·dy_s| with the bias): ghost
    norms sum these Gram-matrix products, each rounded to float32, so their
    error is relative to A_i, not to the result, and a sample whose gradient
    nearly cancels over its positions has a larger relative error."""
    x3 = x.double().reshape(x.shape[0], -1, x.shape[-1])
    g3 = grad_out.double().reshape(x.shape[0], -1, grad_out.shape[-1])
    gram_g = (g3 @ g3.transpose(1, 2)).abs()
    scale = ((x3 @ x3.transpose(1, 2)).abs() * gram_g).sum((1, 2))
    return scale + gram_g.sum((1, 2)) if with_bias else scale


def _check_grad(grad_weight, x, grad_out, dtype):
    assert grad_weight.dtype == dtype
    truth = linear_weight_grad_truth(x, grad_out)
    scale = truth.abs().max().item() if truth.numel() else 1.0
    torch.testing.assert_close(grad_weight.double(), truth, rtol=0,
                               atol=GRAD_RTOL[dtype] * max(scale, 1e-30))


SHAPES = [
    # (x shape, p): 2-D, 3-D and 4-D; B = 1, primes; T from 1 to several hundred
    ((1, 1), 1),
    ((7, 13), 5),
    ((5, 3, 17), 11),
    ((2, 130, 33), 23),
    ((3, 2, 5, 19), 7),
    ((1, 601, 9), 40),
    ((11, 64, 70), 50),
]


@pytest.mark.parametrize("shape_x,p", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_norms_and_grad_match_torch_func(variant, shape_x, p, with_bias):
    x, grad_out = _inputs(shape_x, p)
    truth = linear_sq_norms_truth(x, grad_out, with_bias)
    T = x[0, ..., 0].numel()
    for method in _methods(T):
        norms = ops.linear_sq_norms(x, grad_out, with_bias, method, backend=variant)
        _check_norms(norms, truth, x.dtype)
        gw, gb, norms2 = ops.linear_weight_grad_and_sq_norms(x, grad_out, with_bias, method,
                                                             backend=variant)
        _check_norms(norms2, truth, x.dtype)
        _check_grad(gw, x, grad_out, x.dtype)
        if with_bias:
            torch.testing.assert_close(gb.double(), grad_out.double().reshape(-1, p).sum(0),
                                       rtol=1e-5, atol=1e-5)
        else:
            assert gb is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
# p = 24: the fused CPU kernel reads float32/float64 dY in place (whole
# register-block rows), half-precision dY is packed (converted).
@pytest.mark.parametrize("shape_x,p", [((5, 3, 17), 11), ((3, 300, 40), 21), ((9, 24), 37),
                                       ((4, 37, 20), 24)])
def test_dtypes(variant, dtype, shape_x, p):
    x, grad_out = _inputs(shape_x, p, dtype)
    truth = linear_sq_norms_truth(x, grad_out, True)
    T = x[0, ..., 0].numel()
    for method in _methods(T):
        _check_norms(ops.linear_sq_norms(x, grad_out, True, method, backend=variant), truth, dtype)
        gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, True, method,
                                                            backend=variant)
        _check_norms(norms, truth, dtype)
        _check_grad(gw, x, grad_out, dtype)
        assert gb.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_large_norms_do_not_overflow(variant, dtype):
    # Entries of 30 give per-sample norms around 1e7, far above float16's
    # largest value (65504): only float32 accumulation keeps them finite.
    x, grad_out = _inputs((4, 8, 32), 24, dtype, scale=30.0)
    truth = linear_sq_norms_truth(x, grad_out, True)
    assert truth.min() > 1e5
    for method in ("ghost", "fused"):
        norms = ops.linear_sq_norms(x, grad_out, True, method, backend=variant)
        assert torch.isfinite(norms).all()
        _check_norms(norms, truth, dtype)


def test_blocks_smaller_than_the_problem(variant, monkeypatch):
    # Force tiny cache blocks so that every edge of the tiling (partial
    # register blocks, several tiles, several reduction chunks) is crossed.
    monkeypatch.setenv("GRADNOISE_FUSED_BLOCKS", "12,32,7")
    x, grad_out = _inputs((5, 23, 71), 43)
    truth = linear_sq_norms_truth(x, grad_out, True)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, True, "fused",
                                                        backend=variant)
    _check_norms(norms, truth, torch.float32)
    _check_grad(gw, x, grad_out, torch.float32)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(variant, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, grad_out = _inputs((6, 19, 37), 29)
        truth = linear_sq_norms_truth(x, grad_out, False)
        gw, _, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, False, "fused",
                                                           backend=variant)
        _check_norms(norms, truth, torch.float32)
        _check_grad(gw, x, grad_out, torch.float32)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("p", [24, 29])
def test_samples_split_among_threads(variant, threads, p):
    # Small weight gradient, several samples per thread: the CPU kernel gives
    # each thread its own samples and copy of C (13 = uneven shares); p = 24
    # reads dY in place, p = 29 packs it.
    x, grad_out = _inputs((13, 7, 37), p)
    truth = linear_sq_norms_truth(x, grad_out, True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, True, "fused",
                                                            backend=variant)
        only = ops.linear_sq_norms(x, grad_out, True, "fused", backend=variant)
    finally:
        torch.set_num_threads(old)
    _check_norms(norms, truth, torch.float32)
    _check_norms(only, truth, torch.float32)
    _check_grad(gw, x, grad_out, torch.float32)
    torch.testing.assert_close(gb.double(), grad_out.double().reshape(-1, p).sum(0),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_transposed_inputs(variant):
    g = torch.Generator().manual_seed(3)
    # [T, B, d] storage viewed as [B, T, d]: rows of a sample are not adjacent
    x = torch.randn(9, 4, 13, generator=g).transpose(0, 1)
    grad_out = torch.randn(9, 4, 6, generator=g).transpose(0, 1)
    # feature dim with stride 2
    x2 = torch.randn(5, 26, generator=g)[:, ::2]
    g2 = torch.randn(6, 5, generator=g).T
    for xx, gg in ((x, grad_out), (x2, g2)):
        assert not xx.is_contiguous() and not gg.is_contiguous()
        truth = linear_sq_norms_truth(xx, gg, True)
        for method in _methods(xx[0, ..., 0].numel()):
            gw, _, norms = ops.linear_weight_grad_and_sq_norms(xx, gg, True, method,
                                                               backend=variant)
            _check_norms(norms, truth, torch.float32)
            _check_grad(gw, xx, gg, torch.float32)


def test_inputs_are_left_unchanged(variant):
    x, grad_out = _inputs((3, 5, 7), 4)
    x_copy, g_copy = x.clone(), grad_out.clone()
    vx, vg = x._version, grad_out._version
    ops.linear_sq_norms(x, grad_out, True, backend=variant)
    ops.linear_weight_grad_and_sq_norms(x, grad_out, True, "fused", backend=variant)
    assert torch.equal(x, x_copy) and torch.equal(grad_out, g_copy)
    assert (x._version, grad_out._version) == (vx, vg)


@pytest.mark.parametrize("shape_x,p", [((0, 5), 3), ((0, 4, 5), 3), ((2, 0, 5), 3), ((2, 3, 0), 4)])
def test_empty_problems(variant, shape_x, p):
    x, grad_out = _inputs(shape_x, p)
    gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, True, backend=variant)
    assert norms.shape == (shape_x[0],) and gw.shape == (p, shape_x[-1]) and gb.shape == (p,)
    torch.testing.assert_close(norms.double(), linear_sq_norms_truth(x, grad_out, True))
    torch.testing.assert_close(gw.double(), linear_weight_grad_truth(x, grad_out))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), mid=st.lists(st.integers(1, 9), max_size=2),
       d=st.integers(1, 40), p=st.integers(1, 40), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hypothesis_shapes(B, mid, d, p, with_bias, seed):
    x, grad_out = _inputs((B, *mid, d), p, seed=seed)
    truth = linear_sq_norms_truth(x, grad_out, with_bias)
    T = x[0, ..., 0].numel()
    for backend, _ in VARIANTS:
        for method in _methods(T):
            gw, _, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, with_bias, method,
                                                               backend=backend)
            scale = _ghost_error_scale(x, grad_out, with_bias) if method == "ghost" else None
            _check_norms(norms, truth, torch.float32, scale)
            _check_grad(gw, x, grad_out, torch.float32)


@pytest.mark.parametrize("backend", [b for b, _ in VARIANTS[:2]])
def test_bad_input_names_the_culprit(backend):
    x, grad_out = _inputs((3, 4, 5), 6)
    cases = [
        ((x, grad_out[:2]), "must agree"),
        ((x, grad_out[:, :3]), "must agree"),
        ((x.double(), grad_out), "`x` is torch.float64 but `grad_out` is torch.float32"),
        ((x.int(), grad_out), "`x` has dtype torch.int32"),
        ((x[0, 0, 0], grad_out), "`x` must have at least 2 dimensions"),
        ((x, grad_out.to("meta")), "`grad_out` is on meta"),
    ]
    for args, message in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
            ops.linear_sq_norms(*args, backend=backend)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
            ops.linear_weight_grad_and_sq_norms(*args, backend=backend)
    with pytest.raises(ValueError, match="goodfellow.*T = 4"):
        ops.linear_sq_norms(x, grad_out, method="goodfellow", backend=backend)
    with pytest.raises(ValueError, match="unknown `method`"):
        ops.linear_sq_norms(x, grad_out, method="fast", backend=backend)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.linear_sq_norms(x, grad_out, backend="gpu")


@pytest.mark.skipif(not COMPILED, reason="compiled CPU kernels not built")
def test_compiled_op_checks_its_own_arguments():
    x, grad_out = _inputs((3, 4, 5), 6)
    with pytest.raises(RuntimeError, match="must agree on every dimension"):
        torch.ops.gradnoise.linear_sq_norms(x, grad_out[:, :2])
    with pytest.raises(RuntimeError, match="`x` is Double but `grad_out` is Float"):
        torch.ops.gradnoise.linear_weight_grad_and_sq_norms(x.double(), grad_out)
    with pytest.raises(RuntimeError, match="goodfellow"):
        torch.ops.gradnoise.linear_sq_norms(x, grad_out, False, "goodfellow")


@pytest.mark.skipif(not COMPILED, reason="compiled CPU kernels not built")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("method", ["auto", "ghost", "fused"])
def test_opcheck(with_bias, method):
    x, grad_out = _inputs((3, 5, 7), 4)
    for op in (torch.ops.gradnoise.linear_sq_norms,
               torch.ops.gradnoise.linear_weight_grad_and_sq_norms):
        torch.library.opcheck(op, (x, grad_out, with_bias, method))


@pytest.mark.skipif(not COMPILED, reason="compiled CPU kernels not built")
def test_traces_under_torch_compile():
    x, grad_out = _inputs((3, 5, 7), 4)

    def step(a, b):
        gw, gb, n = ops.linear_weight_grad_and_sq_norms(a, b, True)
        return gw * 2, gb, n.sqrt()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, grad_out), step(x, grad_out)):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not COMPILED, reason="compiled CPU kernels not built")
def test_cost_model_twins_agree():
    for B in (1, 16):
        for T in (1, 2, 4, 8, 16, 32, 64, 512):
            for d, p in ((16, 16), (768, 768), (64, 4096), (4096, 8)):
                for wg in (False, True):
                    code = torch.ops.gradnoise.linear_norm_method(B, T, d, p, wg)
                    assert ["goodfellow", "ghost", "fused"][code] == \
                        choose_linear_norm_method(B, T, d, p, wg), (B, T, d, p, wg)


def test_auto_picks_cheapest_method():
    assert choose_linear_norm_method(256, 1, 1024, 1024, True) == "goodfellow"
    assert choose_linear_norm_method(16, 4, 768, 768, True) == "ghost"
    assert choose_linear_norm_method(16, 128, 768, 768, True) == "fused"
    assert choose_linear_norm_method(16, 512, 768, 768, False) == "fused"
    assert choose_linear_norm_method(16, 16, 768, 768, False) == "ghost"


def test_samples_in_several_cache_groups(variant):
    # Large enough that the fused kernel packs the samples in several groups
    # (8 MB of packed rows each), and the weight gradient is added across them.
    x, grad_out = _inputs((5, 600, 512), 520)
    truth = linear_sq_norms_truth(x, grad_out, False)
    gw, _, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, False, "fused",
                                                       backend=variant)
    _check_norms(norms, truth, torch.float32)
    _check_grad(gw, x, grad_out, torch.float32)


def test_tensor_cores_make_epilogues_dearer():
    """On tensor cores an elementwise FP32 operation costs about 16 bf16 matrix
    flops: the fused kernel's per-sample epilogue weighs more against the
    ghost norm's Gram products than on CUDA cores or CPUs."""
    from gradnoise.ops.cost_model import tensor_core_weight
    assert tensor_core_weight(torch.bfloat16, "ieee", on_gpu=False) == 1.0
    assert tensor_core_weight(torch.bfloat16, "ieee", on_gpu=True) == 16.0
    assert tensor_core_weight(torch.float16, "ieee", on_gpu=True) == 16.0
    assert tensor_core_weight(torch.float32, "ieee", on_gpu=True) == 1.0
    assert tensor_core_weight(torch.float32, "tf32", on_gpu=True) == 7.0
    assert tensor_core_weight(torch.float64, "ieee", on_gpu=True) == 1.0
    # with the weight gradient, d = p = 4096: epilogue 4Bdp·w against ghost's 2BT²(d + p)
    assert choose_linear_norm_method(8, 128, 4096, 4096, True) == "fused"
    assert choose_linear_norm_method(8, 128, 4096, 4096, True, 16.0) == "ghost"
    assert choose_linear_norm_method(8, 512, 4096, 4096, True, 16.0) == "fused"
    # norms alone, d = p = 768, at T = 384 (where ghost and fused cost about the same):
    # the epilogue's extra 2Bdp·15 on tensor cores tips it to ghost
    assert choose_linear_norm_method(8, 384, 768, 768, False) == "fused"
    assert choose_linear_norm_method(8, 384, 768, 768, False, 16.0) == "ghost"
