"""The convolution per-sample-norm ops (C++ kernel for every instruction set
this CPU runs, the pure-PyTorch reference, and the Triton composite under
the interpreter) against float64 per-sample gradients from torch.func."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradnoise import ops
from tests.ground_truth import conv_per_sample_grads
from tests.helpers import GRAD_RTOL, NORM_RTOL


def _problem(B, C, C_out, spatial, kernel_size, stride=1, padding=0, dilation=1, groups=1,
             dtype=torch.float32, seed=0):
    nd = len(spatial)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[nd]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64).to(dtype)
    k = [kernel_size] * nd if isinstance(kernel_size, int) else list(kernel_size)
    w = torch.zeros(C_out, C // groups, *k, dtype=torch.float64)
    out_shape = conv(x.double(), w, stride=stride, padding=padding, dilation=dilation,
                     groups=groups).shape
    grad_out = torch.randn(*out_shape, generator=g, dtype=torch.float64).to(dtype)
    return x, grad_out, k


def _truth(x, grad_out, k, stride, padding, dilation, groups, with_bias):
    weight_shape = (grad_out.shape[1], x.shape[1] // groups, *k)
    gw, gb = conv_per_sample_grads(x, grad_out, weight_shape, stride, padding, dilation, groups,
                                   with_bias)
    norms = gw.flatten(1).square().sum(1)
    if with_bias:
        norms = norms + gb.square().sum(1)
    return norms, gw.sum(0), (gb.sum(0) if with_bias else None)


def _check(variant, x, grad_out, k, stride, padding, dilation, groups, with_bias,
           dtype=torch.float32):
    norms_t, gw_t, gb_t = _truth(x, grad_out, k, stride, padding, dilation, groups, with_bias)
    gw, gb, norms = ops.conv_weight_grad_and_sq_norms(
        x, grad_out, k, stride, padding, dilation, groups, with_bias=with_bias, backend=variant)
    only = ops.conv_sq_norms(x, grad_out, k, stride, padding, dilation, groups,
                             with_bias=with_bias, backend=variant)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert norms.dtype == acc and only.dtype == acc
    assert gw.dtype == dtype and gw.shape == gw_t.shape
    rtol = NORM_RTOL[dtype]
    torch.testing.assert_close(norms.double(), norms_t, rtol=rtol, atol=rtol * norms_t.max())
    torch.testing.assert_close(only.double(), norms_t, rtol=rtol, atol=rtol * norms_t.max())
    scale = gw_t.abs().max()
    torch.testing.assert_close(gw.double(), gw_t, rtol=0, atol=GRAD_RTOL[dtype] * scale)
    if with_bias:
        torch.testing.assert_close(gb.double(), gb_t, rtol=0,
                                   atol=GRAD_RTOL[dtype] * gb_t.abs().max())
    else:
        assert gb is None


CASES = [
    # B, C, C_out, spatial, kernel, stride, padding, dilation, groups
    (3, 3, 5, (9, 7), 3, 1, 1, 1, 1),
    (5, 4, 6, (11, 8), (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (1, 3, 4, (17,), 5, 3, 2, 1, 1),
    (2, 2, 3, (4, 5, 6), 2, 1, 1, 2, 1),
    (4, 6, 6, (9, 9), 3, 1, 1, 1, 6),          # depthwise
    (3, 18, 20, (6, 6), 1, 1, 0, 1, 1),        # 1×1: a Linear over positions
    (2, 5, 7, (3, 3), 3, 2, 2, 1, 1),          # padding wider than the image's border
    (7, 33, 17, (13, 10), 3, 2, 1, 1, 1),      # odd sizes past one register block
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_func(variant, case, with_bias):
    B, C, C_out, spatial, kernel, stride, padding, dilation, groups = case
    x, grad_out, k = _problem(B, C, C_out, spatial, kernel, stride, padding, dilation, groups)
    _check(variant, x, grad_out, k, stride, padding, dilation, groups, with_bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(variant, dtype):
    x, grad_out, k = _problem(4, 6, 8, (7, 9), 3, 1, 1, 1, 2, dtype=dtype)
    _check(variant, x, grad_out, k, 1, 1, 1, 2, True, dtype=dtype)


@settings(max_examples=15, deadline=None)
@given(nd=st.sampled_from([1, 2, 3]), k=st.integers(1, 3), stride=st.integers(1, 3),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]),
       B=st.integers(1, 4), size=st.integers(3, 8), bias=st.booleans(), seed=st.integers(0, 999))
def test_hypothesis_geometry(nd, k, stride, padding, dilation, groups, B, size, bias, seed):
    if size + 2 * padding < dilation * (k - 1) + 1:
        size = dilation * (k - 1) + 1
    x, grad_out, kk = _problem(B, 2 * groups, 3 * groups, (size,) * nd, k, stride, padding,
                               dilation, groups, seed=seed)
    _check("cpu" if os.environ.get("GRADNOISE_BACKEND") is None else None, x, grad_out, kk,
           stride, padding, dilation, groups, bias)


def test_channels_last_and_non_contiguous_inputs(variant):
    x, grad_out, k = _problem(3, 8, 5, (10, 9), 3, 2, 1, 1, 1)
    norms_t, gw_t, _ = _truth(x, grad_out, k, 2, 1, 1, 1, False)
    strided = torch.empty(3, 8, 10, 18)[..., ::2].copy_(x)  # not contiguous in any format
    for xx, gg in [(x.contiguous(memory_format=torch.channels_last), grad_out),
                   (x, grad_out.contiguous(memory_format=torch.channels_last)),
                   (strided, grad_out)]:
        gw, _, norms = ops.conv_weight_grad_and_sq_norms(xx, gg, k, 2, 1, 1, 1, backend=variant)
        torch.testing.assert_close(norms.double(), norms_t, rtol=2e-5, atol=0)
        torch.testing.assert_close(gw.double(), gw_t, rtol=0, atol=2e-5 * gw_t.abs().max())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_and_small_blocks(variant, threads, monkeypatch):
    x, grad_out, k = _problem(9, 12, 20, (12, 12), 3, 1, 1, 1, 1)
    norms_t, gw_t, _ = _truth(x, grad_out, k, 1, 1, 1, 1, True)
    monkeypatch.setenv("GRADNOISE_FUSED_BLOCKS", "6,16,32")  # several tiles and T chunks
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gw, _, norms = ops.conv_weight_grad_and_sq_norms(x, grad_out, k, 1, 1, 1, 1,
                                                         with_bias=True, backend=variant)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(norms.double(), norms_t, rtol=2e-5, atol=0)
    torch.testing.assert_close(gw.double(), gw_t, rtol=0, atol=2e-5 * gw_t.abs().max())


@pytest.mark.parametrize("threads,dtype", [(2, torch.float32), (3, torch.float32),
                                          (2, torch.float64), (3, torch.bfloat16)])
def test_samples_split_among_threads(variant, threads, dtype):
    # Small weight gradient, several samples per thread: the CPU kernel gives
    # each thread its own samples and copy of C (13 = uneven shares).
    x, grad_out, k = _problem(13, 3, 10, (15, 13), 3, 1, 1, 1, 1, dtype=dtype, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(variant, x, grad_out, k, 1, 1, 1, 1, True, dtype=dtype)
        # grouped (each group's weight gradient is its own problem) and depthwise
        for groups in (2, 4):
            xg, gg, kg = _problem(13, 4, 8, (9, 11), 3, 2, 1, 1, groups, dtype=dtype, seed=6)
            _check(variant, xg, gg, kg, 2, 1, 1, groups, True, dtype=dtype)
    finally:
        torch.set_num_threads(before)


def test_inputs_left_unchanged_and_empty_batch(variant):
    x, grad_out, k = _problem(3, 4, 5, (6, 6), 3, 1, 1, 1, 1)
    x0, g0 = x.clone(), grad_out.clone()
    ops.conv_weight_grad_and_sq_norms(x, grad_out, k, 1, 1, 1, 1, with_bias=True, backend=variant)
    assert torch.equal(x, x0) and torch.equal(grad_out, g0)
    gw, gb, norms = ops.conv_weight_grad_and_sq_norms(x[:0], grad_out[:0], k, 1, 1, 1, 1,
                                                      with_bias=True, backend=variant)
    assert norms.shape == (0,) and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_shape=(3, 5, 5, 5)), "does not match the convolution"),
    (dict(groups=3), "must divide"),
    (dict(kernel_size=[3]), "must be an int or 2 ints"),
    (dict(stride=0), "stride, dilation >= 1"),
    (dict(padding=-1), "padding >= 0"),
    (dict(x_dtype=torch.int32), "dtype"),
    (dict(grad_dtype=torch.float64), "but `grad_out` is"),
    (dict(x_shape=(3, 4, 6)), "spatial dims"),
])
def test_bad_arguments_name_the_culprit(variant, kwargs, match):
    x = torch.randn(*kwargs.get("x_shape", (3, 4, 6, 6))).to(kwargs.get("x_dtype", torch.float32))
    g = torch.randn(*kwargs.get("grad_shape", (3, 6, 6, 6))).to(
        kwargs.get("grad_dtype", torch.float32))
    with pytest.raises((ValueError, TypeError), match=match):
        ops.conv_sq_norms(x, g, kwargs.get("kernel_size", 3), kwargs.get("stride", 1),
                          kwargs.get("padding", 1), 1, kwargs.get("groups", 1), backend=variant)


def test_compiled_op_errors_name_the_culprit():
    x, g = torch.randn(2, 4, 6, 6), torch.randn(2, 6, 5, 5)
    with pytest.raises(RuntimeError, match="does not match the convolution"):
        torch.ops.gradnoise.conv_sq_norms(x, g, [3, 3], [1, 1], [1, 1], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="must divide"):
        torch.ops.gradnoise.conv_sq_norms(x, torch.randn(2, 6, 6, 6), [3, 3], [1, 1], [1, 1],
                                          [1, 1], 4, False)


def test_opcheck_and_compile():
    x, grad_out, k = _problem(2, 4, 6, (6, 5), 3, 1, 1, 1, 2)
    args = (x, grad_out, k, [1, 1], [1, 1], [1, 1], 2, True)
    torch.library.opcheck(torch.ops.gradnoise.conv_weight_grad_and_sq_norms.default, args)
    torch.library.opcheck(torch.ops.gradnoise.conv_sq_norms.default, args)
