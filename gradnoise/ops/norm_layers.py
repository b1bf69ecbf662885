"""Per-sample gradient norms of normalisation layers' affine parameters.

Gray et al. (2024), "Normalization Layer Per-Example Gradients are Sufficient
to Predict Gradient Noise Scale in Transformers", show that the per-sample
gradients of LayerNorm's γ and β alone predict the gradient noise scale of a
whole transformer. They are cheap: with x̂ the normalised input and dY the
output gradient, sample i's gradients are

    gγ_i = Σ_t dY_i,t ⊙ x̂_i,t        gβ_i = Σ_t dY_i,t

reductions over data that the layer's backward streams anyway. The ops here
return n_i = ‖gγ_i‖² + ‖gβ_i‖² (each term as the flags ask), recomputing x̂
from the layer's input x in the same pass.

Backends as for the Linear ops (see :mod:`gradnoise.ops`): the compiled
``torch.ops.gradnoise.layer_norm_sq_norms`` / ``group_norm_sq_norms`` for the
inputs' device, "triton" (``torch.ops.gradnoise_triton.*``) and "reference"
(the pure-PyTorch ``*_ref`` twins below).
"""
from __future__ import annotations


import torch

from ..checks import is_int, is_real
from . import _validate
from ._validate import accumulation_dtype
from .backends import resolve_backend

__all__ = [
    "layer_norm_sq_norms",
    "group_norm_sq_norms",
    "group_norm_backward_and_sq_norms",
    "group_norm_backward_and_sq_norms_ref",
    "layer_norm_backward_and_sq_norms",
    "layer_norm_backward_and_sq_norms_ref",
    "layer_norm_sq_norms_ref",
    "group_norm_sq_norms_ref",
    "rms_norm_default_eps",
]


# ---------------------------------------------------------------------------
# Argument checks, shared by every backend and by the fake (meta) kernels;
# the messages match the C++ ones (csrc/cpu/norm_layers_cpu.cpp).
# ---------------------------------------------------------------------------

def _check_pair(x, grad_out, layout: str) -> None:
    _validate.tensor_pair(x, grad_out, layout)
    if x.shape != grad_out.shape:
        raise ValueError(
            f"gradnoise: `x` of shape {tuple(x.shape)} and `grad_out` of shape "
            f"{tuple(grad_out.shape)} must have the same shape")


def _check_eps(eps) -> None:
    if not is_real(eps) or eps < 0:
        raise ValueError(f"gradnoise: `eps` must be a finite number >= 0, got {eps!r}")


def _check_int(name: str, value) -> None:
    if not is_int(value):
        raise TypeError(f"gradnoise: `{name}` must be an int, got {type(value).__name__}")


def check_layer_norm_args(x, grad_out, normalized_numel, eps) -> tuple[int, int, int]:
    """Check a LayerNorm/RMSNorm (input, output gradient) pair; returns (B, T, C).

    C = normalized_numel must be the product of trailing dimensions of x
    (not including the first, the batch); T is the product of the others.
    """
    _check_pair(x, grad_out, "[B, ..., normalized dims]")
    _check_eps(eps)
    _check_int("normalized_numel", normalized_numel)
    if normalized_numel < 1:
        raise ValueError(f"gradnoise: `normalized_numel` must be >= 1, got {normalized_numel}")
    trailing, matches = 1, False
    for size in reversed(x.shape[1:]):
        trailing *= size
        if trailing == normalized_numel:
            matches = True
            break
    if not matches:
        raise ValueError(
            f"gradnoise: `normalized_numel` = {normalized_numel} is not the product of "
            f"trailing dimensions of `x` of shape {tuple(x.shape)} (the first dimension is "
            "the batch)")
    B, C = x.shape[0], normalized_numel
    T = 1
    for size in x.shape[1:]:
        T *= size
    return B, T // C, C


def check_group_norm_args(x, grad_out, groups, eps) -> tuple[int, int, int]:
    """Check a GroupNorm (input, output gradient) pair [B, C, *spatial]; returns (B, C, S)."""
    _check_pair(x, grad_out, "[B, C, *spatial]")
    _check_eps(eps)
    _check_int("groups", groups)
    B, C = x.shape[0], x.shape[1]
    if groups < 1 or C % groups != 0:
        raise ValueError(
            f"gradnoise: `groups` = {groups} must be >= 1 and divide the {C} channels of `x` "
            f"(dimension 1 of {tuple(x.shape)})")
    S = 1
    for size in x.shape[2:]:
        S *= size
    return B, C, S


def rms_norm_default_eps(dtype: torch.dtype) -> float:
    """The ε torch.nn.RMSNorm(eps=None) uses for inputs of `dtype`.

    torch documents ``torch.finfo(x.dtype).eps``, but its kernels take the
    epsilon of the compute type: float32's for bfloat16 and float16 inputs.
    """
    return torch.finfo(accumulation_dtype(dtype)).eps


def normalised_rows(x: torch.Tensor, eps: float, rms: bool = False) -> torch.Tensor:
    """x̂ over the last dimension: x·rsqrt(mean x² + ε) for RMSNorm,
    (x − mean)·rsqrt(var + ε) with the biased variance for LayerNorm and
    GroupNorm (whose rows are a sample's group)."""
    if rms:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    dev = x - x.mean(-1, keepdim=True)
    return dev * torch.rsqrt(dev.square().mean(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------
# Pure-PyTorch twins
# ---------------------------------------------------------------------------

def layer_norm_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, normalized_numel: int,
                            eps: float, rms: bool = False, with_weight: bool = True,
                            with_bias: bool = True) -> torch.Tensor:
    """Per-sample ‖Σ_t dY ⊙ x̂‖² + ‖Σ_t dY‖² of a LayerNorm/RMSNorm, shape [B]."""
    B, T, C = check_layer_norm_args(x, grad_out, normalized_numel, eps)
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(B, dtype=acc, device=x.device)
    if B * T == 0 or not (with_weight or with_bias):
        return out
    g3 = grad_out.reshape(B, T, C).to(acc)
    if with_weight:
        xhat = normalised_rows(x.reshape(B, T, C).to(acc), eps, rms)
        out = out + (g3 * xhat).sum(1).square().sum(1)
    if with_bias:
        out = out + g3.sum(1).square().sum(1)
    return out


def group_norm_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, groups: int, eps: float,
                            with_weight: bool = True, with_bias: bool = True) -> torch.Tensor:
    """Per-sample Σ_c (Σ_s dY·x̂)² + (Σ_s dY)² of a GroupNorm, shape [B]."""
    B, C, S = check_group_norm_args(x, grad_out, groups, eps)
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(B, dtype=acc, device=x.device)
    if B * C * S == 0 or not (with_weight or with_bias):
        return out
    g3 = grad_out.reshape(B, C, S).to(acc)
    if with_weight:
        xhat = normalised_rows(x.reshape(B, groups, (C // groups) * S).to(acc), eps).reshape(B, C, S)
        out = out + (g3 * xhat).sum(2).square().sum(1)
    if with_bias:
        out = out + g3.sum(2).square().sum(1)
    return out


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

def layer_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, normalized_numel: int,
                        eps: float | None, rms: bool = False, with_weight: bool = True,
                        with_bias: bool = True, backend: str | None = None) -> torch.Tensor:
    """Per-sample squared gradient norms of a LayerNorm's (or RMSNorm's) γ and β.

    x (the layer's input) and grad_out (the gradient of its output) have the
    same shape [B, ..., normalized dims]; both are viewed as [B, T, C] with
    C = ``normalized_numel``, the product of the normalised trailing dims.
    Per row (i, t), with mean and biased variance σ² over its C entries:

        LayerNorm:  x̂ = (x − mean) / √(σ² + ε)
        RMSNorm:    x̂ = x / √(mean(x²) + ε)            (``rms=True``)

    and per sample i (Gray et al. 2024, "Normalization Layer Per-Example
    Gradients are Sufficient to Predict Gradient Noise Scale in Transformers"):

        gγ_i = Σ_t dY_i,t ⊙ x̂_i,t,   gβ_i = Σ_t dY_i,t
        n_i  = ‖gγ_i‖² (if ``with_weight``) + ‖gβ_i‖² (if ``with_bias``)

    ``eps`` is the layer's ε; None (RMSNorm only) means what
    ``torch.nn.RMSNorm(eps=None)`` uses, :func:`rms_norm_default_eps`.
    Returns n [B], accumulated and returned in float32 (float64 for float64
    input); the statistics are recomputed from x in that precision.
    """
    if eps is None:
        if not rms:
            raise ValueError("gradnoise: `eps` may be None only with rms=True (RMSNorm)")
        if isinstance(x, torch.Tensor):
            eps = rms_norm_default_eps(x.dtype)
    check_layer_norm_args(x, grad_out, normalized_numel, eps)
    eps = float(eps)
    be = resolve_backend(x.device, backend, "norm_layers")
    if be == "reference":
        return layer_norm_sq_norms_ref(x, grad_out, normalized_numel, eps, rms, with_weight,
                                       with_bias)
    if be == "triton":
        from .triton import norm_layers as triton_norm_layers
        return triton_norm_layers.layer_norm_sq_norms(x, grad_out, normalized_numel, eps, rms,
                                                      with_weight, with_bias)
    return torch.ops.gradnoise.layer_norm_sq_norms(x, grad_out, normalized_numel, eps, rms,
                                                   with_weight, with_bias)


def group_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, groups: int, eps: float,
                        with_weight: bool = True, with_bias: bool = True,
                        backend: str | None = None) -> torch.Tensor:
    """Per-sample squared gradient norms of a GroupNorm's γ and β.

    x and grad_out have the same shape [B, C, *spatial] (spatial may be
    empty; S = its product), and ``groups`` = G divides C. Per (sample i,
    group), with mean and biased variance σ² over the group's (C/G)·S
    entries, x̂ = (x − mean) / √(σ² + ε); per channel c:

        gγ_i[c] = Σ_s dY_i[c, s]·x̂_i[c, s],   gβ_i[c] = Σ_s dY_i[c, s]
        n_i = ‖gγ_i‖² (if ``with_weight``) + ‖gβ_i‖² (if ``with_bias``)

    (the GroupNorm case of Gray et al. 2024). Returns n [B] in float32
    (float64 for float64 input), the precision it is accumulated in.
    """
    check_group_norm_args(x, grad_out, groups, eps)
    eps = float(eps)
    be = resolve_backend(x.device, backend, "norm_layers")
    if be == "reference":
        return group_norm_sq_norms_ref(x, grad_out, groups, eps, with_weight, with_bias)
    if be == "triton":
        from .triton import norm_layers as triton_norm_layers
        return triton_norm_layers.group_norm_sq_norms(x, grad_out, groups, eps, with_weight,
                                                      with_bias)
    return torch.ops.gradnoise.group_norm_sq_norms(x, grad_out, groups, eps, with_weight,
                                                   with_bias)


def group_norm_backward_and_sq_norms_ref(x, grad_out, mean, rstd, weight, groups,
                                         need_input_grad=True, with_weight=True, with_bias=True):
    """Pure-PyTorch twin of :func:`group_norm_backward_and_sq_norms`: torch's
    GroupNorm backward, and the norms from the forward's statistics."""
    B, C, S = check_group_norm_args(x, grad_out, groups, 0.0)
    acc = accumulation_dtype(x.dtype)
    gx, gw, gb = torch.ops.aten.native_group_norm_backward(
        grad_out, x, mean, rstd, weight, B, C, S, groups,
        [need_input_grad, with_weight and weight is not None, with_bias])
    norms = torch.zeros(B, dtype=acc, device=x.device)
    if B * C * S and (with_weight or with_bias):
        g3 = grad_out.reshape(B, C, S).to(acc)
        per_channel = lambda t: t.reshape(B, groups, 1).expand(B, groups, C // groups).reshape(B, C, 1)
        if with_weight:
            xhat = (x.reshape(B, C, S).to(acc) - per_channel(mean.to(acc))) * per_channel(rstd.to(acc))
            norms = norms + (g3 * xhat).sum(2).square().sum(1)
        if with_bias:
            norms = norms + g3.sum(2).square().sum(1)
    return (gx if need_input_grad else None, gw if with_weight else None,
            gb if with_bias else None, norms)


def group_norm_backward_and_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, mean: torch.Tensor,
                                     rstd: torch.Tensor, weight: torch.Tensor | None, groups: int,
                                     eps: float, need_input_grad: bool = True,
                                     with_weight: bool = True, with_bias: bool = True,
                                     backend: str | None = None):
    """GroupNorm's backward with the per-sample norms of γ and β from the same passes.

    x [B, C, *spatial] is the layer's input, grad_out its output gradient,
    mean and rstd [B, groups] the statistics native_group_norm returned in
    the forward, weight γ [C] (None: γ = 1), eps the layer's ε. Returns (grad_input or None,
    grad_weight or None, grad_bias or None, n [B]) with n as in
    :func:`group_norm_sq_norms`. The CPU kernel reduces each channel once for
    γ, β, the norms and the input gradient's coefficients, then writes the
    input gradient, one group (sample, group) at a time, so that the second
    pass finds the group's x and dY in cache: one read of each from memory
    where torch's own backward makes two. Other devices run torch's backward
    and their backend's norms op.
    """
    B, C, S = check_group_norm_args(x, grad_out, groups, eps)
    be = resolve_backend(x.device, backend, "norm_layers")
    if be == "cpu":
        gx, gw, gb, n = torch.ops.gradnoise.group_norm_backward_and_sq_norms(
            x, grad_out, mean, rstd, weight, groups, need_input_grad, with_weight, with_bias)
        return (gx if need_input_grad else None, gw if with_weight else None,
                gb if with_bias else None, n)
    if be == "reference":
        return group_norm_backward_and_sq_norms_ref(x, grad_out, mean, rstd, weight, groups,
                                                    need_input_grad, with_weight, with_bias)
    gx, gw, gb = torch.ops.aten.native_group_norm_backward(
        grad_out, x, mean, rstd, weight, B, C, S, groups,
        [need_input_grad, with_weight and weight is not None, with_bias])
    n = group_norm_sq_norms(x, grad_out, groups, eps, with_weight, with_bias, backend=be)
    return (gx if need_input_grad else None, gw if with_weight else None,
            gb if with_bias else None, n)


def layer_norm_backward_and_sq_norms_ref(x, grad_out, normalized_numel, eps, rms=False,
                                         weight=None, need_input_grad=True, with_weight=True,
                                         with_bias=True):
    """Pure-PyTorch twin of :func:`layer_norm_backward_and_sq_norms`: autograd
    through torch's own LayerNorm (RMSNorm) of the rows, and the norms op's twin."""
    B, T, C = check_layer_norm_args(x, grad_out, normalized_numel, eps)
    if eps is None:
        eps = rms_norm_default_eps(x.dtype)
    xr = x.detach().reshape(B, T, C).requires_grad_(need_input_grad)
    w = None if weight is None else weight.detach().reshape(C).requires_grad_(with_weight)
    b = None
    if not rms and with_bias:
        b = torch.zeros(C, dtype=w.dtype if w is not None else x.dtype, device=x.device,
                        requires_grad=True)
    with torch.enable_grad():
        out = (torch.nn.functional.rms_norm(xr, (C,), w, eps) if rms else
               torch.nn.functional.layer_norm(xr, (C,), w, b, eps))
        wanted = [t for t in (xr, w, b) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.reshape(B, T, C)) if wanted else ())
    gx = next(grads).reshape(x.shape) if need_input_grad else None
    gw = next(grads) if w is not None and with_weight else None
    gb = next(grads) if b is not None else None
    if rms and with_bias:  # RMSNorm has no β: its "bias" term is Σ dY
        gb = grad_out.reshape(B * T, C).sum(0, dtype=accumulation_dtype(x.dtype)).to(x.dtype)
    norms = layer_norm_sq_norms_ref(x, grad_out, normalized_numel, eps, rms, with_weight,
                                    with_bias)
    return gx, gw, gb, norms


def layer_norm_backward_and_sq_norms(x: torch.Tensor, grad_out: torch.Tensor,
                                     normalized_numel: int, eps: float | None,
                                     rms: bool = False, weight: torch.Tensor | None = None,
                                     need_input_grad: bool = True, with_weight: bool = True,
                                     with_bias: bool = True, backend: str | None = None):
    """LayerNorm's (RMSNorm's, ``rms=True``) backward with the per-sample norms of
    γ and β from the same pass.

    x and grad_out as in :func:`layer_norm_sq_norms`, weight γ (None: γ = 1).
    Returns (grad_input or None, grad_weight or None, grad_bias or None, n [B]);
    per row, with ĝ = γ ⊙ dY,

        dX = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))      (RMSNorm: no mean(ĝ) term)

    The CPU kernel reads each row once and computes its statistics, its share
    of the sample's γ/β gradients and its input gradient while it is in L1;
    the parameter gradients are the per-sample ones summed over samples.
    Other devices run autograd through torch's layer and their norms op.
    """
    check_layer_norm_args(x, grad_out, normalized_numel, eps)
    if eps is None:
        eps = rms_norm_default_eps(x.dtype)
    be = resolve_backend(x.device, backend, "norm_layers")
    if be == "cpu":
        gx, gw, gb, n = torch.ops.gradnoise.layer_norm_backward_and_sq_norms(
            x, grad_out, normalized_numel, float(eps), rms, weight, need_input_grad, with_weight,
            with_bias)
        return (gx if need_input_grad else None, gw if with_weight else None,
                gb if with_bias else None, n)
    gx, gw, gb, _ = layer_norm_backward_and_sq_norms_ref(
        x, grad_out, normalized_numel, eps, rms, weight, need_input_grad, with_weight, with_bias)
    n = layer_norm_sq_norms(x, grad_out, normalized_numel, eps, rms, with_weight, with_bias,
                            backend=be)
    return gx, gw, gb, n


def register_fakes() -> None:
    """Shapes of the compiled normalisation-layer ops for fake tensors."""
    @torch.library.register_fake("gradnoise::layer_norm_sq_norms")
    def _layer_norm_sq_norms_fake(x, grad_out, normalized_numel, eps, rms, with_weight,
                                  with_bias):
        B, _, _ = check_layer_norm_args(x, grad_out, normalized_numel, eps)
        return x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))

    @torch.library.register_fake("gradnoise::layer_norm_backward_and_sq_norms")
    def _layer_norm_backward_and_sq_norms_fake(x, grad_out, normalized_numel, eps, rms, weight,
                                               need_input_grad, with_weight, with_bias):
        B, _, C = check_layer_norm_args(x, grad_out, normalized_numel, eps)
        return _norm_backward_outputs(x, weight, B, C, need_input_grad, with_weight, with_bias)

    @torch.library.register_fake("gradnoise::group_norm_backward_and_sq_norms")
    def _group_norm_backward_and_sq_norms_fake(x, grad_out, mean, rstd, weight, groups,
                                               need_input_grad, with_weight, with_bias):
        B, C, _ = check_group_norm_args(x, grad_out, groups, 0.0)
        return _norm_backward_outputs(x, weight, B, C, need_input_grad, with_weight, with_bias)

    @torch.library.register_fake("gradnoise::group_norm_sq_norms")
    def _group_norm_sq_norms_fake(x, grad_out, groups, eps, with_weight, with_bias):
        B, _, _ = check_group_norm_args(x, grad_out, groups, eps)
        return x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))


def _norm_backward_outputs(x, weight, B, C, need_input_grad, with_weight, with_bias):
    """(grad_input, grad_weight, grad_bias, norms) of a normalisation layer's backward op."""
    grad_input = torch.empty_like(x) if need_input_grad else x.new_empty((0,))
    wdt = weight.dtype if weight is not None else x.dtype
    grad_weight = x.new_empty((C,) if with_weight else (0,), dtype=wdt)
    grad_bias = x.new_empty((C,) if with_bias else (0,), dtype=wdt)
    return grad_input, grad_weight, grad_bias, x.new_empty(
        (B,), dtype=_validate.accumulation_dtype(x.dtype))
