"""ops.embedding_sq_norms against per-sample gradients of nn.Embedding from
torch.func in float64: repeated tokens, padding_idx, odd shapes, dtypes."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradnoise import ops

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _truth(indices, grad_out, V, padding_idx):
    """‖∂/∂W Σ_t ⟨W[idx_t], dY_t⟩‖² per sample, by torch.func in float64."""
    emb = nn.Embedding(V, grad_out.shape[-1], padding_idx=padding_idx).double()
    params = {"weight": emb.weight.detach()}

    def loss(p, idx, g):
        return (functional_call(emb, p, (idx,)) * g).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, indices, grad_out.double())["weight"]
    return g.flatten(1).square().sum(1)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape,V,padding_idx", [((1, 1), 3, None), ((5, 9), 4, 0), ((3, 4, 6), 50, 7),
                                                 ((2, 130), 300, None), ((7,), 5, 2)])
def test_matches_torch_func(dtype, backend, shape, V, padding_idx):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, shape, generator=gen)
    if padding_idx is not None:
        idx.view(-1)[::3] = padding_idx
    g = torch.randn(*shape, 11, generator=gen, dtype=torch.float64).to(dtype)
    got = ops.embedding_sq_norms(idx, g, V, padding_idx, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), _truth(idx, g.double(), V, padding_idx),
                               rtol=TOL[dtype], atol=1e-12)


def test_int32_ids_and_strided_grad():
    idx = torch.randint(0, 6, (4, 8), dtype=torch.int32)
    g = torch.randn(4, 12, 8).transpose(1, 2)            # not contiguous
    torch.testing.assert_close(ops.embedding_sq_norms(idx, g, 6),
                               ops.embedding_sq_norms_ref(idx.long(), g.contiguous(), 6))


def test_bad_input_names_the_culprit():
    with pytest.raises(ValueError, match="token id 9 .*outside the embedding's 5 rows"):
        ops.embedding_sq_norms(torch.tensor([[1, 9]]), torch.randn(1, 2, 3), 5)
    with pytest.raises(ValueError, match="token id 9 is outside"):
        ops.embedding_sq_norms_ref(torch.tensor([[1, 9]]), torch.randn(1, 2, 3), 5)
    with pytest.raises(TypeError, match="`indices` must be int64 or int32"):
        ops.embedding_sq_norms(torch.zeros(2, 3), torch.randn(2, 3, 4), 5)
    with pytest.raises(ValueError, match="plus the embedding dimension"):
        ops.embedding_sq_norms(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 4, 4), 5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_negative_padding_idx_counts_from_the_end(backend):
    idx = torch.randint(0, 6, (3, 5))
    idx[:, 1] = 5
    g = torch.randn(3, 5, 4)
    torch.testing.assert_close(ops.embedding_sq_norms(idx, g, 6, -1, backend=backend),
                               ops.embedding_sq_norms(idx, g, 6, 5, backend=backend))
    torch.testing.assert_close(ops.embedding_sq_norms(idx, g, 6, 5, backend=backend).double(),
                               _truth(idx, g.double(), 6, 5), rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="`padding_idx` = 6 is outside"):
        ops.embedding_sq_norms(idx, g, 6, 6, backend=backend)


def test_opcheck():
    idx = torch.randint(0, 5, (3, 4))
    torch.library.opcheck(torch.ops.gradnoise.embedding_sq_norms.default,
                          (idx, torch.randn(3, 4, 6), 5, 1))
