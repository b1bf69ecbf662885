"""Per-sample gradient norms of convolutions (1-D, 2-D and 3-D, zero padding,
any stride, dilation and groups).

A convolution is a Linear problem per sample and group (Rochette et al. 2019,
"Efficient Per-Example Gradient Computations in Convolutional Neural
Networks"): with the input's patches X_i [L, C_in/G·k] at the L output
positions and the output gradient dY_i [L, C_out/G], sample i's weight
gradient for group g is G_i,g = dY_i,gᵀ X_i,g and its bias gradient
Σ_l dY_i,l. The ops return

    n_i = Σ_g ‖G_i,g‖²_F (+ ‖Σ_l dY_i,l‖² with the bias)

and, for ``conv_weight_grad_and_sq_norms``, the weight gradient Σ_i G_i in
the weight's shape [C_out, C_in/G, *k], in the same pass where that pass is
the faster (else torch's convolution weight gradient with the norms beside
it: gradnoise.ops.fusion).

Backends: the compiled CPU op gathers the patches from the image while it
packs the operands of the fused kernel (no unfolded copy of the input);
elsewhere the patches are unfolded and each group runs through that
backend's fused Linear op; "reference" is the pure-PyTorch twin below.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..checks import is_int
from . import _validate, fusion
from ._validate import accumulation_dtype
from .backends import resolve_backend
from .linear import backend_weight_grad_and_sq_norms, linear_sq_norms

__all__ = ["conv_sq_norms", "conv_weight_grad_and_sq_norms", "conv_sq_norms_ref",
           "conv_weight_grad_and_sq_norms_ref", "conv_patches", "grouped_grad_out",
           "check_conv_args"]


def _as_list(name: str, value, nd: int) -> list[int]:
    if is_int(value):
        value = [value] * nd
    value = list(value)
    if len(value) != nd or not all(is_int(v) for v in value):
        raise ValueError(f"gradnoise: `{name}` must be an int or {nd} ints, got {value!r}")
    return value


def check_conv_args(x, grad_out, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """Check a convolution's (input, output gradient) pair and hyper-parameters.

    Returns (kernel_size, stride, padding, dilation) as lists of nd ints.
    """
    _validate.tensor_pair(x, grad_out, "[B, channels, *spatial]")
    nd = x.dim() - 2
    if nd not in (1, 2, 3) or grad_out.dim() != x.dim():
        raise ValueError(
            f"gradnoise: `x` of shape {tuple(x.shape)} and `grad_out` of shape "
            f"{tuple(grad_out.shape)} must both be [B, channels, *spatial] with 1 to 3 "
            "spatial dims")
    kernel_size, stride = _as_list("kernel_size", kernel_size, nd), _as_list("stride", stride, nd)
    padding, dilation = _as_list("padding", padding, nd), _as_list("dilation", dilation, nd)
    if min(kernel_size + stride + dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"gradnoise: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
            f"kernel_size={kernel_size} stride={stride} padding={padding} dilation={dilation}")
    if not is_int(groups) or groups < 1 or \
            x.shape[1] % groups or grad_out.shape[1] % groups:
        raise ValueError(
            f"gradnoise: `groups` = {groups!r} must divide the input channels ({x.shape[1]}) "
            f"and the output channels ({grad_out.shape[1]})")
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"gradnoise: `x` has batch {x.shape[0]} but `grad_out` has "
                         f"{grad_out.shape[0]}")
    for k in range(nd):
        span = dilation[k] * (kernel_size[k] - 1) + 1
        size = x.shape[2 + k] + 2 * padding[k]
        want = (size - span) // stride[k] + 1 if size >= span else 0
        if grad_out.shape[2 + k] != want:
            raise ValueError(
                f"gradnoise: `grad_out` of shape {tuple(grad_out.shape)} does not match the "
                f"convolution of `x` of shape {tuple(x.shape)} (spatial dim {k} should be "
                f"{want} for kernel_size={kernel_size} stride={stride} padding={padding} "
                f"dilation={dilation})")
    return kernel_size, stride, padding, dilation


def conv_patches(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int):
    """[B, C, *S] -> [B, G, L, C/G · prod(k)]: the patch of each output position,
    ordered as the weight's (C/G, *k), zeros in the padding."""
    nd = len(kernel_size)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for i in range(nd):
        k, dil, st = kernel_size[i], dilation[i], stride[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, st)[..., ::dil]
    B, C = x.shape[:2]
    L = 1
    for s in x.shape[2:2 + nd]:
        L *= s
    # [B, C, *L, *k] -> [B, *L, C, *k] -> [B, G, L, C/G·k]
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    k = 1
    for s in kernel_size:
        k *= s
    return x.reshape(B, L, groups, C // groups * k).transpose(1, 2)


def grouped_grad_out(grad_out: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C_out, *S_out] -> [B, G, L, C_out/G]."""
    B, C_out = grad_out.shape[:2]
    L = 1
    for s in grad_out.shape[2:]:
        L *= s
    return grad_out.reshape(B, groups, C_out // groups, L).transpose(2, 3)


def _grouped_problems(x, grad_out, kernel_size, stride, padding, dilation, groups):
    """X [B, G, L, C/G·k] and dY [B, G, L, C_out/G]."""
    return (conv_patches(x, kernel_size, stride, padding, dilation, groups),
            grouped_grad_out(grad_out, groups))


def conv_weight_grad_and_sq_norms_ref(x, grad_out, kernel_size, stride=1, padding=0, dilation=1,
                                      groups=1, with_bias=False):
    """Pure-PyTorch twin: per-sample gradients formed group by group, in the
    accumulation dtype."""
    kernel_size, stride, padding, dilation = check_conv_args(
        x, grad_out, kernel_size, stride, padding, dilation, groups)
    acc = accumulation_dtype(x.dtype)
    X, G = _grouped_problems(x.to(acc), grad_out.to(acc), kernel_size, stride, padding,
                             dilation, groups)
    per_sample = torch.einsum("bglp,bgld->bgpd", G, X)  # [B, G, C_out/G, C/G·k]
    norms = per_sample.square().sum((1, 2, 3))
    C_out = grad_out.shape[1]
    weight_shape = (C_out, x.shape[1] // groups, *kernel_size)
    grad_weight = per_sample.sum(0).reshape(weight_shape).to(x.dtype)
    grad_bias = None
    if with_bias:
        per_sample_bias = grad_out.to(acc).flatten(2).sum(2)
        norms = norms + per_sample_bias.square().sum(1)
        grad_bias = per_sample_bias.sum(0).to(x.dtype)
    return grad_weight, grad_bias, norms


def conv_sq_norms_ref(x, grad_out, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                      with_bias=False):
    return conv_weight_grad_and_sq_norms_ref(x, grad_out, kernel_size, stride, padding,
                                             dilation, groups, with_bias)[2]


def _by_linear_op(x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias,
                  backend, with_weight_grad):
    """Unfolded patches through the backend's fused Linear op, group by group."""
    X, G = _grouped_problems(x, grad_out, kernel_size, stride, padding, dilation, groups)
    norms, grads = 0, []
    for k in range(groups):
        if with_weight_grad:
            # the backend's own op: this pass is one side of the convolution's
            # choice (gradnoise.ops.fusion), not a Linear layer's to choose again
            gw, _, n = backend_weight_grad_and_sq_norms(backend, X[:, k], G[:, k], False, "auto")
            grads.append(gw)
        else:
            n = linear_sq_norms(X[:, k], G[:, k], backend=backend)
        norms = norms + n
    grad_weight = grad_bias = None
    if with_weight_grad:
        grad_weight = torch.cat(grads).reshape(grad_out.shape[1], x.shape[1] // groups,
                                              *kernel_size)
    if with_bias:
        per_sample_bias = grad_out.flatten(2).sum(2, dtype=accumulation_dtype(x.dtype))
        norms = norms + per_sample_bias.square().sum(1)
        grad_bias = per_sample_bias.sum(0).to(x.dtype)
    return grad_weight, grad_bias, norms


def conv_weight_grad_and_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, kernel_size,
                                  stride=1, padding=0, dilation=1, groups: int = 1,
                                  with_bias: bool = False, backend: str | None = None):
    """The weight gradient and the per-sample norms of a convolution, in one
    pass where it was measured faster than torch's weight gradient with the
    norms-only op beside it (gradnoise.ops.fusion).

    x [B, C, *S] is the layer's input, grad_out [B, C_out, *S_out] its output
    gradient; padding is symmetric zero padding (pad other modes beforehand).
    Returns (grad_weight [C_out, C/G, *k], grad_bias [C_out] or None,
    sq_norms [B]); gradients in the input dtype, norms in float32 (float64
    for float64 input).
    """
    kernel_size, stride, padding, dilation = check_conv_args(
        x, grad_out, kernel_size, stride, padding, dilation, groups)
    be = resolve_backend(x.device, backend, "conv")
    if be == "reference":
        return conv_weight_grad_and_sq_norms_ref(x, grad_out, kernel_size, stride, padding,
                                                 dilation, groups, with_bias)
    geometry = (kernel_size, stride, padding, dilation, groups)

    def fused():
        return _backend_conv_grads_and_sq_norms(be, x, grad_out, *geometry, with_bias)

    def separate():
        return _vendor_conv_grad_and_sq_norms(be, x, grad_out, *geometry, with_bias)

    B, C, C_out = x.shape[0], x.shape[1], grad_out.shape[1]
    positions = math.prod(grad_out.shape[2:])
    d = C // groups * math.prod(kernel_size)
    layout = "channels_last" if _channels_last(x) else "contiguous"
    path = fusion.weight_grad_path(be, x, B, positions, d, C_out // groups, with_bias, fused,
                                   separate, op=f"conv{geometry}-{layout}")
    return fused() if path == "fused" else separate()


def _backend_conv_grads_and_sq_norms(be, x, grad_out, kernel_size, stride, padding, dilation,
                                     groups, with_bias):
    """The backend's own pass for the weight gradient and the norms."""
    if be == "cpu":
        gw, gb, n = torch.ops.gradnoise.conv_weight_grad_and_sq_norms(
            x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias)
        return gw, (gb if with_bias else None), n
    return _by_linear_op(x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias,
                         be, with_weight_grad=True)


def _vendor_conv_grad_and_sq_norms(be, x, grad_out, kernel_size, stride, padding, dilation,
                                   groups, with_bias):
    """torch's convolution weight gradient (what autograd's backward runs: cuDNN,
    oneDNN) and the backend's norms-only op beside it."""
    norms = conv_sq_norms(x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias,
                          backend=be)
    # The weight's values are not read for its gradient, only its shape and
    # layout (a stride-0 stand-in would be copied whole by oneDNN).
    weight = torch.empty((grad_out.shape[1], x.shape[1] // groups, *kernel_size),
                         dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last if _channels_last(x) else
                         torch.contiguous_format)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, x, weight, [grad_out.shape[1]] if with_bias else None, stride, padding,
        dilation, False, [0] * len(kernel_size), groups, [False, True, with_bias])
    return grad_weight, (grad_bias if with_bias else None), norms


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def conv_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride=1, padding=0,
                  dilation=1, groups: int = 1, with_bias: bool = False,
                  backend: str | None = None) -> torch.Tensor:
    """Per-sample squared gradient norms of a convolution, without the gradients
    (see :func:`conv_weight_grad_and_sq_norms`)."""
    kernel_size, stride, padding, dilation = check_conv_args(
        x, grad_out, kernel_size, stride, padding, dilation, groups)
    be = resolve_backend(x.device, backend, "conv")
    if be == "reference":
        return conv_sq_norms_ref(x, grad_out, kernel_size, stride, padding, dilation, groups,
                                 with_bias)
    if be == "cpu":
        return torch.ops.gradnoise.conv_sq_norms(x, grad_out, kernel_size, stride, padding,
                                                 dilation, groups, with_bias)
    return _by_linear_op(x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias,
                         be, with_weight_grad=False)[2]


def register_fakes() -> None:
    """Shapes of the compiled convolution ops for fake tensors."""
    @torch.library.register_fake("gradnoise::conv_sq_norms")
    def _conv_sq_norms_fake(x, grad_out, kernel_size, stride, padding, dilation, groups,
                            with_bias=False):
        check_conv_args(x, grad_out, kernel_size, stride, padding, dilation, groups)
        return x.new_empty((x.shape[0],), dtype=_validate.accumulation_dtype(x.dtype))

    @torch.library.register_fake("gradnoise::conv_weight_grad_and_sq_norms")
    def _conv_weight_grad_and_sq_norms_fake(x, grad_out, kernel_size, stride, padding, dilation,
                                            groups, with_bias=False):
        check_conv_args(x, grad_out, kernel_size, stride, padding, dilation, groups)
        grad_weight = x.new_empty((grad_out.shape[1], x.shape[1] // groups, *kernel_size))
        grad_bias = x.new_empty((grad_out.shape[1],) if with_bias else (0,))
        norms = x.new_empty((x.shape[0],), dtype=_validate.accumulation_dtype(x.dtype))
        return grad_weight, grad_bias, norms
