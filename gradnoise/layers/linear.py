"""nn.Linear: y = x Wᵀ + b, x [B, *, d], y [B, *, p].

Per-sample gradients G_i = dY_iᵀ X_i and Σ_t dY_i,t (docs/design.md §1).
When the layer runs once per step and its weight is not shared, its backward
is replaced (gradnoise.layers.fused_backward): the fused op computes the
weight gradient and the per-sample norms in one pass
(gradnoise.ops.linear_weight_grad_and_sq_norms), so that tracking costs 1/T
of the weight-gradient GEMM instead of a second pass. With 2-D input (T = 1)
the norms are ‖x_i‖²‖dy_i‖² (Goodfellow 2015), O(B(d + p)): autograd's
backward is kept and they come from the output gradient, in one op.
A layer called several times contributes G_i = Σ_calls dY_iᵀ X_i, which is
the same problem with the calls' positions concatenated along T.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import register_rule
from .calls import Call, received_gradient
from .fused_backward import FusedBackwardRule
from .tied import Factor


def _flat3(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def concat_calls(calls: list[Call]) -> tuple[torch.Tensor, torch.Tensor]:
    """X [B, ΣT, d] and dY [B, ΣT, p] over the calls that received a gradient."""
    xs, gs = [], []
    for x, g in received_gradient(calls):
        xs.append(_flat3(x).to(g.dtype))
        gs.append(_flat3(g))
    if len(xs) == 1:  # one call: no copy
        return xs[0], gs[0]
    return torch.cat(xs, 1), torch.cat(gs, 1)


@register_rule(nn.Linear)
class LinearRule(FusedBackwardRule):
    rowwise = True
    factorable = ("weight",)
    factor_kind = "dense"

    def factor(self, module, calls, param):
        x, g = concat_calls(calls)
        return Factor("dense", z=x, a=g)

    def sq_norms(self, module, calls, params):
        x, g = concat_calls(calls)
        with_bias = "bias" in params
        if "weight" in params:
            return ops.linear_sq_norms(x, g, with_bias=with_bias)
        return _bias_sq_norms(g) if with_bias else x.new_zeros(x.shape[0])

    def per_sample_grads(self, module, calls, params, samples):
        x, g = concat_calls(calls)
        x, g = x[samples].float(), g[samples].float()
        out = {}
        if "weight" in params:
            out["weight"] = torch.bmm(g.transpose(1, 2), x)
        if "bias" in params:
            out["bias"] = g.sum(1)
        return out

    def keeps_autograd_backward(self, module, x):
        return x.dim() == 2

    def forward(self, module, x, weight, bias):
        out = nn.functional.linear(x, weight, bias)
        if out._base is not None:
            # For 3-D input F.linear returns a view of its 2-D result, and an
            # autograd Function's output that is a view cannot be modified in
            # place (ReLU(inplace=True) after the layer would fail). Nothing
            # else refers to that result: the same storage, as a plain tensor.
            out = torch.ops.aten._unsafe_view(out, out.shape)
        return out, ()

    @staticmethod
    def _input_grad(x, weight, grad_out):
        return grad_out.matmul(weight if weight.dtype == grad_out.dtype else weight.to(grad_out.dtype))

    def fused_backward(self, module, x, weight, saved, grad_out, params, need_input_grad):
        # The weight gradient and norms first, while dY (just written by the
        # layer above's backward) is still in cache.
        xc = x if x.dtype == grad_out.dtype else x.to(grad_out.dtype)
        with_bias = "bias" in params
        if "weight" in params:
            gw, gb, norms = ops.linear_weight_grad_and_sq_norms(xc, grad_out, with_bias=with_bias)
        else:
            gw, gb = None, grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
            norms = _bias_sq_norms(_flat3(grad_out))
        grad_x = self._input_grad(x, weight, grad_out) if need_input_grad else None
        return grad_x, gw, gb, norms

    def plain_backward(self, module, x, weight, saved, grad_out, need_input_grad, need_weight,
                       need_bias):
        grad_x = self._input_grad(x, weight, grad_out) if need_input_grad else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gw = g2.T @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype) if need_weight else None
        gb = g2.sum(0) if need_bias else None
        return grad_x, gw, gb


def _bias_sq_norms(g3: torch.Tensor) -> torch.Tensor:
    """‖Σ_t dY_i,t‖² per sample, in float32."""
    return g3.sum(1, dtype=torch.float32).square().sum(1)
