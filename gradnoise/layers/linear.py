"""nn.Linear: y = x Wᵀ + b, x [B, *, d], y [B, *, p].

Per-sample gradients G_i = dY_iᵀ X_i and Σ_t dY_i,t (DESIGN.md section 1).
When the layer runs once per step and its weight is not shared, its backward
is replaced: the fused op computes the weight gradient and the per-sample
norms in one pass (gradnoise.ops.linear_weight_grad_and_sq_norms), so that
tracking costs 1/T of the weight-gradient GEMM instead of a second pass.
A layer called several times contributes G_i = Σ_calls dY_iᵀ X_i, which is
the same problem with the calls' positions concatenated along T.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import Call, NormRule, register_rule


def _flat3(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def concat_calls(calls: list[Call]) -> tuple[torch.Tensor, torch.Tensor]:
    """X [B, ΣT, d] and dY [B, ΣT, p] over the calls that received a gradient."""
    xs, gs = [], []
    for c in calls:
        if c.grad_outputs and c.grad_outputs[0] is not None:
            g = c.grad_outputs[0]
            xs.append(_flat3(c.args[0]).to(g.dtype))
            gs.append(_flat3(g))
    if len(xs) == 1:  # one call: no copy
        return xs[0], gs[0]
    return torch.cat(xs, 1), torch.cat(gs, 1)


@register_rule(nn.Linear)
class LinearRule(NormRule):
    replaces_backward = True

    def sq_norms(self, module, calls, params):
        x, g = concat_calls(calls)
        with_bias = "bias" in params
        if "weight" in params:
            return ops.linear_sq_norms(x, g, with_bias=with_bias)
        return g.sum(1, dtype=torch.float32).square().sum(1) if with_bias else x.new_zeros(x.shape[0])

    def per_sample_grads(self, module, calls, params, samples):
        x, g = concat_calls(calls)
        x, g = x[samples].float(), g[samples].float()
        out = {}
        if "weight" in params:
            out["weight"] = torch.bmm(g.transpose(1, 2), x)
        if "bias" in params:
            out["bias"] = g.sum(1)
        return out

    @staticmethod
    def fused_backward(module: nn.Linear, x: torch.Tensor, grad_out: torch.Tensor,
                       params: list[str]):
        """(grad_weight or None, grad_bias or None, per-sample sq norms [B]) in one pass."""
        x = x.to(grad_out.dtype)
        with_bias = "bias" in params
        if "weight" in params:
            gw, gb, norms = ops.linear_weight_grad_and_sq_norms(x, grad_out, with_bias=with_bias)
        else:
            gw, gb = None, grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
            norms = _flat3(grad_out).sum(1, dtype=torch.float32).square().sum(1)
        return gw, gb, norms.float()


class _TrackedLinearFunction(torch.autograd.Function):
    """F.linear whose backward hands (x, dY) to the tracker, which returns
    the weight and bias gradients (from the fused op, with the norms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, sink):
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.sink, ctx.has_bias = module, sink, bias is not None
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        grad_w, grad_b = ctx.sink.linear_backward(
            ctx.module, x, grad_out, ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def install_tracked_forward(module: nn.Linear, sink) -> None:
    """Route the module's training-step forward through _TrackedLinearFunction.

    `sink.wants(module)` says whether this call is measured; `sink.linear_backward`
    computes the parameter gradients. Outputs are those of nn.Linear.forward.
    """
    def forward(x):
        if sink.wants(module, x):
            return _TrackedLinearFunction.apply(x, module.weight, module.bias, module, sink)
        return nn.functional.linear(x, module.weight, module.bias)
    module.forward = forward


def remove_tracked_forward(module: nn.Linear) -> None:
    if "forward" in module.__dict__:
        del module.forward
