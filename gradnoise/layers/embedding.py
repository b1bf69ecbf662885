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
from .calls import received_gradient
from .tied import Factor


@register_rule(nn.Embedding)
class EmbeddingRule(NormRule):
    rowwise = True
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
        for tokens, g in received_gradient(calls):
            B = g.shape[0]
            idx.append(tokens.reshape(B, -1))
            grads.append(g.reshape(B, -1, g.shape[-1]))
        if len(idx) > 1:
            same = all(g.dtype == grads[0].dtype for g in grads)
            dtype = grads[0].dtype if same else torch.float32
            return torch.cat(idx, 1), torch.cat([g.to(dtype) for g in grads], 1)
        return idx[0], grads[0]

    def per_sample_grads(self, module, calls, params, samples):
        idx, grads = self._cat(calls)
        idx, grads = idx[samples].long(), grads[samples].float()
        b, V = idx.shape[0], module.num_embeddings
        rows = (torch.arange(b, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        grads = grads.reshape(rows.shape[0], -1)
        if module.padding_idx is not None:
            keep = idx.reshape(-1) != module.padding_idx
            rows, grads = rows[keep], grads[keep]
        out = grads.new_zeros(b * V, grads.shape[1]).index_add_(0, rows, grads)
        return {"weight": out.view(b, V, -1)}
