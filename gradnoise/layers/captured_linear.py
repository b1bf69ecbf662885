"""A captured module's linear use of its own weight, run through the fused
kernel (docs/design.md §6).

A module without a rule whose forward calls `F.linear(x, W, b)`,
`torch.addmm(b, x, W)` or `x @ W` on a batch with several positions per
sample (GPT-2's Conv1D: `addmm` on the batch viewed as rows) would otherwise
get its norms from a second pass beside autograd's weight-gradient GEMM (the
ghost Gram matrices: 0.6–1× the GEMM at T = 128). Intercepted by
layers.watch before it runs, the call goes through `_CapturedLinear`
instead: the forward is the call itself (the same output, bit for bit), and
the backward computes the weight gradient Σ_i G_i and the per-sample norms
‖G_i‖² (+ ‖Σ_t dY_i,t‖² with the bias) in one pass of
`ops.linear_weight_grad_and_sq_norms`, as the fused backward of nn.Linear
does (layers.fused_backward).

The backward asks the tracker whether the use is its parameters' only use
in the step (known only once the forward is over); if not, or if the
module fell back, it computes autograd's gradients and hands the output
gradient on for the end of backward, as a hooked use does. A backward with
create_graph=True gets differentiable gradients from a re-run of the call
and is not measured.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import ops
from . import batching
from .fused_backward import differentiable_grads

_T = torch.Tensor
#: calls whose linear uses are intercepted: F.linear (W [p, d]) and the
#: matmul family (W [d, p])
INTERCEPTED = {F.linear, torch.addmm, torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm}


def intercept(capture, func, args, kwargs):
    """`func(*args, **kwargs)` through `_CapturedLinear` when it is a linear
    use of one of `capture`'s parameters on a batch with several positions
    per sample; None to run and observe it as usual."""
    if capture.on_fused is None or capture.unsupported is not None or not torch.is_grad_enabled():
        return None
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        # Saved-tensor hooks (activation checkpointing, offloading) expect the
        # tensors the op itself saves, in its order: the call runs as it is.
        return None
    if func is F.linear:
        if len(args) + len(kwargs) > 3 or set(kwargs) - {"input", "weight", "bias"}:
            return None
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        transposed = False
    elif func is torch.addmm:
        if len(args) != 3 or kwargs:
            return None          # (beta, alpha or out=: as usual)
        b, x, w = args
        transposed = True
    else:
        if len(args) != 2 or kwargs:
            return None
        (x, w), b = args, None
        transposed = True
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.requires_grad and capture._param(w) is not None and capture._param(x) is None
            and x.is_floating_point() and x.dim() >= 2):
        return None
    p = w.shape[0] if not transposed else w.shape[1]
    if b is not None and not (isinstance(b, torch.Tensor) and b.shape == (p,)
                              and (capture._param(b) is not None or not b.requires_grad)):
        return None
    B = capture.B
    kind = batching.layout(x, B)
    if not ((kind == batching.BATCH and x.dim() >= 3) or (kind == batching.ROWS and x.dim() == 2)):
        return None      # (one position per sample: the norms from dY alone cost next to nothing)
    if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        return None
    operands = {"weight": w}
    if b is not None and capture._param(b) is not None:
        operands["bias"] = b
    use = capture.record("linear" if not transposed else "matmul",
                         batching.split_rows(x, B) if kind == batching.ROWS else x, operands)
    info = (func, args, kwargs, transposed, capture, use, B)
    return _CapturedLinear.apply(x, w, b, info)


class _CapturedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, info):
        func, args, kwargs, *_ = info
        out = func(*args, **kwargs)
        ctx.save_for_backward(x, weight, bias)
        ctx.info = info
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if out._base is not None:
            # (as in LinearRule.forward: a view could not be modified in place)
            out = torch.ops.aten._unsafe_view(out, out.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        func, args, kwargs, transposed, capture, use, B = ctx.info
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        measure = capture.on_fused(capture, use)
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, x, weight, bias, grad_out) + (None,)
        dtype = grad_out.dtype
        xc = x if x.dtype == dtype else x.to(dtype)
        wc = weight if weight.dtype == dtype else weight.to(dtype)
        p = grad_out.shape[-1]
        g2 = grad_out.reshape(-1, p)
        grad_x = None
        if need_x:
            grad_x = (g2 @ (wc.t() if transposed else wc)).reshape(x.shape)
        with_bias = "bias" in use.params
        grad_w = grad_b = None
        if measure is not None:
            g3 = grad_out.reshape(B, -1, p)
            grad_w, grad_b, norms = weight_grad_and_sq_norms(
                xc.reshape(B, -1, x.shape[-1]), g3, with_bias, transposed)
            measure(norms)
        else:
            if need_w:
                x2 = xc.reshape(-1, x.shape[-1])
                grad_w = x2.t() @ g2 if transposed else g2.t() @ x2
            if need_b:
                grad_b = g2.sum(0)
            if capture.armed:
                rows = grad_out.shape[0] != B
                g = batching.split_rows(grad_out, B) if rows else grad_out
                capture.on_grad(capture, use, g)
        grad_w = grad_w.to(weight.dtype) if need_w and grad_w.dtype != weight.dtype else grad_w
        if need_b and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return (grad_x if need_x else None, grad_w if need_w else None,
                grad_b if need_b else None, None)


def weight_grad_and_sq_norms(x3: torch.Tensor, g3: torch.Tensor, with_bias: bool,
                             transposed: bool):
    """(Σ_i G_i as W is laid out — [p, d], or [d, p] when `transposed` —,
    Σ_i,t dY_i,t or None, per-sample ‖G_i‖² (+ ‖Σ_t dY_i,t‖²)), from x3
    [B, T, d] and g3 [B, T, p]. ‖G_i‖ = ‖G_iᵀ‖, so the kernel runs with its
    output dimension the larger of d and p, which it handles faster."""
    d, p = x3.shape[-1], g3.shape[-1]
    if p >= d:
        gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x3, g3, with_bias=with_bias)
        return (gw.t().contiguous() if transposed else gw), gb, norms
    gw, _, norms = ops.linear_weight_grad_and_sq_norms(g3, x3, with_bias=False)
    gb = None
    if with_bias:
        per_sample = g3.sum(1, dtype=torch.float32)
        gb = per_sample.sum(0).to(g3.dtype)
        norms = norms + per_sample.square().sum(1).to(norms.dtype)
    return (gw if transposed else gw.t().contiguous()), gb, norms


def _differentiable_backward(ctx, x, weight, bias, grad_out):
    func = ctx.info[0]
    if func is F.linear:
        forward = F.linear
    elif func is torch.addmm:
        forward = lambda x, w, b: torch.addmm(b, x, w)  # noqa: E731
    else:
        forward = lambda x, w, b: torch.matmul(x, w)  # noqa: E731
    return differentiable_grads(forward, (x, weight, bias), ctx.needs_input_grad[:3], grad_out,
                                ctx.autocast)
