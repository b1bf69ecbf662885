"""Exact fallback for any module with trainable parameters of its own and no
rule: per-sample gradients of those parameters by torch.func (vmap of grad)
over the module's recorded inputs, where sample i's loss is
Σ_outputs ⟨f(θ; x_i), dY_i⟩, whose gradient is exactly sample i's share.
Costs a per-sample re-run of the module's forward and backward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .base import NormRule, batch_size_of


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


def _batched(value, B, shared):
    """Whether an input is per-sample (dim 0 = the batch): a tensor with B
    rows that is not one of the model's parameters or buffers (`shared`)."""
    return (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == B
            and not shared)


def per_sample_grads_by_torch_func(module, calls, params, samples, adapt=None):
    """{param: [b, *shape]}: per-sample gradients of `params` over the samples
    in `samples`, summed over the recorded calls. `adapt(args, kwargs)`, if
    given, turns one sample's inputs (batch dim of size 1) into the call the
    module takes."""
    total = None
    for c in calls:
        grads = _call_grads(module, c, params, samples, adapt)
        if grads is None:
            continue
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    return total


def _call_grads(module, call, params, samples, adapt=None):
    if all(g is None for g in call.grad_outputs):
        return None
    B = batch_size_of([call])
    for k, g in zip(call.output_index, call.grad_outputs):
        if g is not None and (g.dim() == 0 or g.shape[0] != B):
            raise ValueError(
                f"output {k} of the call has shape {tuple(g.shape)}, whose dim 0 is not the batch "
                f"(B = {B}, from its input); per-sample gradients need the batch along dim 0 of "
                "every output that reaches the loss (e.g. an RNN's h_n is [layers, B, H]: use its "
                "output sequence instead, or leave the module out)")
    own = {n: module.get_parameter(n).detach() for n in params}
    names = list(call.kwargs)
    in_args = tuple(0 if _batched(a, B, k in call.shared) else None
                    for k, a in enumerate(call.args))
    in_kwargs = tuple(0 if _batched(call.kwargs[k], B, k in call.shared) else None for k in names)
    args = [a[samples] if d == 0 else a for a, d in zip(call.args, in_args)]
    kwargs = [call.kwargs[k][samples] if d == 0 else call.kwargs[k]
              for k, d in zip(names, in_kwargs)]
    gouts = [g[samples] if g is not None else None for g in call.grad_outputs]
    in_gouts = tuple(0 if g is not None else None for g in gouts)

    def sample_loss(theta, a, kw, go):
        a = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(a, in_args))
        kw = {k: (x.unsqueeze(0) if d == 0 else x) for k, x, d in zip(names, kw, in_kwargs)}
        if adapt is not None:
            a, kw = adapt(a, kw)
        out = functional_call(module, theta, a, kw)
        outs = _flat(out)
        loss = 0.0
        for k, g in zip(call.output_index, go):
            if g is not None:
                loss = loss + (outs[k].squeeze(0) * g).sum()
        return loss

    fn = vmap(grad(sample_loss), in_dims=(None, list(in_args), list(in_kwargs), list(in_gouts)))
    try:
        with torch.enable_grad():
            per_sample = fn(own, list(args), kwargs, gouts)
    except RuntimeError as e:
        if "randomness" not in str(e):
            raise
        raise RuntimeError(
            "its forward draws random numbers (dropout?), so its per-sample gradients cannot be "
            "recomputed exactly. Set its dropout to 0 (dropout elsewhere in the model is fine), "
            "or leave it out with layers= or unsupported='skip'.") from e
    return {k: v.float() for k, v in per_sample.items()}


class GenericRule(NormRule):
    """Any module: per-sample gradients by torch.func (NormRule's default
    `per_sample_grads`), squared."""

    def check(self, module, name):
        _refuse_random(module, name)

    def sq_norms(self, module, calls, params):
        B = batch_size_of(calls)
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
