"""nn.MultiheadAttention: its forward is one fused functional that uses the
in-projection and out_proj parameters directly (out_proj.forward never runs),
so one rule measures all of them. Per-sample gradients come from torch.func
over the recorded call, exactly; norms of out_proj's parameters are reported
under the 'out_proj' child, as for any module that owns parameters.
"""
from __future__ import annotations

from torch import nn

from .base import register_rule
from .generic import GenericRule


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(GenericRule):
    claims_children = ("out_proj",)

    def check(self, module, name):
        if not module.batch_first:
            raise ValueError(
                f"GradNoiseTracker: MultiheadAttention '{name}' has batch_first=False, so its "
                "inputs are [T, B, E] and dim 0 is not the batch. Build it with batch_first=True.")

    def sq_norms(self, module, calls, params):
        B = calls[0].args[0].shape[0]
        grads = self.per_sample_grads(module, calls, params, slice(0, B))
        out = {}
        for name, g in grads.items():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            sq = g.flatten(1).square().sum(1)
            out[owner] = out[owner] + sq if owner in out else sq
        return out
