"""LayerNorm, RMSNorm, GroupNorm and eval-mode BatchNorm: per-sample
gradients of the affine parameters (Gray et al. 2024),
    γ-grad_i = Σ_t dY_i,t ⊙ x̂_i,t,    β-grad_i = Σ_t dY_i,t,
with x̂ the normalised input. The fused ops (gradnoise.ops.layer_norm_sq_norms,
group_norm_sq_norms) recompute x̂ from x and reduce in one pass over x and dY;
GroupNorm's backward is replaced by one that yields the norms from the sums
it computes anyway (gradnoise.ops.group_norm_backward_and_sq_norms).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.norm_layers import normalised_rows
from .base import NormRule, register_rule
from .calls import received_gradient
from .fused_backward import FusedBackwardRule


def _rms_eps(module: nn.RMSNorm, x: torch.Tensor) -> float:
    # torch's RMSNorm with eps=None uses float32's epsilon for half inputs too
    return module.eps if module.eps is not None else ops.norm_layers.rms_norm_default_eps(x.dtype)


def _normalized_numel(module) -> int:
    n = 1
    for s in module.normalized_shape:
        n *= s
    return n


class _RowNormRule(FusedBackwardRule):
    """LayerNorm and RMSNorm: statistics per row of the normalised dims, so
    several calls concatenate along the rows. A call that is the module's
    only one in the step has its whole backward run by
    gradnoise.ops.layer_norm_backward_and_sq_norms, which reads each row
    once for the input gradient, the γ/β gradients and the norms."""
    is_norm_layer = True
    rowwise = True
    rms = False

    def forward(self, module, x, weight, bias):
        if self.rms:
            return nn.functional.rms_norm(x, module.normalized_shape, weight, module.eps), ()
        return nn.functional.layer_norm(x, module.normalized_shape, weight, bias, module.eps), ()

    def fused_backward(self, module, x, weight, saved, grad_out, params, need_input_grad):
        gx, gw, gb, norms = ops.layer_norm_backward_and_sq_norms(
            x, grad_out.to(x.dtype), _normalized_numel(module), self._eps(module, x), self.rms,
            weight, need_input_grad, "weight" in params, "bias" in params)
        if gw is not None:
            gw = gw.view(module.weight.shape)
        if gb is not None:
            gb = gb.view(module.bias.shape)
        return gx, gw, gb, norms

    def plain_backward(self, module, x, weight, saved, grad_out, need_input_grad, need_weight,
                       need_bias):
        bias = module.bias if not self.rms else None
        inputs = [x.detach().requires_grad_(need_input_grad),
                  None if weight is None else weight.detach().requires_grad_(need_weight),
                  None if bias is None else bias.detach().requires_grad_(need_bias)]
        with torch.enable_grad():
            out, _ = self.forward(module, *inputs)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)

    def _eps(self, module, x):
        return module.eps

    def _rows(self, module, calls):
        C = _normalized_numel(module)
        xs, gs = zip(*[(x.reshape(x.shape[0], -1, C), g.reshape(g.shape[0], -1, C))
                       for x, g in received_gradient(calls)])
        return torch.cat(xs, 1), torch.cat(gs, 1)

    def sq_norms(self, module, calls, params):
        x, g = self._rows(module, calls)
        return ops.layer_norm_sq_norms(x.to(g.dtype), g, x.shape[-1], self._eps(module, x), self.rms,
                                       "weight" in params, "bias" in params)

    def per_sample_grads(self, module, calls, params, samples):
        x, g = self._rows(module, calls)
        eps = self._eps(module, x)
        x, g = x[samples].double(), g[samples].double()
        xhat = normalised_rows(x, eps, self.rms)
        out = {}
        if "weight" in params:
            out["weight"] = (g * xhat).sum(1).float().view(-1, *module.weight.shape)
        if "bias" in params:
            out["bias"] = g.sum(1).float().view(-1, *module.bias.shape)
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(_RowNormRule):
    pass


@register_rule(nn.RMSNorm)
class RMSNormRule(_RowNormRule):
    rms = True

    def _eps(self, module, x):
        return _rms_eps(module, x)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout torch's group_norm keeps (channels-last stays channels-last)."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _group_norm_dims(module: nn.GroupNorm, x: torch.Tensor) -> tuple[int, int, int]:
    B, C = x.shape[0], x.shape[1]
    S = 1
    for size in x.shape[2:]:
        S *= size
    return B, C, S


@register_rule(nn.GroupNorm)
class GroupNormRule(FusedBackwardRule):
    """Statistics per (sample, group) of each call: several calls add
    per-sample gradient vectors (they cannot be concatenated). A call that
    is the module's only one in the step has its whole backward run by
    gradnoise.ops.group_norm_backward_and_sq_norms, whose passes over
    (x, dY) give the norms along with the gradients."""
    is_norm_layer = True

    def forward(self, module, x, weight, bias):
        B, C, S = _group_norm_dims(module, x)
        out, mean, rstd = torch.ops.aten.native_group_norm(
            x.contiguous(memory_format=_memory_format(x)), weight, bias, B, C, S,
            module.num_groups, module.eps)
        return out, (mean, rstd)

    def fused_backward(self, module, x, weight, saved, grad_out, params, need_input_grad):
        mean, rstd = saved
        gx, gw, gb, norms = ops.group_norm_backward_and_sq_norms(
            x, grad_out.to(x.dtype), mean, rstd, weight, module.num_groups, module.eps,
            need_input_grad, "weight" in params, "bias" in params)
        return gx, gw, gb, norms

    def plain_backward(self, module, x, weight, saved, grad_out, need_input_grad, need_weight,
                       need_bias):
        mean, rstd = saved
        B, C, S = _group_norm_dims(module, x)
        return tuple(torch.ops.aten.native_group_norm_backward(
            grad_out.to(x.dtype), x, mean, rstd, weight, B, C, S, module.num_groups,
            [need_input_grad, need_weight, need_bias]))

    def sq_norms(self, module, calls, params):
        recorded = received_gradient(calls)
        if len(recorded) == 1:
            x, g = recorded[0]
            return ops.group_norm_sq_norms(x.to(g.dtype), g, module.num_groups, module.eps,
                                           "weight" in params, "bias" in params)
        B = recorded[0][0].shape[0]
        grads = self.per_sample_grads(module, calls, params, slice(0, B))
        return sum(v.square().sum(1) for v in grads.values())

    def per_sample_grads(self, module, calls, params, samples):
        out = {}
        for x, g in received_gradient(calls):
            x, g = x[samples].double(), g[samples].double()
            b, C = x.shape[:2]
            xhat = normalised_rows(x.reshape(b, module.num_groups, -1), module.eps).reshape(b, C, -1)
            g = g.reshape(b, C, -1)
            parts = {}
            if "weight" in params:
                parts["weight"] = (g * xhat).sum(-1).float()
            if "bias" in params:
                parts["bias"] = g.sum(-1).float()
            out = parts if not out else {k: out[k] + parts[k] for k in out}
        return out


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class EvalBatchNormRule(NormRule):
    """BatchNorm in eval mode normalises each sample with the running
    statistics, so its per-sample gradients exist (train mode is refused by
    the tracker). x̂ = (x − running_mean) / sqrt(running_var + eps)."""

    def check(self, module, name):
        if not module.track_running_stats:
            raise ValueError(
                f"GradNoiseTracker: BatchNorm '{name}' does not track running statistics, so "
                "even in eval mode it normalises with the statistics of the batch and mixes "
                "samples. Use GroupNorm/LayerNorm or the micro-batch noise-scale estimator.")

    def per_sample_grads(self, module, calls, params, samples):
        out = {}
        for x, g in received_gradient(calls):
            x, g = x[samples].double(), g[samples].double()
            b, C = x.shape[:2]
            shape = (1, C) + (1,) * (x.dim() - 2)
            xhat = (x - module.running_mean.double().view(shape)) * torch.rsqrt(
                module.running_var.double().view(shape) + module.eps)
            parts = {}
            if "weight" in params:
                parts["weight"] = (g * xhat).reshape(b, C, -1).sum(-1).float()
            if "bias" in params:
                parts["bias"] = g.reshape(b, C, -1).sum(-1).float()
            out = parts if not out else {k: out[k] + parts[k] for k in out}
        return out

    def sq_norms(self, module, calls, params):
        B = calls[0].args[0].shape[0]
        return sum(v.square().sum(1) for v in self.per_sample_grads(module, calls, params,
                                                                     slice(0, B)).values())
