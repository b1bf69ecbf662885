"""nn.Conv1d/2d/3d: per-sample gradients G_i,g = dY_i,gᵀ X_i,g over the
patches X_i,g of each group g (Rochette et al. 2019; gradnoise.ops.conv).

With zero padding that is the same on both sides of every dim (any stride,
dilation, groups; "same" when it is symmetric), a convolution called once
per step has its backward replaced like nn.Linear's: the fused op gives the
weight gradient and the per-sample norms in one pass, and the input
gradient is autograd's own. Other padding modes ("reflect", "replicate",
"circular", asymmetric "same") pad the recorded input the way the module
does and measure the norms after backward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..ops.conv import conv_patches, grouped_grad_out
from .base import register_rule
from .calls import received_gradient
from .fused_backward import FusedBackwardRule


def _symmetric_zero_padding(module: nn.modules.conv._ConvNd) -> list[int] | None:
    """The module's padding as one int per dim, or None if it is not zero
    padding equal on both sides."""
    if module.padding_mode != "zeros":
        return None
    if isinstance(module.padding, str):
        pairs = module._reversed_padding_repeated_twice
        before, after = pairs[0::2], pairs[1::2]
        if list(before) != list(after):
            return None
        return list(reversed(before))
    return list(module.padding)


def _padded_input(module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(x, padding) such that a zero-padded convolution with `padding` is the module's."""
    padding = _symmetric_zero_padding(module)
    if padding is not None:
        return x, padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return (F.pad(x, module._reversed_padding_repeated_twice, mode=mode),
            [0] * len(module.kernel_size))


def _geometry(module) -> tuple[list[int], list[int], list[int], int]:
    return list(module.kernel_size), list(module.stride), list(module.dilation), module.groups


def _recorded(module, calls):
    """[(padded x, padding, dY)] over the calls that received a gradient."""
    out = []
    for x, g in received_gradient(calls):
        x, padding = _padded_input(module, x.to(g.dtype))
        out.append((x, padding, g))
    return out


def _bias_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ_positions dY per sample [B, C_out], in float32."""
    return g.flatten(2).sum(2, dtype=torch.float32)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(FusedBackwardRule):
    def supports_fused_backward(self, module):
        return _symmetric_zero_padding(module) is not None

    def sq_norms(self, module, calls, params):
        recorded = _recorded(module, calls)
        kernel_size, stride, dilation, groups = _geometry(module)
        with_bias = "bias" in params
        if len(recorded) == 1:
            x, padding, g = recorded[0]
            if "weight" in params:
                return ops.conv_sq_norms(x, g, kernel_size, stride, padding, dilation, groups,
                                         with_bias=with_bias).float()
            return _bias_sum(g).square().sum(1)
        # Several calls: one Linear problem per group with the calls' positions
        # concatenated, so that each sample's gradient is summed over calls.
        norms = 0
        if "weight" in params:
            xs, gs = [], []
            for x, padding, g in recorded:
                xs.append(conv_patches(x, kernel_size, stride, padding, dilation, groups))
                gs.append(grouped_grad_out(g, groups))
            X, G = torch.cat(xs, 2), torch.cat(gs, 2)
            for k in range(groups):
                norms = norms + ops.linear_sq_norms(X[:, k], G[:, k]).float()
        if with_bias:
            norms = norms + sum(_bias_sum(g) for _, _, g in recorded).square().sum(1)
        return norms

    def per_sample_grads(self, module, calls, params, samples):
        kernel_size, stride, dilation, groups = _geometry(module)
        out = {}
        for x, padding, g in _recorded(module, calls):
            x, g = x[samples].float(), g[samples].float()
            b = x.shape[0]
            grads = {}
            if "weight" in params:
                X = conv_patches(x, kernel_size, stride, padding, dilation, groups)
                G = grouped_grad_out(g, groups)
                grads["weight"] = torch.einsum("bglp,bgld->bgpd", G, X).reshape(
                    b, *module.weight.shape)
            if "bias" in params:
                grads["bias"] = g.flatten(2).sum(2)
            for name, v in grads.items():
                out[name] = v if name not in out else out[name] + v
        return out

    def forward(self, module, x, weight, bias):
        return module._conv_forward(x, weight, bias), ()

    def _backward(self, module, x, weight, grad_out, padding, mask):
        """torch's convolution backward for the outputs in `mask` (input, weight, bias)."""
        dt = grad_out.dtype
        kernel_size, stride, dilation, groups = _geometry(module)
        return torch.ops.aten.convolution_backward(
            grad_out, x.to(dt), weight.to(dt), [weight.shape[0]], stride, padding, dilation,
            False, [0] * len(kernel_size), groups, mask)

    def fused_backward(self, module, x, weight, saved, grad_out, params, need_input_grad):
        padding = _symmetric_zero_padding(module)
        grad_x = None
        if need_input_grad:
            grad_x = self._backward(module, x, weight, grad_out, padding, [True, False, False])[0]
        x = x.to(grad_out.dtype)
        kernel_size, stride, dilation, groups = _geometry(module)
        with_bias = "bias" in params
        if "weight" in params:
            gw, gb, norms = ops.conv_weight_grad_and_sq_norms(
                x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias=with_bias)
            return grad_x, gw, gb, norms
        per_sample = _bias_sum(grad_out)
        return grad_x, None, per_sample.sum(0).to(grad_out.dtype), per_sample.square().sum(1)

    def plain_backward(self, module, x, weight, saved, grad_out, need_input_grad, need_weight,
                       need_bias):
        return tuple(self._backward(module, x, weight, grad_out, _symmetric_zero_padding(module),
                                    [need_input_grad, need_weight, need_bias]))
