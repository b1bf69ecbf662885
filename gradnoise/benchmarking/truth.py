"""Float64 ground truth of the training-step benchmark: per-sample squared
norms per parameter by torch.func, independent of every candidate."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .peers import trainable_params


def truth_per_param(model: nn.Module, x, y, loss_fn, chunk: int = 32) -> dict[str, torch.Tensor]:
    """{param name: float64 [B]}: ‖∇_p ℓ_i‖² by torch.func in float64, over
    chunks of samples (independent of every candidate)."""
    from torch.func import functional_call, grad, vmap
    m = copy.deepcopy(model).double()
    xd = x.double() if x.is_floating_point() else x
    params = {k: v.detach() for k, v in trainable_params(m)}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(m, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
    f = vmap(grad(loss_one), in_dims=(None, 0, 0))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    B = x.shape[0]
    per_chunk = max(1, min(chunk, (1 << 30) // max(1, 8 * sum(p.numel() for p in params.values()))))
    for s in range(0, B, per_chunk):
        g = f(params, xd[s:s + per_chunk], y[s:s + per_chunk])
        for k, t in g.items():
            out[k].append(t.reshape(t.shape[0], -1).square().sum(1))
        del g
    return {k: torch.cat(v) for k, v in out.items()}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
