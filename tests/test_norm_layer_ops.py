"""The normalisation-layer per-sample-norm ops on every backend that runs here
(compiled CPU kernels, pure-PyTorch reference, Triton under the interpreter)
against float64 per-sample gradients of real torch.nn.LayerNorm / RMSNorm /
GroupNorm modules from torch.func, where sample i's loss is ⟨module(x_i), dY_i⟩
(so that its output gradient is exactly dY_i).

TRITON_INTERPRET=1 is set before triton is imported (as in
test_triton_linear.py); the interpreter is slow, so the Triton cases are tiny.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import gradnoise  # noqa: E402
    from gradnoise.ops import norm_layers as nl  # noqa: E402

COMPILED = gradnoise._extension.compiled_status("cpu") is None


def _triton_status() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import triton
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):
        return "Triton >= 3.8 is needed (older interpreters break with numpy >= 2.4)"
    mod = sys.modules.get("gradnoise.ops.triton.norm_layers")
    if mod is not None and not mod.INTERPRETED:
        return ("gradnoise.ops.triton.norm_layers was imported before TRITON_INTERPRET=1 was "
                "set; run this module in its own process")
    return None


TRITON_WHY_NOT = _triton_status()
BACKENDS = ["reference"] + (["cpu"] if COMPILED else [])
ALL_BACKENDS = BACKENDS + ([] if TRITON_WHY_NOT else ["triton"])
needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled CPU kernels not built")
needs_triton = pytest.mark.skipif(TRITON_WHY_NOT is not None, reason=TRITON_WHY_NOT or "")

# Relative tolerances on the per-sample norms. The truth is computed in
# float64 from the very same input values (every dtype is exactly
# representable in float64), so only the kernels' own rounding is measured.
# - float64: sums of at most ~10^4 terms in float64, error ≲ 10^4·2^-53 ≈ 1e-12.
# - float32: the row (group) statistics and the γ/β sums over T ≤ 150 rows
#   are accumulated in float32. n = ‖g‖² has relative error ≲ 2‖δg‖/‖g‖; for
#   T terms of random sign ‖δg‖/‖g‖ ≈ T·2^-24/√T ≈ 1e-6, with a worst case of
#   T^{3/2}·2^-24 ≈ 1e-4 at T = 150: 1e-4 bounds it.
# - bfloat16 / float16: converted exactly to float32 and accumulated there,
#   so the float32 bound applies.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FLAGS = [(True, True), (True, False), (False, True)]
FLAG_IDS = ["weight+bias", "weight", "bias"]


@pytest.fixture(autouse=True)
def _default_isa(monkeypatch):
    monkeypatch.delenv("GRADNOISE_CPU_ISA", raising=False)
    monkeypatch.delenv("GRADNOISE_BACKEND", raising=False)


# ---------------------------------------------------------------------------
# Ground truth: torch.func on real modules, in float64
# ---------------------------------------------------------------------------

def _randomise(module: nn.Module, seed: int) -> nn.Module:
    # γ and β do not enter their own gradients; random values make sure of it.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def truth(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, with_weight: bool,
          with_bias: bool) -> torch.Tensor:
    """Σ over the chosen parameters of ‖∂⟨module(x_i), dY_i⟩/∂θ‖², float64 [B]."""
    module = module.double()
    names = [n for n, on in (("weight", with_weight), ("bias", with_bias)) if on]
    params = {n: p.detach() for n, p in module.named_parameters() if n in names}
    assert sorted(params) == sorted(names), "the module lacks a parameter the test asks for"
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)

    def sample_loss(params, xi, gi):
        return (functional_call(module, params, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(
        params, x.detach().double(), dy.detach().double())
    return sum(g.flatten(1).square().sum(1) for g in grads.values())


def layer_norm_module(normalized_shape, eps, rms=False, with_bias=True, seed=0):
    if rms:
        return _randomise(nn.RMSNorm(normalized_shape, eps=eps, dtype=torch.float64), seed)
    return _randomise(nn.LayerNorm(normalized_shape, eps=eps, bias=with_bias,
                                   dtype=torch.float64), seed)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _inputs(shape, dtype, seed=0, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, dy


def _check(norms, expected, dtype):
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert norms.shape == expected.shape
    torch.testing.assert_close(norms.double(), expected, rtol=RTOL[dtype], atol=1e-12)


def _ln(x, dy, normalized_shape, eps, rms, flags, backend):
    return nl.layer_norm_sq_norms(x, dy, _numel(normalized_shape), eps, rms, *flags,
                                  backend=backend)


# ---------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ---------------------------------------------------------------------------

# (x shape, normalized_shape): 2-D, 3-D and 4-D inputs, one and two normalised
# dims, B ∈ {0, 1, odd}, T from 1 to 150 (several 64-row chunks), C odd and
# larger than a vector.
LN_CASES = {
    "2d-B5-C16": ((5, 16), (16,)),
    "3d-B3-T7-C33": ((3, 7, 33), (33,)),
    "4d-B2-T3-C5x12": ((2, 3, 5, 12), (5, 12)),
    "4d-B3-T8-C9": ((3, 4, 2, 9), (9,)),
    "3d-B1-T150-C20": ((1, 150, 20), (20,)),
    "3d-B7-T130-C9": ((7, 130, 9), (9,)),
    "3d-B2-T5-C300": ((2, 5, 300), (300,)),
    "3d-B0": ((0, 4, 8), (8,)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("case", list(LN_CASES))
def test_layer_norm_matches_torch_func(backend, case, flags):
    shape, normalized_shape = LN_CASES[case]
    x, dy = _inputs(shape, torch.float32)
    module = layer_norm_module(normalized_shape, 1e-5, with_bias=flags[1])
    expected = truth(module, x, dy, *flags)
    _check(_ln(x, dy, normalized_shape, 1e-5, False, flags, backend), expected, torch.float32)


RMS_CASES = ["3d-B3-T7-C33", "4d-B2-T3-C5x12", "3d-B1-T150-C20", "2d-B5-C16", "3d-B0"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("case", RMS_CASES)
def test_rms_norm_matches_torch_func(backend, case, eps):
    shape, normalized_shape = LN_CASES[case]
    x, dy = _inputs(shape, torch.float32, seed=1)
    # torch.nn.RMSNorm(eps=None) would use the float32 epsilon on these inputs.
    module = layer_norm_module(normalized_shape, eps if eps is not None else
                               torch.finfo(torch.float32).eps, rms=True)
    expected = truth(module, x, dy, True, False)
    _check(_ln(x, dy, normalized_shape, eps, True, (True, False), backend), expected,
           torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["3d-B3-T7-C33", "4d-B2-T3-C5x12", "3d-B7-T130-C9"])
def test_layer_norm_dtypes(backend, case, dtype):
    shape, normalized_shape = LN_CASES[case]
    x, dy = _inputs(shape, dtype, seed=2)
    for rms in (False, True):
        flags = (True, not rms)
        module = layer_norm_module(normalized_shape, 1e-5, rms=rms)
        _check(_ln(x, dy, normalized_shape, 1e-5, rms, flags, backend),
               truth(module, x, dy, *flags), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_is_what_torch_uses(dtype):
    # Rows with mean square ~1e-6, where ε of 1e-7 and 8e-3 differ visibly.
    x = torch.full((2, 8), 1e-3, dtype=dtype)
    eps = nl.rms_norm_default_eps(dtype)
    got = nn.RMSNorm(8, eps=None, dtype=dtype)(x).double()
    xd = x.double()
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)


def test_layer_norm_with_a_large_mean_is_accurate():
    # |mean| ≫ σ: x̂ must be formed as (x − mean)·rstd with a two-pass variance.
    x, dy = _inputs((3, 6, 64), torch.float32, seed=3, scale=1.0, shift=1000.0)
    module = layer_norm_module((64,), 1e-5)
    expected = truth(module, x, dy, True, True)
    for backend in BACKENDS:
        _check(_ln(x, dy, (64,), 1e-5, False, (True, True), backend), expected, torch.float32)


# ---------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------

# (x shape, groups): no, one and two spatial dims; groups 1, C/2 and C; B ∈
# {0, 1, odd}; a group of 19600 values and channels of 4900 (several
# 4096-value chunks, and the split path when B·G < threads).
GN_CASES = {
    "0d-B4-C6-G1": ((4, 6), 1),
    "0d-B4-C6-G3": ((4, 6), 3),
    "1d-B3-C6-S10-G1": ((3, 6, 10), 1),
    "1d-B3-C6-S10-G3": ((3, 6, 10), 3),
    "1d-B3-C6-S10-G6": ((3, 6, 10), 6),
    "2d-B2-C8-S35-G4": ((2, 8, 5, 7), 4),
    "2d-B5-C8-S9-G8": ((5, 8, 3, 3), 8),
    "2d-B1-C4-S4900-G1": ((1, 4, 70, 70), 1),
    "2d-B3-C4-S4900-G2": ((3, 4, 70, 70), 2),
    "1d-B0": ((0, 4, 3), 2),
}


def group_norm_module(groups, channels, eps=1e-5, seed=0):
    return _randomise(nn.GroupNorm(groups, channels, eps=eps, dtype=torch.float64), seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("case", list(GN_CASES))
def test_group_norm_matches_torch_func(backend, case, flags):
    shape, groups = GN_CASES[case]
    x, dy = _inputs(shape, torch.float32, seed=4)
    expected = truth(group_norm_module(groups, shape[1]), x, dy, *flags)
    _check(nl.group_norm_sq_norms(x, dy, groups, 1e-5, *flags, backend=backend), expected,
           torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["0d-B4-C6-G3", "2d-B2-C8-S35-G4", "2d-B1-C4-S4900-G1"])
def test_group_norm_dtypes(backend, case, dtype):
    shape, groups = GN_CASES[case]
    x, dy = _inputs(shape, dtype, seed=5)
    _check(nl.group_norm_sq_norms(x, dy, groups, 1e-5, backend=backend),
           truth(group_norm_module(groups, shape[1]), x, dy, True, True), dtype)


def _on_thread_counts(fn, counts=(1, 2, 3)):
    """fn() under each torch thread count, in order."""
    before = torch.get_num_threads()
    try:
        out = []
        for threads in counts:
            torch.set_num_threads(threads)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(before)


def _ln_backward_truth(module, x, dy, flags):
    """(dX, dγ, dβ or None) by autograd in float64, and the norms by torch.func."""
    x64 = x.detach().double().requires_grad_()
    params = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
    grads = torch.autograd.grad(module(x64), [x64] + params, dy.double())
    gb = grads[2] if len(grads) > 2 else None
    return grads[0], grads[1], gb, truth(module, x, dy, *flags)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("case", [c for c in LN_CASES if c != "3d-B0"])
def test_layer_norm_backward_matches_autograd_and_torch_func(backend, case, rms):
    shape, normalized_shape = LN_CASES[case]
    x, dy = _inputs(shape, torch.float32, seed=8)
    module = layer_norm_module(normalized_shape, 1e-5, rms=rms)
    flags = (True, not rms)
    gx_t, gw_t, gb_t, norms_t = _ln_backward_truth(module, x, dy, flags)
    gx, gw, gb, norms = nl.layer_norm_backward_and_sq_norms(
        x, dy, _numel(normalized_shape), 1e-5, rms, module.weight.detach().float(), True,
        *flags, backend=backend)
    _check(norms, norms_t, torch.float32)
    atol = GN_GRAD_ATOL[torch.float32]
    torch.testing.assert_close(gx.double(), gx_t, rtol=0, atol=atol * gx_t.abs().max())
    torch.testing.assert_close(gw.double().view(gw_t.shape), gw_t, rtol=0,
                               atol=atol * gw_t.abs().max())
    if not rms:
        torch.testing.assert_close(gb.double().view(gb_t.shape), gb_t, rtol=0,
                                   atol=atol * gb_t.abs().max())
    else:
        assert gb is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_backward_dtypes_threads_and_flags(backend, dtype):
    shape, normalized_shape = LN_CASES["3d-B7-T130-C9"]  # several 64-row chunks per sample
    x, dy = _inputs(shape, dtype, seed=9)
    module = layer_norm_module(normalized_shape, 1e-5)
    gx_t, gw_t, gb_t, norms_t = _ln_backward_truth(module, x, dy, (True, True))
    w = module.weight.detach().to(dtype)
    results = _on_thread_counts(lambda: nl.layer_norm_backward_and_sq_norms(
        x, dy, 9, 1e-5, False, w, True, backend=backend))
    for gx, gw, gb, norms in results:
        assert gx.dtype == dtype
        if backend == "cpu":  # the C++ kernel's sums do not depend on the thread count
            assert torch.equal(norms, results[0][3])
            assert torch.equal(gw, results[0][1]) and torch.equal(gb, results[0][2])
        torch.testing.assert_close(gx.double(), gx_t, rtol=0,
                                   atol=GN_GRAD_ATOL[dtype] * gx_t.abs().max())
    _check(results[0][3], norms_t, dtype)
    gx, gw, gb, norms = nl.layer_norm_backward_and_sq_norms(
        x, dy, 9, 1e-5, False, w, False, False, True, backend=backend)
    assert gx is None and gw is None
    torch.testing.assert_close(gb.double(), gb_t, rtol=0, atol=GN_GRAD_ATOL[dtype] * gb_t.abs().max())
    _check(norms, truth(module, x, dy, False, True), dtype)


@needs_compiled
def test_layer_norm_backward_op_checks():
    x, dy = _inputs((2, 3, 5), torch.float32)
    w = torch.randn(5)
    torch.library.opcheck(torch.ops.gradnoise.layer_norm_backward_and_sq_norms.default,
                          (x, dy, 5, 1e-5, False, w, True, True, True))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.gradnoise.layer_norm_backward_and_sq_norms(x, dy, 5, 1e-5, False, w[:3], True,
                                                             True, True)


def _gn_backward_truth(groups, x, dy, flags):
    """(dX, dγ, dβ) by autograd in float64, and the norms by torch.func."""
    module = group_norm_module(groups, x.shape[1])
    x64 = x.detach().double().requires_grad_()
    gx, gw, gb = torch.autograd.grad(module(x64), (x64, module.weight, module.bias),
                                     dy.double())
    return module, gx, gw, gb, truth(module, x, dy, *flags)


def _gn_forward_stats(module, x):
    B, C = x.shape[:2]
    S = x[0, 0].numel() if B and C else 0
    _, mean, rstd = torch.ops.aten.native_group_norm(
        x, module.weight.to(x.dtype), module.bias.to(x.dtype), B, C, S, module.num_groups,
        module.eps)
    return mean, rstd


# dX is compared with an absolute tolerance on the scale of its terms
# (rstd·|γ|·|dY|, about 1 here): float32 rounding of sums over ≤ 5·10^3 points.
GN_GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2,
                torch.float16: 5e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("case", [c for c in GN_CASES if c != "1d-B0"])
def test_group_norm_backward_matches_autograd_and_torch_func(backend, case, flags):
    shape, groups = GN_CASES[case]
    x, dy = _inputs(shape, torch.float32, seed=6)
    module, gx_t, gw_t, gb_t, norms_t = _gn_backward_truth(groups, x, dy, flags)
    mean, rstd = _gn_forward_stats(module.float(), x)
    gx, gw, gb, norms = nl.group_norm_backward_and_sq_norms(
        x, dy, mean, rstd, module.weight.float(), groups, 1e-5, True, *flags, backend=backend)
    _check(norms, norms_t, torch.float32)
    atol = GN_GRAD_ATOL[torch.float32]
    torch.testing.assert_close(gx.double(), gx_t, rtol=0, atol=atol)
    assert (gw is None) == (not flags[0]) and (gb is None) == (not flags[1])
    if flags[0]:
        torch.testing.assert_close(gw.double(), gw_t, rtol=0, atol=atol * gw_t.abs().max())
    if flags[1]:
        torch.testing.assert_close(gb.double(), gb_t, rtol=0, atol=atol * gb_t.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_backward_dtypes_threads_and_no_input_grad(backend, dtype):
    shape, groups = GN_CASES["2d-B2-C8-S35-G4"]
    x, dy = _inputs(shape, dtype, seed=7)
    module, gx_t, _, _, norms_t = _gn_backward_truth(groups, x, dy, (True, True))
    mean, rstd = _gn_forward_stats(module.to(dtype), x)
    results = _on_thread_counts(lambda: nl.group_norm_backward_and_sq_norms(
        x, dy, mean, rstd, module.weight, groups, 1e-5, True, backend=backend))
    for gx, _, _, norms in results:
        assert gx.dtype == dtype
        if backend == "cpu":  # the C++ kernel's sums do not depend on the thread count
            assert torch.equal(norms, results[0][3])
        torch.testing.assert_close(gx.double(), gx_t, rtol=0, atol=GN_GRAD_ATOL[dtype])
    # half-precision statistics from the forward bound the norms' accuracy
    torch.testing.assert_close(results[0][3].double(), norms_t,
                               rtol=RTOL[dtype] if dtype in (torch.float32, torch.float64)
                               else 3e-2, atol=1e-12)
    gx, gw, gb, norms = nl.group_norm_backward_and_sq_norms(
        x, dy, mean, rstd, module.weight, groups, 1e-5, False, backend=backend)
    assert gx is None and torch.equal(norms, results[0][3])


@needs_compiled
def test_group_norm_backward_op_checks():
    x, dy = _inputs((2, 4, 3, 3), torch.float32)
    module = group_norm_module(2, 4).float()
    mean, rstd = _gn_forward_stats(module, x)
    torch.library.opcheck(torch.ops.gradnoise.group_norm_backward_and_sq_norms.default,
                          (x, dy, mean, rstd, module.weight.detach(), 2, True, True, True))
    with pytest.raises(RuntimeError, match="mean"):
        torch.ops.gradnoise.group_norm_backward_and_sq_norms(
            x, dy, mean[:1], rstd, module.weight, 2, True, True, True)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.gradnoise.group_norm_backward_and_sq_norms(
            x, dy, mean, rstd, module.weight[:3], 2, True, True, True)


# ---------------------------------------------------------------------------
# Layouts, inputs, threads, dtypes at the edge
# ---------------------------------------------------------------------------

def _non_contiguous():
    gen = torch.Generator().manual_seed(6)
    return {
        # [T, B, C] storage viewed as [B, T, C]; a stride-2 last dim
        "ln-transposed": (torch.randn(9, 4, 13, generator=gen).transpose(0, 1),
                          torch.randn(9, 4, 13, generator=gen).transpose(0, 1), (13,), None),
        "ln-strided": (torch.randn(3, 5, 22, generator=gen)[..., ::2],
                       torch.randn(3, 5, 22, generator=gen)[..., ::2], (11,), None),
        # channels-last GroupNorm input
        "gn-channels-last": (torch.randn(3, 5, 4, 6, generator=gen).permute(0, 3, 1, 2),
                             torch.randn(3, 5, 4, 6, generator=gen).permute(0, 3, 1, 2),
                             None, 3),
    }


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(_non_contiguous()))
def test_non_contiguous_inputs(backend, case):
    x, dy, normalized_shape, groups = _non_contiguous()[case]
    assert not x.is_contiguous() and not dy.is_contiguous()
    if groups is None:
        got = _ln(x, dy, normalized_shape, 1e-5, False, (True, True), backend)
        expected = truth(layer_norm_module(normalized_shape, 1e-5), x, dy, True, True)
    else:
        got = nl.group_norm_sq_norms(x, dy, groups, 1e-5, backend=backend)
        expected = truth(group_norm_module(groups, x.shape[1]), x, dy, True, True)
    _check(got, expected, torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inputs_are_left_unchanged(backend):
    x, dy = _inputs((2, 3, 8), torch.float32)
    xg, dg = _inputs((2, 4, 3), torch.bfloat16)
    copies = [t.clone() for t in (x, dy, xg, dg)]
    versions = [t._version for t in (x, dy, xg, dg)]
    nl.layer_norm_sq_norms(x, dy, 8, 1e-5, backend=backend)
    nl.layer_norm_sq_norms(x, dy, 8, 1e-5, rms=True, backend=backend)
    nl.group_norm_sq_norms(xg, dg, 2, 1e-5, backend=backend)
    for t, c, v in zip((x, dy, xg, dg), copies, versions):
        assert torch.equal(t, c) and t._version == v


@needs_compiled
def test_cpu_result_does_not_depend_on_the_thread_count():
    # Sample-parallel and chunk-parallel paths (LayerNorm), group-parallel and
    # split paths (GroupNorm) add the same partial sums in the same order.
    x, dy = _inputs((3, 200, 24), torch.float32, seed=7)
    xg, dg = _inputs((1, 6, 50, 100), torch.float32, seed=8)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            results.append((nl.layer_norm_sq_norms(x, dy, 24, 1e-5, backend="cpu"),
                            nl.group_norm_sq_norms(xg, dg, 2, 1e-5, backend="cpu")))
    finally:
        torch.set_num_threads(old)
    for ln, gn in results[1:]:
        assert torch.equal(ln, results[0][0]) and torch.equal(gn, results[0][1])
    _check(results[0][0], truth(layer_norm_module((24,), 1e-5), x, dy, True, True),
           torch.float32)


@needs_compiled
def test_every_instruction_set_of_this_cpu(monkeypatch):
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["generic"] + (["avx2"] if " avx2" in flags and " fma" in flags else []) + \
        (["avx512"] if all(f" {f}" in flags for f in ("avx512f", "avx512dq", "avx512vl"))
         else [])
    x, dy = _inputs((3, 70, 37), torch.bfloat16, seed=9)
    xg, dg = _inputs((3, 6, 11), torch.float16, seed=10)
    ln_truth = truth(layer_norm_module((37,), 1e-5), x, dy, True, True)
    gn_truth = truth(group_norm_module(3, 6), xg, dg, True, True)
    for isa in isas:
        monkeypatch.setenv("GRADNOISE_CPU_ISA", isa)
        _check(nl.layer_norm_sq_norms(x, dy, 37, 1e-5, backend="cpu"), ln_truth, torch.bfloat16)
        _check(nl.group_norm_sq_norms(xg, dg, 3, 1e-5, backend="cpu"), gn_truth, torch.float16)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_half_inputs_with_large_norms_do_not_overflow(backend):
    # Entries of 30 give norms far above float16's largest value (65504).
    x, dy = _inputs((2, 6, 16), torch.float16, seed=11, scale=30.0)
    dy = dy * 30
    expected = truth(layer_norm_module((16,), 1e-5), x, dy, True, True)
    assert expected.min() > 1e5
    got = nl.layer_norm_sq_norms(x, dy, 16, 1e-5, backend=backend)
    assert torch.isfinite(got).all()
    _check(got, expected, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_value_is_converted_exactly(backend, dtype):
    # One value per sample, bias only: n_i = dy_i², exact in float32 for every
    # finite half value (11 significant bits squared), subnormals included;
    # infinities and NaN come through as such.
    dy = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    dy = dy.reshape(-1, 1)
    got = nl.layer_norm_sq_norms(torch.zeros_like(dy), dy, 1, 1e-5, False, False, True,
                                 backend=backend)
    torch.testing.assert_close(got, dy.float().square().flatten(), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_and_flagless_problems(backend):
    for x in (torch.randn(0, 3, 4), torch.randn(2, 0, 4)):
        got = nl.layer_norm_sq_norms(x, x.clone(), 4, 1e-5, backend=backend)
        assert got.shape == (x.shape[0],) and not got.any()
    x = torch.randn(2, 4, 0)
    got = nl.group_norm_sq_norms(x, x.clone(), 2, 1e-5, backend=backend)
    assert got.shape == (2,) and not got.any()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for got in (nl.layer_norm_sq_norms(x, x, 5, 1e-5, False, False, False, backend=backend),
                nl.group_norm_sq_norms(x, x, 2, 1e-5, False, False, backend=backend)):
        assert got.dtype == torch.float64 and got.shape == (3,) and not got.any()


# ---------------------------------------------------------------------------
# Triton, under the interpreter: tiny shapes
# ---------------------------------------------------------------------------

TRITON_LN = ["3d-B3-T7-C33", "4d-B2-T3-C5x12", "2d-B5-C16", "3d-B0"]
TRITON_GN = {"0d-B4-C6-G3": ((4, 6), 3), "1d-B3-C6-S10-G1": ((3, 6, 10), 1),
             "2d-B2-C8-S35-G8": ((2, 8, 5, 7), 8), "1d-B0": ((0, 4, 3), 2)}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_LN)
def test_triton_layer_norm(case, dtype):
    shape, normalized_shape = LN_CASES[case]
    x, dy = _inputs(shape, dtype, seed=12)
    for rms, flags in ((False, (True, True)), (False, (False, True)), (True, (True, False))):
        module = layer_norm_module(normalized_shape, 1e-5, rms=rms)
        _check(_ln(x, dy, normalized_shape, 1e-5, rms, flags, "triton"),
               truth(module, x, dy, *flags), dtype)


@needs_triton
def test_triton_layer_norm_chunks_rows():
    # B = 1, T = 40: the rows are split over several programs and added back.
    x, dy = _inputs((1, 40, 9), torch.float32, seed=13)
    module = layer_norm_module((9,), 1e-5)
    _check(_ln(x, dy, (9,), 1e-5, False, (True, True), "triton"),
           truth(module, x, dy, True, True), torch.float32)
    _check(_ln(x, dy, (9,), None, True, (True, False), "triton"),
           truth(layer_norm_module((9,), torch.finfo(torch.float32).eps, rms=True), x, dy,
                 True, False), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TRITON_GN))
def test_triton_group_norm(case, dtype):
    shape, groups = TRITON_GN[case]
    x, dy = _inputs(shape, dtype, seed=14)
    module = group_norm_module(groups, shape[1])
    for flags in FLAGS:
        _check(nl.group_norm_sq_norms(x, dy, groups, 1e-5, *flags, backend="triton"),
               truth(module, x, dy, *flags), dtype)


# ---------------------------------------------------------------------------
# Bad input, opcheck
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input_names_the_argument(backend):
    x = torch.randn(3, 4, 6)
    ln_cases = [
        ((x, x[:, :3]), {}, "must have the same shape"),
        ((x, x.double()), {}, "`x` is torch.float32 but `grad_out` is torch.float64"),
        ((x.int(), x.int()), {}, "`x` has dtype torch.int32"),
        ((x[0, 0], x[0, 0]), {}, "`x` must have at least 2 dimensions"),
        ((x, x.to("meta")), {}, "`grad_out` is on meta"),
        ((x, x), {"normalized_numel": 5}, "`normalized_numel` = 5 is not the product"),
        ((x, x), {"normalized_numel": 0}, "`normalized_numel` must be >= 1"),
        ((x, x), {"eps": -1e-5}, "`eps` must be a finite number >= 0"),
        ((x, x), {"eps": float("nan")}, "`eps` must be a finite number >= 0"),
    ]
    for args, kw, message in ln_cases:
        kw = {"normalized_numel": 6, "eps": 1e-5, **kw}
        with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
            nl.layer_norm_sq_norms(*args, kw["normalized_numel"], kw["eps"], backend=backend)
    with pytest.raises(ValueError, match="`eps` may be None only with rms=True"):
        nl.layer_norm_sq_norms(x, x, 6, None, backend=backend)
    gn_cases = [
        ((x, x.transpose(1, 2)), 2, 1e-5, "must have the same shape"),
        ((x, x), 3, 1e-5, "`groups` = 3 must be >= 1 and divide the 4 channels"),
        ((x, x), 0, 1e-5, "`groups` = 0 must be >= 1"),
        ((x, x), 2, -1.0, "`eps` must be a finite number >= 0"),
        ((x.half(), x), 2, 1e-5, "`x` is torch.float16 but `grad_out` is torch.float32"),
    ]
    for args, groups, eps, message in gn_cases:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
            nl.group_norm_sq_norms(*args, groups, eps, backend=backend)


@needs_compiled
def test_compiled_ops_check_their_own_arguments():
    x = torch.randn(3, 4, 6)
    op_ln = torch.ops.gradnoise.layer_norm_sq_norms
    op_gn = torch.ops.gradnoise.group_norm_sq_norms
    cases = [
        (lambda: op_ln(x, x[:, :2], 6, 1e-5, False, True, True), "must have the same shape"),
        (lambda: op_ln(x, x.double(), 6, 1e-5, False, True, True),
         "`x` is Float but `grad_out` is Double"),
        (lambda: op_ln(x, x, 7, 1e-5, False, True, True), "`normalized_numel` = 7 is not"),
        (lambda: op_ln(x, x, 6, -1.0, False, True, True), "`eps` must be a finite number"),
        (lambda: op_ln(x.int(), x.int(), 6, 1e-5, False, True, True), "`x` has dtype Int"),
        (lambda: op_gn(x, x, 3, 1e-5, True, True), "`groups` = 3 must be >= 1 and divide"),
        (lambda: op_gn(x[0, 0], x[0, 0], 1, 1e-5, True, True),
         "`x` must have at least 2 dimensions"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


OPCHECK_ARGS = [
    ("ln", (3, 5, 7), (7, False, True, True), torch.float32),
    ("ln", (2, 3, 4, 5), (20, True, True, False), torch.float64),
    ("ln", (3, 4), (4, False, False, True), torch.bfloat16),
    ("gn", (3, 4, 5), (2, True, True), torch.float32),
    ("gn", (2, 6), (3, True, False), torch.float16),
]


def _opcheck(namespace, kind, shape, rest, dtype):
    x, dy = _inputs(shape, dtype, seed=15)
    if kind == "ln":
        op = getattr(torch.ops, namespace).layer_norm_sq_norms.default
        numel, rms, w, b = rest
        args = (x, dy, numel, 1e-5, rms, w, b)
    else:
        op = getattr(torch.ops, namespace).group_norm_sq_norms.default
        groups, w, b = rest
        args = (x, dy, groups, 1e-5, w, b)
    torch.library.opcheck(op, args)


@needs_compiled
@pytest.mark.parametrize("kind,shape,rest,dtype", OPCHECK_ARGS)
def test_opcheck_compiled(kind, shape, rest, dtype):
    _opcheck("gradnoise", kind, shape, rest, dtype)


@needs_triton
@pytest.mark.parametrize("kind,shape,rest,dtype", OPCHECK_ARGS[::2])
def test_opcheck_triton(kind, shape, rest, dtype):
    from gradnoise.ops.triton import norm_layers  # noqa: F401  (registers the ops)
    _opcheck("gradnoise_triton", kind, shape, rest, dtype)
