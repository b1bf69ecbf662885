"""Per-sample gradients of any module by torch.func over its recorded calls
(vmap of grad): sample i's loss is Σ_outputs ⟨f(θ; x_i), dY_i⟩, whose gradient
is exactly sample i's share. The exact fallback's method, and NormRule's
default `per_sample_grads`."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from .calls import batch_size_of, output_tensors


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
    in_args = tuple(0 if _batched(a, B, k in call.model_state) else None
                    for k, a in enumerate(call.args))
    in_kwargs = tuple(0 if _batched(call.kwargs[k], B, k in call.model_state) else None
                      for k in names)
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
        outs = output_tensors(out)
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
