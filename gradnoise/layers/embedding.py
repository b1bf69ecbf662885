"""nn.Embedding: y_t = W[tok_t], W [V, d].

Sample i's gradient is sparse: row v of G_i is Σ_{t: tok_i,t = v} dY_i,t, so
repeated tokens of a sample add before squaring and
‖G_i‖² = Σ_v ‖Σ_{t: tok_i,t = v} dY_i,t‖². Rows of padding_idx get no gradient.
The norms come from gradnoise.ops.embedding_sq_norms (O(T log T + T·d) a
sample); a module called several times has its calls' positions concatenated.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import NormRule, register_rule
from .shared import Factor


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
    factorable = ("weight",)
    factor_kind = "onehot"

    def check(self, module, name):
        if module.max_norm is not None:
            raise ValueError(
                f"GradNoiseTracker: Embedding '{name}' has max_norm set, which renormalises "
                "rows in place during forward; per-sample norms are not supported for it.")
        if module.scale_grad_by_freq:
            raise ValueError(
                f"GradNoiseTracker: Embedding '{name}' has scale_grad_by_freq=True, which "
                "divides each row's gradient by the token's count over the whole batch; "
                "per-sample norms are not supported for it (leave it out with `layers=`).")

    def sq_norms(self, module, calls, params):
        idx, grads = self._cat(calls)
        return ops.embedding_sq_norms(idx, grads, module.num_embeddings, module.padding_idx)

    def factor(self, module, calls, param):
        idx, grads = self._cat(calls)
        return Factor("onehot", z=grads, tokens=idx.long(), padding_idx=module.padding_idx)

    @staticmethod
    def _cat(calls):
        """Token ids [B, ΣT] and output gradients [B, ΣT, d] over the calls."""
        idx, grads = [], []
        for c in calls:
            g = c.grad_outputs[0]
            if g is not None:
                B = g.shape[0]
                idx.append(c.args[0].reshape(B, -1))
                grads.append(g.reshape(B, -1, g.shape[-1]))
        if len(idx) > 1:
            same = all(g.dtype == grads[0].dtype for g in grads)
            dtype = grads[0].dtype if same else torch.float32
            return torch.cat(idx, 1), torch.cat([g.to(dtype) for g in grads], 1)
        return idx[0], grads[0]

    def per_sample_grads(self, module, calls, params, samples):
        toks, sample_of, grads = _rows(module, calls)
        start = samples.start or 0
        b = samples.stop - start
        keep = (sample_of >= start) & (sample_of < samples.stop)
        out = grads.new_zeros(b * module.num_embeddings, grads.shape[1])
        out.index_add_(0, (sample_of[keep] - start) * module.num_embeddings + toks[keep], grads[keep])
        return {"weight": out.view(b, module.num_embeddings, -1)}
