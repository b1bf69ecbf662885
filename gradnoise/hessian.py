"""Hessian-aware noise scale, on demand (research use).

McCandlish et al. 2018, section 2.2 and appendix A: with H the Hessian of the
loss, the optimal step size and the noise scale that sets the critical batch
are
    ε_max   = ‖G‖² / (Gᵀ H G)
    B_noise = tr(H Σ) / (Gᵀ H G),
which reduce to 1/λ and B_simple = tr(Σ)/‖G‖² when H = λ I.

Estimation, from n samples: per-sample gradients g_i (n backward passes),
their mean ḡ, and Hessian-vector products by double backward (Pearlmutter
1994). Gᵀ H G uses the batch gradient G of the whole batch; tr(H Σ) uses the
unbiased sample covariance,
    tr(H Σ) ≈ 1/(n − 1) Σ_i (g_i − ḡ)ᵀ H (g_i − ḡ).
Cost: n single-sample gradients; one forward and one backward of the whole
batch, kept as a graph (create_graph=True); and n + 1 Hessian-vector
products, each one more backward through that batch graph. So about
n + 2 batch backward passes beside the n single-sample ones: choose the
batch for H (`inputs`) no larger than the estimate of GᵀHG needs. Memory:
the batch's double-backward graph, and one copy of the parameters per live
vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class HessianNoiseScale:
    b_noise: float | None     # tr(HΣ)/(GᵀHG); None if GᵀHG ≤ 0 or tr(HΣ) < 0
    eps_max: float | None     # ‖G‖²/(GᵀHG); None if GᵀHG ≤ 0
    trace_h_sigma: float
    g_h_g: float
    sq_norm: float
    samples: int


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def hessian_noise_scale(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        inputs: torch.Tensor, targets: torch.Tensor,
                        samples: int = 8) -> HessianNoiseScale:
    """B_noise and ε_max at the model's current parameters.

    loss_fn(outputs, targets) must be a mean over the samples it is given.
    `samples` (≥ 2) of the batch's samples estimate tr(HΣ); the whole batch
    gives G and GᵀHG.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = min(samples, inputs.shape[0])
    return hessian_noise_scale_of(
        params, lambda: loss_fn(model(inputs), targets),
        lambda i: loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]), n)


def hessian_noise_scale_of(params: list[torch.Tensor], batch_loss: Callable[[], torch.Tensor],
                           sample_loss: Callable[[int], torch.Tensor], samples: int,
                           batch_size: int | None = None) -> HessianNoiseScale:
    """`hessian_noise_scale` for any loss: batch_loss() the mean loss of the
    batch, sample_loss(i) that of its sample i, for i < samples (≥ 2).

    batch_size: the batch's number of samples B, to remove the batch
    gradient's own noise: E[G_BᵀH G_B] = GᵀHG + tr(HΣ)/B and
    E‖G_B‖² = ‖G‖² + tr(Σ)/B, both estimated from the same per-sample
    gradients. Without it the batch's G_B stands for G, which overstates
    GᵀHG, and understates B_noise, unless B ≫ B_noise."""
    n = samples
    if n < 2:
        raise ValueError("hessian_noise_scale: needs at least 2 samples")

    def gradient(i) -> torch.Tensor:
        return _flat(torch.autograd.grad(sample_loss(i), params)).detach()

    with torch.enable_grad():
        per_sample = torch.stack([gradient(i) for i in range(n)])
        # One graph of the batch gradient serves every Hessian-vector product.
        batch_grad = _flat(torch.autograd.grad(batch_loss(), params, create_graph=True))

        def hvp(vec: torch.Tensor) -> torch.Tensor:
            return _flat(torch.autograd.grad(batch_grad, params, grad_outputs=vec,
                                             retain_graph=True))

        G = batch_grad.detach()
        gHg = (G * hvp(G)).sum().item()
        centred = per_sample - per_sample.mean(0)
        # The Hessian of the batch loss stands for H (the per-sample Hessians
        # average to it); one HVP per centred sample gradient.
        quad = sum((c * hvp(c)).sum().item() for c in centred)
    tr_h_sigma = quad / (n - 1)
    sq = G.square().sum().item()
    if batch_size is not None:
        gHg -= tr_h_sigma / batch_size
        sq -= centred.square().sum().item() / (n - 1) / batch_size
    ok = gHg > 0
    # a negative tr(HΣ) (indefinite H, or sampling) gives no B_noise rather than a negative one
    return HessianNoiseScale(tr_h_sigma / gHg if ok and tr_h_sigma >= 0 else None,
                             sq / gHg if ok else None, tr_h_sigma, gHg, sq, n)
