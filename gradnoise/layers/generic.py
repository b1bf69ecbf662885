"""Exact fallback for any module with trainable parameters of its own and no
rule: per-sample gradients of those parameters by torch.func (vmap of grad)
over the module's recorded inputs, where sample i's loss is
Σ_outputs ⟨f(θ; x_i), dY_i⟩, whose gradient is exactly sample i's share.
Costs a per-sample re-run of the module's forward and backward.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from .base import NormRule


def _batched(value, B):
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == B


def per_sample_grads_by_torch_func(module, calls, params, samples):
    """{param: [b, *shape]}: per-sample gradients of `params` over the samples
    in `samples`, summed over the recorded calls."""
    total = None
    for c in calls:
        grads = _call_grads(module, c, params, samples)
        if grads is None:
            continue
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    return total


def _call_grads(module, call, params, samples):
    if all(g is None for g in call.grad_outputs):
        return None
    B = next(a for a in call.args if isinstance(a, torch.Tensor)).shape[0]
    own = {n: module.get_parameter(n).detach() for n in params}
    names = list(call.kwargs)
    args = [a[samples] if _batched(a, B) else a for a in call.args]
    kwargs = [call.kwargs[k][samples] if _batched(call.kwargs[k], B) else call.kwargs[k]
              for k in names]
    gouts = [g[samples] if g is not None else None for g in call.grad_outputs]
    in_args = tuple(0 if _batched(a, B) else None for a in call.args)
    in_kwargs = tuple(0 if _batched(call.kwargs[k], B) else None for k in names)
    in_gouts = tuple(0 if g is not None else None for g in gouts)

    def sample_loss(theta, a, kw, go):
        a = [x.unsqueeze(0) if d == 0 else x for x, d in zip(a, in_args)]
        kw = {k: (x.unsqueeze(0) if d == 0 else x) for k, x, d in zip(names, kw, in_kwargs)}
        out = functional_call(module, theta, tuple(a), kw)
        outs = _flat(out)
        loss = 0.0
        for k, g in zip(call.output_index, go):
            if g is not None:
                loss = loss + (outs[k].squeeze(0) * g).sum()
        return loss

    fn = vmap(grad(sample_loss), in_dims=(None, list(in_args), list(in_kwargs), list(in_gouts)))
    with torch.enable_grad():
        per_sample = fn(own, list(args), kwargs, gouts)
    return {k: v.float() for k, v in per_sample.items()}


class GenericRule(NormRule):
    """Any module: per-sample gradients by torch.func (NormRule's default
    `per_sample_grads`), squared."""

    def sq_norms(self, module, calls, params):
        B = next(a for a in calls[0].args if isinstance(a, torch.Tensor)).shape[0]
        g = self.per_sample_grads(module, calls, params, slice(0, B))
        return sum(v.flatten(1).square().sum(1) for v in g.values())


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []
