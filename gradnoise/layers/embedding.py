"""nn.Embedding: y_t = W[tok_t], W [V, d].

Sample i's gradient is sparse: row v of G_i is Σ_{t: tok_i,t = v} dY_i,t, so
repeated tokens of a sample add before squaring and
‖G_i‖² = Σ_v ‖Σ_{t: tok_i,t = v} dY_i,t‖². Rows of padding_idx get no gradient.
Cost O(B·T·d): one segment sum over (sample, token) keys.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import NormRule, register_rule


def _rows(module: nn.Embedding, calls):
    """Token ids [N] (with their sample index [N]) and gradient rows [N, d]."""
    toks, samples, grads = [], [], []
    for c in calls:
        g = c.grad_outputs[0]
        if g is None:
            continue
        idx = c.args[0]
        B = idx.shape[0]
        flat = idx.reshape(B, -1)
        toks.append(flat.reshape(-1))
        samples.append(torch.arange(B, device=idx.device).repeat_interleave(flat.shape[1]))
        grads.append(g.reshape(-1, g.shape[-1]).float())
    toks, samples, grads = torch.cat(toks), torch.cat(samples), torch.cat(grads)
    if module.padding_idx is not None:
        keep = toks != module.padding_idx
        toks, samples, grads = toks[keep], samples[keep], grads[keep]
    return toks, samples, grads


@register_rule(nn.Embedding)
class EmbeddingRule(NormRule):
    def check(self, module, name):
        if module.max_norm is not None:
            raise ValueError(
                f"GradNoiseTracker: Embedding '{name}' has max_norm set, which renormalises "
                "rows in place during forward; per-sample norms are not supported for it.")

    def sq_norms(self, module, calls, params):
        B = calls[0].args[0].shape[0]
        toks, samples, grads = _rows(module, calls)
        keys = samples * module.num_embeddings + toks
        uniq, inverse = torch.unique(keys, return_inverse=True)
        summed = grads.new_zeros(uniq.shape[0], grads.shape[1]).index_add_(0, inverse, grads)
        out = torch.zeros(B, dtype=torch.float32, device=grads.device)
        return out.index_add_(0, uniq // module.num_embeddings, summed.square().sum(1))

    def per_sample_grads(self, module, calls, params, samples):
        toks, sample_of, grads = _rows(module, calls)
        start = samples.start or 0
        b = samples.stop - start
        keep = (sample_of >= start) & (sample_of < samples.stop)
        out = grads.new_zeros(b * module.num_embeddings, grads.shape[1])
        out.index_add_(0, (sample_of[keep] - start) * module.num_embeddings + toks[keep], grads[keep])
        return {"weight": out.view(b, module.num_embeddings, -1)}
