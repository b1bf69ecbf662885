"""nn.MultiheadAttention: its forward is one fused functional that uses the
in-projection and out_proj parameters directly (out_proj.forward never runs),
so one rule measures all of them. Per-sample gradients come from torch.func
over the recorded call, exactly; norms of out_proj's parameters are reported
under the 'out_proj' child, as for any module that owns parameters.
"""
from __future__ import annotations

import inspect

from torch import nn

from .base import register_rule
from .calls import Call, batch_size_of
from .generic import GenericRule
from .torch_func import per_sample_grads_by_torch_func

_MHA_INPUTS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(GenericRule):
    claims_children = ("out_proj",)

    def check(self, module, name):
        if not module.batch_first:
            raise ValueError(
                f"GradNoiseTracker: MultiheadAttention '{name}' has batch_first=False, so its "
                "inputs are [T, B, E] and dim 0 is not the batch. Build it with batch_first=True.")
        super().check(module, name)

    def per_sample_grads(self, module, calls, params, samples):
        # Masks: a 2-D attn_mask [L, S] is shared by the samples whatever L
        # is; a 3-D one [B·heads, L, S] is per sample, in groups of heads.
        heads = module.num_heads
        prepared = []
        for c in calls:
            bound = dict(zip(_MHA_INPUTS, c.args))
            bound.update(c.kwargs)
            state = {_MHA_INPUTS[k] if isinstance(k, int) else k for k in c.model_state}
            positional = [k for k in ("query", "key", "value") if k in bound]
            args = tuple(bound.pop(k) for k in positional)
            shared = {j for j, k in enumerate(positional) if k in state}
            shared |= {k for k in bound if k in state}
            mask = bound.get("attn_mask")
            if mask is not None and mask.dim() == 2:
                shared.add("attn_mask")
            elif mask is not None and mask.dim() == 3:
                bound["attn_mask"] = mask.reshape(-1, heads, *mask.shape[1:])
            prepared.append(Call(args, bound, c.grad_outputs, c.output_index, frozenset(shared)))
        return per_sample_grads_by_torch_func(module, prepared, params, samples, _sample_mask)

    def sq_norms(self, module, calls, params):
        B = batch_size_of(calls)
        grads = self.per_sample_grads(module, calls, params, slice(0, B))
        out = {}
        for name, g in grads.items():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            sq = g.flatten(1).square().sum(1)
            out[owner] = out[owner] + sq if owner in out else sq
        return out


def _sample_mask(args, kwargs):
    """One sample's [1, heads, L, S] attention mask as the [heads, L, S] that
    MultiheadAttention takes for a batch of one."""
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dim() == 4:
        kwargs = {**kwargs, "attn_mask": mask.reshape(-1, *mask.shape[2:])}
    return args, kwargs
