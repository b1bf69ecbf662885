"""nn.Conv1d/2d/3d as Linear problems (Rochette et al. 2019): unfold the
input into patches, X_i [L, C_in/G · k], with L output positions, and the
output gradient into dY_i [L, C_out/G]; each of the G groups is its own
Linear problem, so groups are folded into the batch and the per-sample norm
is the sum over groups. Stride, dilation, any padding (including "same" and
non-zero padding modes) are honoured by padding explicitly as the module
does and taking strided windows.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from .base import NormRule, register_rule


def unfold_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """[B, C, *S] -> [B, G, L, C/G · prod(k)], ordered as the weight's (C/G, *k)."""
    nd = len(module.kernel_size)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        k, dil, st = module.kernel_size[i], module.dilation[i], module.stride[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, st)[..., ::dil]
    B, C = x.shape[:2]
    out_sizes = x.shape[2:2 + nd]
    # [B, C, *L, *k] -> [B, *L, C, *k]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    L = 1
    for s in out_sizes:
        L *= s
    G = module.groups
    x = x.reshape(B, L, G, -1).transpose(1, 2)
    return x


def _problems(module, calls):
    """X [B·G, ΣL, C_in/G·k] and dY [B·G, ΣL, C_out/G], over calls with a gradient."""
    G = module.groups
    xs, gs = [], []
    for c in calls:
        g = c.grad_outputs[0]
        if g is None:
            continue
        B = g.shape[0]
        patches = unfold_patches(module, c.args[0].to(g.dtype))
        xs.append(patches.reshape(B * G, patches.shape[2], -1))
        gs.append(g.reshape(B, G, g.shape[1] // G, -1).transpose(2, 3).reshape(B * G, -1, g.shape[1] // G))
    if len(xs) == 1:  # one call: no copy
        return xs[0], gs[0]
    return torch.cat(xs, 1), torch.cat(gs, 1)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(NormRule):
    def sq_norms(self, module, calls, params):
        x, g = _problems(module, calls)
        B = x.shape[0] // module.groups
        with_bias = "bias" in params
        if "weight" in params:
            n = ops.linear_sq_norms(x, g, with_bias=with_bias)
        else:
            n = g.sum(1, dtype=torch.float32).square().sum(1)
        return n.float().view(B, module.groups).sum(1)

    def per_sample_grads(self, module, calls, params, samples):
        x, g = _problems(module, calls)
        G = module.groups
        B = x.shape[0] // G
        x = x.view(B, G, *x.shape[1:])[samples].float()
        g = g.view(B, G, *g.shape[1:])[samples].float()
        b = x.shape[0]
        out = {}
        if "weight" in params:
            w = torch.einsum("bgtp,bgtd->bgpd", g, x)
            out["weight"] = w.reshape(b, *module.weight.shape)
        if "bias" in params:
            out["bias"] = g.sum(2).reshape(b, -1)
        return out
