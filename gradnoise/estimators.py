"""Estimators of the gradient noise scale: pure maths on scalars and small
tensors, no hooks and no models.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"),
appendix A. With per-sample gradients of mean G and covariance Σ, the squared
norm of a batch-B gradient satisfies E‖G_B‖² = ‖G‖² + tr(Σ)/B. Two batch
sizes b < B give unbiased estimates

    ‖G‖²  ≈ 𝒢 = (B‖G_B‖² − b‖G_b‖²) / (B − b)
    tr(Σ) ≈ 𝒮 = (‖G_b‖² − ‖G_B‖²) / (1/b − 1/B)

and the simple noise scale B_simple = tr(Σ)/‖G‖² is estimated as the ratio
of the *smoothed* 𝒮 and 𝒢 (a ratio of single-step estimates is biased and a
single 𝒢 may be negative).

Batches of unequal sizes, or weighted unequally (gradient accumulation,
uneven shards): a normalised weighted sum Σ_j w_j G_{b_j} / Σ_j w_j of
independent batch means has E‖·‖² = ‖G‖² + tr(Σ)/B_eff with
B_eff = (Σ_j w_j)² / Σ_j w_j²/b_j (`effective_batch_size`), and the mean of
‖G_{b_j}‖² over k batches has E = ‖G‖² + tr(Σ)/b with b the harmonic mean
of the b_j; both enter the two-batch estimates above.

Uncertainty: the standard error of B_simple comes from the delta method,
    Var(S/G) ≈ (Var S − 2 r Cov(S,G) + r² Var G) / G²,   r = S/G,
with Var and Cov of the single-step estimates tracked by exponentially
weighted moments and divided by the EMA's effective number of steps
n_eff = (1 + β)/(1 − β) (fewer while it warms up); none before two steps.
tests/test_noise_scale.py measures the coverage of the resulting 95%
interval. The delta method assumes the smoothed 𝒢 is well away from 0
relative to its spread: while B_simple is much larger than the batch and the
EMA averages few steps, the ratio is biased upwards and the interval covers
less than its nominal 95% (B_simple is then better read as a lower bound of
a few batch sizes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def unbiased_sq_norm_and_trace(small_sq_norm: float, big_sq_norm: float, b: float,
                               B: float) -> tuple[float, float]:
    """(𝒢, 𝒮): unbiased estimates of ‖G‖² and tr(Σ) from the mean squared norm
    of batch-b gradients and the squared norm of a batch-B gradient, b < B."""
    if not b < B:
        raise ValueError(f"gradnoise: the small batch b={b} must be smaller than the big "
                         f"batch B={B}")
    g2 = (B * big_sq_norm - b * small_sq_norm) / (B - b)
    tr = (small_sq_norm - big_sq_norm) / (1.0 / b - 1.0 / B)
    return g2, tr


def weight_sums(weights, sizes) -> tuple[float, float]:
    """(Σ_j w_j, Σ_j w_j²/b_j): what `effective_batch_size` takes, and what
    processes add up before taking it."""
    return sum(weights), sum(w * w / b for w, b in zip(weights, sizes))


def effective_batch_size(weight_sum: float, weighted_inverse_sizes: float) -> float:
    """B_eff = (Σ_j w_j)² / Σ_j (w_j²/b_j) of Σ_j w_j G_{b_j} / Σ_j w_j, given
    Σ_j w_j and Σ_j w_j²/b_j: N for b_j/N weights (the mean over all N
    samples), k²/Σ_j(1/b_j) for equal weights."""
    return weight_sum * weight_sum / weighted_inverse_sizes


def per_sample_estimates(per_sample_sq_norms: torch.Tensor, batch_grad_sq_norm: float
                         ) -> tuple[float, float]:
    """(𝒢, 𝒮) with b = 1: mean of per-sample ‖∇ℓ_i‖² and ‖mean gradient‖² at B."""
    B = per_sample_sq_norms.numel()
    small = per_sample_sq_norms.double().mean().item()
    return unbiased_sq_norm_and_trace(small, float(batch_grad_sq_norm), 1, B)


class BiasCorrectedEMA:
    """m_t = β m_{t−1} + (1 − β) x_t, read as m_t / (1 − β^t) (Adam's correction)."""

    def __init__(self, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"gradnoise: EMA beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.mean = 0.0
        self.weight = 0.0  # 1 − β^t

    def update(self, x: float) -> None:
        self.mean = self.beta * self.mean + (1.0 - self.beta) * x
        self.weight = self.beta * self.weight + (1.0 - self.beta)

    @property
    def value(self) -> float | None:
        return self.mean / self.weight if self.weight > 0 else None

    def state_dict(self) -> dict:
        return {"beta": self.beta, "mean": self.mean, "weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.mean, self.weight = state["beta"], state["mean"], state["weight"]


@dataclass
class NoiseScale:
    """One reading of the smoothed estimates."""
    sq_norm: float | None          # ‖G‖², smoothed
    trace: float | None            # tr(Σ), smoothed
    b_simple: float | None         # tr(Σ)/‖G‖²; None while undefined (‖G‖² ≤ 0)
    stderr: float | None           # standard error of b_simple (delta method)
    steps: int                     # steps that entered the averages
    skipped_steps: int = 0         # steps left out for non-finite gradients

    def interval(self, z: float = 1.96) -> tuple[float, float] | None:
        """b_simple ± z·stderr (95% by default)."""
        if self.b_simple is None or self.stderr is None:
            return None
        return self.b_simple - z * self.stderr, self.b_simple + z * self.stderr


class NoiseScaleEstimator:
    """Smoothed 𝒢 and 𝒮, their ratio B_simple, and its standard error.

    Feed one (𝒢, 𝒮) pair per step with `update`; non-finite pairs are
    refused by the caller (see gradnoise.noise_scale), not here.
    """

    def __init__(self, beta: float = 0.95):
        self.beta = beta
        self.sq_norm = BiasCorrectedEMA(beta)
        self.trace = BiasCorrectedEMA(beta)
        # second moments for the uncertainty
        self.sq_norm_sq = BiasCorrectedEMA(beta)
        self.trace_sq = BiasCorrectedEMA(beta)
        self.cross = BiasCorrectedEMA(beta)
        self.steps = 0

    def update(self, sq_norm_est: float, trace_est: float) -> None:
        g, s = float(sq_norm_est), float(trace_est)
        self.sq_norm.update(g)
        self.trace.update(s)
        self.sq_norm_sq.update(g * g)
        self.trace_sq.update(s * s)
        self.cross.update(g * s)
        self.steps += 1

    def effective_steps(self) -> float:
        """Number of independent steps the EMA averages: Σw / Σw² of its weights."""
        if self.steps == 0:
            return 0.0
        b, t = self.beta, self.steps
        if b == 0.0:
            return 1.0
        s1 = 1.0 - b ** t
        s2 = (1.0 - b) / (1.0 + b) * (1.0 - b ** (2 * t))
        return s1 * s1 / s2

    def read(self) -> NoiseScale:
        g, s = self.sq_norm.value, self.trace.value
        if g is None:
            return NoiseScale(None, None, None, None, 0)
        if not g > 0:
            return NoiseScale(g, s, None, None, self.steps)
        ratio = s / g
        stderr = None
        n = self.effective_steps()
        # n is exactly 1 after one step, up to rounding of β^t
        if self.steps >= 2 and n > 1:
            var_g = max(self.sq_norm_sq.value - g * g, 0.0) * n / (n - 1)
            var_s = max(self.trace_sq.value - s * s, 0.0) * n / (n - 1)
            cov = (self.cross.value - g * s) * n / (n - 1)
            var_ratio = (var_s - 2 * ratio * cov + ratio * ratio * var_g) / (g * g)
            stderr = math.sqrt(max(var_ratio, 0.0) / n)
        return NoiseScale(g, s, ratio, stderr, self.steps)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "steps": self.steps,
                **{k: getattr(self, k).state_dict()
                   for k in ("sq_norm", "trace", "sq_norm_sq", "trace_sq", "cross")}}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.steps = state["beta"], state["steps"]
        for k in ("sq_norm", "trace", "sq_norm_sq", "trace_sq", "cross"):
            getattr(self, k).load_state_dict(state[k])
