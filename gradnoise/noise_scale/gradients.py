"""‖g‖² of the model's gradients per layer (the module that owns each
parameter): the batch gradient in .grad after the step's last backward, and
single gradients as backward produces them."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..model_structure import parameter_owners


def owner_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> qualified name of the first module that owns it."""
    return {pid: names[0] for pid, names in parameter_owners(model, trainable_only=False).items()}


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² of one gradient as backward hands it over, accumulated in float32
    (float64 for float64 tensors) and left on its device: the hooks add it up
    without waiting for it (ops.sq_norms serves the batch gradient, read once
    a step, in one call over every tensor)."""
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().values()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=acc).square()


class GradSqNorms:
    """Reads {layer: ‖.grad‖²} over the parameters each layer owns."""

    def __init__(self, params: list[torch.Tensor], owners: dict[int, str]):
        self.params, self.owners = params, owners
        self._devices: set | None = None

    def per_layer(self) -> dict[str, float]:
        """Reading every gradient is the estimator's main cost: one call of
        ops.sq_norms streams them all with every core, and one host copy
        brings the results back."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return {}
        grads = []
        for p in with_grad:
            g = p.grad
            if g.is_sparse:
                g = g.coalesce().values()
            elif g.requires_grad:  # (after create_graph=True; an op per gradient otherwise)
                g = g.detach()
            grads.append(g)
        # gradients of one model's parameters: checked once, the first time
        # (a model spread over devices takes the checked path every step)
        devices = self._devices
        if devices is None:
            devices = self._devices = {p.grad.device for p in with_grad}
        values = ops.sq_norms(grads, checked=len(devices) != 1).tolist()
        out: dict[str, float] = {}
        for p, v in zip(with_grad, values):
            layer = self.owners.get(id(p), "")
            out[layer] = out.get(layer, 0.0) + v
        return out

    def batch(self) -> dict[str, float]:
        """`per_layer()`, which must not be empty: the step's batch gradient."""
        grads = self.per_layer()
        if not grads:
            raise RuntimeError(
                "GradientNoiseScale.step: no parameter of the model has a gradient. Call step() "
                "after the step's last backward and before optimizer.zero_grad().")
        return grads
