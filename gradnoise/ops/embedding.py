"""Per-sample gradient norms of an nn.Embedding's weight.

Sample i's gradient is sparse: row v of G_i is Σ_{t: tok_i,t = v} dY_i,t, so
repeated tokens of a sample add before squaring and
‖G_i‖² = Σ_v ‖Σ_{t: tok_i,t = v} dY_i,t‖². Rows of padding_idx get no gradient.
"""
from __future__ import annotations

import torch

from ..checks import is_int
from . import _validate
from .backends import resolve_backend


def check_embedding_args(indices, grad_out, num_embeddings: int) -> None:
    for name, t in (("indices", indices), ("grad_out", grad_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradnoise: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gradnoise: `indices` must be int64 or int32, got {indices.dtype}")
    if grad_out.dtype not in _validate.SUPPORTED_DTYPES:
        raise TypeError(f"gradnoise: `grad_out` has dtype {grad_out.dtype}; supported dtypes are "
                        "float32, float64, bfloat16 and float16")
    if indices.dim() < 1 or grad_out.shape[:-1] != indices.shape or grad_out.dim() != indices.dim() + 1:
        raise ValueError(f"gradnoise: `grad_out` of shape {tuple(grad_out.shape)} must be "
                         f"`indices`' shape {tuple(indices.shape)} plus the embedding dimension")
    if indices.device != grad_out.device:
        raise ValueError(f"gradnoise: `indices` is on {indices.device} but `grad_out` is on "
                         f"{grad_out.device}")
    if not is_int(num_embeddings) or num_embeddings < 1:
        raise ValueError(f"gradnoise: `num_embeddings` must be a positive int, got {num_embeddings!r}")


def normalised_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """padding_idx as nn.Embedding reads it (a negative index counts from the end)."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"gradnoise: `padding_idx` = {padding_idx} is outside the embedding's "
                         f"{num_embeddings} rows")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def embedding_sq_norms_ref(indices: torch.Tensor, grad_out: torch.Tensor, num_embeddings: int,
                           padding_idx: int | None = None) -> torch.Tensor:
    """Reference twin: one segment sum over (sample, token) keys, in float64."""
    check_embedding_args(indices, grad_out, num_embeddings)
    padding_idx = normalised_padding_idx(padding_idx, num_embeddings)
    B = indices.shape[0]
    acc = _validate.accumulation_dtype(grad_out.dtype)
    toks = indices.reshape(B, -1).long()
    if toks.numel() and (toks.min() < 0 or toks.max() >= num_embeddings):
        bad = toks[(toks < 0) | (toks >= num_embeddings)][0].item()
        raise ValueError(f"gradnoise: token id {bad} is outside the embedding's {num_embeddings} rows")
    toks = toks.reshape(-1)
    samples = torch.arange(B, device=indices.device).repeat_interleave(
        indices.numel() // max(B, 1))
    grads = grad_out.reshape(toks.shape[0], -1).double()
    if padding_idx is not None:
        keep = toks != padding_idx
        toks, samples, grads = toks[keep], samples[keep], grads[keep]
    keys = samples * num_embeddings + toks
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = grads.new_zeros(uniq.shape[0], grads.shape[1]).index_add_(0, inverse, grads)
    out = torch.zeros(B, dtype=torch.float64, device=grad_out.device)
    return out.index_add_(0, uniq // num_embeddings, summed.square().sum(1)).to(acc)


def embedding_sq_norms(indices: torch.Tensor, grad_out: torch.Tensor, num_embeddings: int,
                       padding_idx: int | None = None, backend: str | None = None) -> torch.Tensor:
    """n_i = ‖∇W ℓ_i‖² of an nn.Embedding (W [num_embeddings, d]) from its token
    ids [B, *] and output gradient [B, *, d]; float32 (float64 for float64).
    padding_idx as nn.Embedding takes it (negative: counted from the end).

    CPU tensors: the compiled kernel (each sample's positions sorted by token,
    runs of equal tokens summed, then squared: O(T log T + T·d) a sample,
    samples shared among threads). Other devices: the reference twin.
    """
    check_embedding_args(indices, grad_out, num_embeddings)
    padding_idx = normalised_padding_idx(padding_idx, num_embeddings)
    be = resolve_backend(grad_out.device, backend, "embedding")
    if be == "cpu":
        pad = -1 if padding_idx is None else padding_idx
        return torch.ops.gradnoise.embedding_sq_norms(indices, grad_out, num_embeddings, pad)
    return embedding_sq_norms_ref(indices, grad_out, num_embeddings, padding_idx)


def register_fakes() -> None:
    """Shape of the compiled Embedding op for fake tensors."""
    @torch.library.register_fake("gradnoise::embedding_sq_norms")
    def _embedding_sq_norms_fake(indices, grad_out, num_embeddings, padding_idx=-1):
        return grad_out.new_empty((indices.shape[0],),
                                  dtype=_validate.accumulation_dtype(grad_out.dtype))
