"""Rules whose module's backward the tracker replaces by one fused op.

For a layer y = f(x; W, b) whose per-sample gradients are a GEMM over the
positions of each sample (nn.Linear, convolutions), the weight gradient
Σ_i G_i and the per-sample norms ‖G_i‖² come out of one pass of the fused
kernel (DESIGN.md section 1), so measuring the norms costs the kernel's
epilogue instead of a second pass over (x, dY). The module's forward is
routed through `_FusedBackwardFunction`, whose backward computes the input
gradient as autograd would and asks the tracker (the "sink") for the
parameter gradients; the sink runs the rule's fused op when the call is
the module's only one in the step, and a plain weight-gradient otherwise.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from .base import NormRule


class FusedBackwardRule(NormRule):
    """A NormRule that can also stand in for its module's weight-gradient."""

    replaces_backward = True

    def supports_fused_backward(self, module: nn.Module) -> bool:
        """Whether this module's configuration can use the fused backward."""
        return True

    @abstractmethod
    def forward(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """The module's forward, bit for bit."""

    @abstractmethod
    def input_grad(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                   grad_out: torch.Tensor) -> torch.Tensor:
        """∂L/∂x as the module's own backward computes it."""

    @abstractmethod
    def fused_backward(self, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
                       params: list[str]):
        """(grad_weight or None, grad_bias or None, float32 per-sample sq norms [B])
        of the parameters in `params`, in one pass."""

    @abstractmethod
    def param_grads(self, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
                    need_weight: bool, need_bias: bool):
        """(grad_weight or None, grad_bias or None) without norms."""


class _FusedBackwardFunction(torch.autograd.Function):
    """The module's forward; backward hands (x, dY) to the sink, which returns
    the weight and bias gradients (from the fused op, with the norms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, rule, sink):
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.rule, ctx.sink, ctx.has_bias = module, rule, sink, bias is not None
        return rule.forward(module, x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.rule.input_grad(ctx.module, x, weight, grad_out)
        grad_w, grad_b = ctx.sink.module_backward(
            ctx.module, x, grad_out, ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.module.bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def install_tracked_forward(module: nn.Module, rule: FusedBackwardRule, sink) -> None:
    """Route the module's training-step forward through _FusedBackwardFunction.

    `sink.wants(module, x)` says whether this call is measured;
    `sink.module_backward(module, x, grad_out, need_weight, need_bias)`
    computes the parameter gradients. Outputs are those of the module.
    """
    plain_forward = type(module).forward

    def forward(x):
        if sink.wants(module, x):
            return _FusedBackwardFunction.apply(x, module.weight, module.bias, module, rule, sink)
        return plain_forward(module, x)
    module.forward = forward


def remove_tracked_forward(module: nn.Module) -> None:
    if "forward" in module.__dict__:
        del module.forward
