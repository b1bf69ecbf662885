"""The noisy quadratic model (Zhang et al. 2019, "Which algorithmic choices
matter at which batch sizes?"), a task whose critical batch is known exactly.

Loss L(θ) = ½ Σ_j h_j θ_j², and each sample's gradient is ∇L + √c ⊙ z with
z ~ N(0, I): per-sample gradient noise of covariance diag(c). A batch of B
samples has gradient hθ + √c ⊙ z̄, noise covariance diag(c)/B. Under SGD with
learning rate α each direction evolves independently in expectation,

    E θ_j²  ←  (1 − α h_j)² E θ_j² + α² c_j / B,     E L = ½ Σ_j h_j E θ_j²,

so the steps S(B) to a target, their optimum over α and B_crit follow
without sampling (`expected_losses`, `analytic_steps`). The simple noise
scale at θ is B_simple = tr(Σ)/‖G‖² = Σ_j c_j / Σ_j h_j² θ_j² (`b_simple`), and
the Hessian-aware one B_noise = tr(HΣ)/GᵀHG = Σ_j h_j c_j / Σ_j h_j³ θ_j²
(`b_noise`).

As a `Task` the model is θ itself and a batch is its noise draw z [B, n].
The loss a run reads is L(θ), exactly: the sampled term θ·(√c ⊙ z̄) has mean
zero and enters only the gradient, so the curve a run records is the one the
recursion predicts the mean of.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .runs import Task, first_crossing, lag


@dataclass(frozen=True)
class NoisyQuadratic:
    """Curvatures h_j = j^(−power) and noise c_j = h_j (Zhang et al. 2019),
    j = 1 … dim, from θ_j = 1."""
    dim: int = 64
    power: float = 1.0
    noise: float = 1.0

    def curvature(self) -> torch.Tensor:
        return torch.arange(1, self.dim + 1, dtype=torch.float64).pow(-self.power)

    def noise_variance(self) -> torch.Tensor:
        return self.noise * self.curvature()

    def start(self) -> torch.Tensor:
        return torch.ones(self.dim, dtype=torch.float64)

    def b_simple(self, theta: torch.Tensor | None = None) -> float:
        """Σ c_j / Σ h_j² θ_j² at θ (default: the start)."""
        theta = self.start() if theta is None else theta.double()
        return float(self.noise_variance().sum() / (self.curvature().square() * theta.square()).sum())

    def b_noise(self, theta: torch.Tensor | None = None) -> float:
        """tr(HΣ)/GᵀHG = Σ h_j c_j / Σ h_j³ θ_j² at θ (default: the start)."""
        theta = self.start() if theta is None else theta.double()
        h = self.curvature()
        return float((h * self.noise_variance()).sum() / (h.pow(3) * theta.square()).sum())

    def moments(self, batch: int, lr: float, updates: int) -> np.ndarray:
        """E θ_j² after `updates` SGD updates from the start."""
        h, c = self.curvature().numpy(), self.noise_variance().numpy()
        m = self.start().numpy() ** 2
        for _ in range(updates):
            m = (1 - lr * h) ** 2 * m + lr * lr * c / batch
        return m

    def expected_losses(self, batch: int, lr, steps: int, start=None) -> np.ndarray:
        """E L at each of `steps` SGD steps, read as a training run reads its
        loss: at step t, at the parameters before its update (step 1: the
        start, or second moments `start`). One learning rate ([steps]) or an
        array of them ([len(lr), steps])."""
        h, c = self.curvature().numpy(), self.noise_variance().numpy()
        lrs = np.atleast_1d(np.asarray(lr, dtype=np.float64))[:, None]
        m0 = self.start().numpy() ** 2 if start is None else np.asarray(start, np.float64)
        m = np.broadcast_to(m0, (lrs.shape[0], self.dim)).copy()
        decay, inject = (1 - lrs * h) ** 2, lrs * lrs * c / batch
        out = np.empty((lrs.shape[0], steps))
        with np.errstate(over="ignore", invalid="ignore"):   # rates past 2/h_max diverge: inf
            for t in range(steps):
                out[:, t] = 0.5 * (m @ h)
                m = decay * m + inject
        return out[0] if np.ndim(lr) == 0 else out

    def analytic_steps(self, batch: int, lr, target: float, max_steps: int,
                       window: int = 1):
        """Lag-corrected steps for the trailing mean (over `window`) of E L to
        fall below `target`, read as a run reads its own curve; inf if it
        does not within `max_steps`. One rate, or an array of them."""
        losses = np.atleast_2d(self.expected_losses(batch, np.atleast_1d(lr), max_steps))
        steps = first_crossing(losses, target, window)
        return float(steps[0]) if np.ndim(lr) == 0 else steps

    def best_analytic_steps(self, batch: int, target: float, max_steps: int,
                            lrs=None, window: int = 1) -> tuple[float, float]:
        """(min over the learning rates `lrs` of analytic_steps, the best α);
        by default a fine geometric grid up to the stability limit 2/h_max."""
        if lrs is None:
            lrs = 2.0 / float(self.curvature().max()) * 0.98 ** np.arange(300)
        lrs = np.asarray(lrs, dtype=np.float64)
        steps = self.analytic_steps(batch, lrs, target, max_steps, window)
        k = int(np.argmin(steps))
        return float(steps[k]), float(lrs[k])


    def branch_losses(self, batch: int, lr: float, checkpoint: int, factors, rates: dict,
                      examples: int, window: int) -> dict:
        """The expected losses branching reads (branching.py's rules: each
        branch at k·B runs ceil(E/(k·B) + 1 + lag) steps and is read by the
        trailing mean over max(1, round(window/k)) steps), from a trunk at
        (batch, lr) after `checkpoint` updates: E L is linear in E θ², so the
        branches' expectation starts from the trunk's expected moments."""
        m = self.moments(batch, lr, checkpoint)
        out = {}
        for k in factors:
            w = max(1, round(window / k))
            steps = math.ceil(examples / (k * batch) + 1 + lag(w))
            curve = self.expected_losses(k * batch, rates[k], steps, start=m)
            out[k] = float(curve[-w:].mean())
        return out


class QuadraticModel(nn.Module):
    """θ of a noisy quadratic model, starting at its `start()`."""

    def __init__(self, problem: NoisyQuadratic):
        super().__init__()
        self.theta = nn.Parameter(problem.start().float())
        self.register_buffer("h", problem.curvature().float())
        self.register_buffer("sqrt_c", problem.noise_variance().sqrt().float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """L(θ) in value; ∇L + √c ⊙ z̄ in gradient."""
        exact = 0.5 * (self.h * self.theta.square()).sum()
        sampled = (self.theta * self.sqrt_c * z.mean(0)).sum()
        return exact + sampled - sampled.detach()


def _model(problem: NoisyQuadratic) -> nn.Module:
    return QuadraticModel(problem)


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _loss(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return model(z)


def _noise(problem: NoisyQuadratic, generator: torch.Generator, size: int) -> torch.Tensor:
    return torch.randn(size, problem.dim, generator=generator)


def quadratic_task(problem: NoisyQuadratic = NoisyQuadratic()) -> Task:
    """The noisy quadratic model as a sweep's task, trained by SGD."""
    return Task(name=f"noisy-quadratic(dim={problem.dim}, power={problem.power}, "
                     f"noise={problem.noise})",
                model=functools.partial(_model, problem), optimizer=_sgd, loss=_loss,
                batches=functools.partial(_noise, problem))
