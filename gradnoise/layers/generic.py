"""Exact fallback for any module with trainable parameters of its own and no
rule: per-sample gradients of those parameters by torch.func (vmap of grad,
layers.torch_func) over the module's recorded inputs, where sample i's loss is
Σ_outputs ⟨f(θ; x_i), dY_i⟩, whose gradient is exactly sample i's share.
Costs a per-sample re-run of the module's forward and backward.
"""
from __future__ import annotations

from torch import nn

from .base import NormRule
from .calls import batch_size_of


def _refuse_random(module, name):
    """A module whose forward is re-run per sample must not draw random
    numbers: the re-run could not reproduce the step's dropout masks."""
    for sub_name, sub in module.named_modules():
        p = getattr(sub, "dropout", None) if isinstance(sub, nn.MultiheadAttention) else (
            sub.p if isinstance(sub, nn.modules.dropout._DropoutNd) else None)
        if p and sub.training:
            where = f"'{name}.{sub_name}'" if sub_name else f"'{name}'"
            raise ValueError(
                f"GradNoiseTracker: {where} ({type(sub).__name__}) has dropout {p} inside a module "
                f"measured by re-running its forward per sample ('{name}', "
                f"{type(module).__name__}), which cannot reproduce the step's dropout masks. Set "
                "that dropout to 0 (dropout in other modules is fine), or leave the module out "
                "with layers= or unsupported='skip'.")


class GenericRule(NormRule):
    """Any module: per-sample gradients by torch.func (NormRule's default
    `per_sample_grads`), squared."""

    def check(self, module, name):
        _refuse_random(module, name)

    def sq_norms(self, module, calls, params):
        B = batch_size_of(calls)
        g = self.per_sample_grads(module, calls, params, slice(0, B))
        return sum(v.flatten(1).square().sum(1) for v in g.values())
