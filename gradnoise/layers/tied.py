"""Per-sample norms of a parameter shared by several modules (a tied
embedding and LM head, one Linear weight in two places), from each use's
factors instead of materialised per-sample gradients.

A use u of the weight W contributes G_i^u = A_u,iᵀ Z_u,i to sample i's
gradient, with A [T_u, rows of W] and Z [T_u, columns of W]:
  nn.Linear      A = dY,            Z = X           (W [out, in])
  nn.Embedding   A = onehot(tokens), Z = dY          (W [num_embeddings, d])
so that ‖Σ_u G_i^u‖² = Σ_u ‖G_i^u‖² + 2 Σ_{u<v} ⟨G_i^u, G_i^v⟩ and each cross
term is a sum over pairs of positions (the ghost identity, Li et al. 2021):
  ⟨G^u, G^v⟩ = Σ_{t,s} (A_u,t · A_v,s)(Z_u,t · Z_v,s),
where a one-hot A turns A_u,t · A_v,s into a gather (Linear × Embedding:
dY_t[token_s]) or a test of equal tokens (Embedding × Embedding), padding
positions contributing nothing. Cost B·T_u·T_v·(columns [+ rows]) per pair,
against B·T·rows·columns for materialising the gradients; the rules give
Σ_u ‖G_i^u‖² (for a tied LM head, the fused kernel gives it with the
weight gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factor:
    """One use's factors. kind "dense": a = dY [B, T, rows], z = X [B, T, cols];
    kind "onehot": tokens [B, T] (rows of W), z = dY [B, T, cols]."""
    kind: str
    z: torch.Tensor
    a: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    padding_idx: int | None = None
    #: which use this is (set by the tracker): the key of `gathered`
    key: int | None = None
    #: a dense use whose A was gathered early: {key of a onehot use: A at
    #: that use's tokens, [B, T, T_v]} in place of a
    gathered: dict | None = None

    def keep(self, sl: slice) -> torch.Tensor | None:
        """[b, T] mask of the positions that carry gradient (None: all)."""
        if self.kind != "onehot" or self.padding_idx is None:
            return None
        return self.tokens[sl] != self.padding_idx


def gathered_dense(x: torch.Tensor, grad_out: torch.Tensor, tokens: dict) -> Factor:
    """A Linear use's factor whose A = dY is kept only at the tokens of the
    onehot uses ({key: token ids [B, T_v]}): [B, T, T_v] each, all that the
    cross terms read of it, instead of [B, T, rows] (a tied LM head's logits
    gradient) until the end of backward."""
    B = x.shape[0]
    z = x.reshape(B, -1, x.shape[-1])
    a = grad_out.reshape(B, -1, grad_out.shape[-1])
    gathered = {k: a.gather(2, tok.reshape(B, 1, -1).long().expand(B, a.shape[1], -1))
                for k, tok in tokens.items()}
    return Factor("dense", z=z, gathered=gathered)


def _pair(u: Factor, v: Factor, sl: slice, dtype: torch.dtype) -> torch.Tensor:
    """⟨G^u, G^v⟩ [b] for the samples in `sl`."""
    zz = torch.bmm(u.z[sl].to(dtype), v.z[sl].to(dtype).transpose(1, 2))      # [b, Tu, Tv]
    if u.kind == "dense" and v.kind == "dense":
        aa = torch.bmm(u.a[sl].to(dtype), v.a[sl].to(dtype).transpose(1, 2))
    elif u.kind == "dense":                                                   # dY_u,t[token_s]
        b, Tu, Tv = zz.shape
        aa = (u.gathered[v.key][sl] if u.a is None else
              u.a[sl].gather(2, v.tokens[sl].unsqueeze(1).expand(b, Tu, Tv))).to(dtype)
    elif v.kind == "dense":
        b, Tu, Tv = zz.shape
        aa = (v.gathered[u.key][sl] if v.a is None else
              v.a[sl].gather(2, u.tokens[sl].unsqueeze(1).expand(b, Tv, Tu))).to(dtype)
        aa = aa.transpose(1, 2)
    else:                                                                     # equal tokens
        aa = (u.tokens[sl].unsqueeze(2) == v.tokens[sl].unsqueeze(1)).to(dtype)
    prod = zz.mul_(aa)
    ku, kv = u.keep(sl), v.keep(sl)
    if ku is not None:
        prod.mul_(ku.unsqueeze(2))
    if kv is not None:
        prod.mul_(kv.unsqueeze(1))
    return prod.sum((1, 2))


def cross_sq_norms(u: Factor, v: Factor, chunk_bytes: int) -> torch.Tensor:
    """⟨G_i^u, G_i^v⟩ for every sample i (float32, or float64 for float64
    input), in chunks of samples whose [b, T_u, T_v] products fit in
    `chunk_bytes`."""
    dtype = torch.float64 if u.z.dtype == torch.float64 else torch.float32
    B, Tu, Tv = u.z.shape[0], u.z.shape[1], v.z.shape[1]
    # per sample: two [Tu, Tv] products, and the factors cast to `dtype`
    # (dense × dense casts A, [T, rows] each)
    per_sample = 2 * Tu * Tv + (Tu + Tv) * u.z.shape[2]
    if u.kind == "dense" and v.kind == "dense":
        per_sample += (Tu + Tv) * u.a.shape[2]
    chunk = max(1, chunk_bytes // (per_sample * (8 if dtype == torch.float64 else 4)))
    if chunk >= B:
        return _pair(u, v, slice(0, B), dtype)
    return torch.cat([_pair(u, v, slice(s, min(B, s + chunk)), dtype) for s in range(0, B, chunk)])
