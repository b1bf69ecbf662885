"""‖g‖² of the model's gradients per layer (the module that owns each
parameter): the batch gradient in .grad after the step's last backward, and
single gradients as backward produces them. Gradients sharded as DTensors
(FSDP2's fully_shard) count by their local shards, summed over the ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..collectives import all_reduce
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


def total_sq_norm(grad_norm) -> float:
    """‖G‖² from a total gradient norm as clip_grad_norm_ returns it (a
    number, a tensor, or a DTensor under FSDP2)."""
    full = getattr(grad_norm, "full_tensor", None)
    try:
        value = float(full() if full is not None else grad_norm)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"GradientNoiseScale.step: `grad_norm` must be a number or a one-element "
                        f"tensor (what clip_grad_norm_ returns), got {type(grad_norm).__name__}"
                        ) from None
    if value < 0:
        raise ValueError(f"GradientNoiseScale.step: `grad_norm` must be a norm ≥ 0, got {value!r}")
    return value * value   # inf or nan: the step is skipped as non-finite


def _local_shard(g: torch.Tensor, plain: float = 1.0) -> tuple[torch.Tensor, float]:
    """(this rank's part of g, the weight of its ‖·‖² in the sum over ranks;
    `plain` for a tensor that is not a DTensor). A DTensor sharded on a mesh
    holds each element once per replicate dimension's rank: those copies are
    divided out."""
    placements = getattr(g, "placements", None)
    if placements is None:
        return g, plain
    mesh = g.device_mesh
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            "GradientNoiseScale: a gradient is a DTensor on a device mesh of "
            f"{mesh.size()} ranks, but the world has {dist.get_world_size()}; norms of sharded "
            "gradients are summed over the whole world, so shard the model over a mesh that "
            "spans every rank (init_device_mesh over the world size)")
    copies = 1
    for d, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError("GradientNoiseScale: a gradient is a DTensor with a Partial "
                             "placement (not yet reduced); call step() after the gradients "
                             "are reduced")
        if placement.is_replicate():
            copies *= mesh.size(d)
    return g.to_local(), 1.0 / copies


class GradSqNorms:
    """Reads {layer: ‖.grad‖²} over the parameters each layer owns."""

    def __init__(self, params: list[torch.Tensor], owners: dict[int, str]):
        self.params, self.owners = params, owners
        self._devices: set | None = None
        self.sharded = False     # whether the last reading summed DTensor shards over ranks

    def per_layer(self) -> dict[str, float]:
        """Reading every gradient is the estimator's main cost: one call of
        ops.sq_norms streams them all with every core, and one host copy
        brings the results back."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return {}
        self.sharded = any(hasattr(p.grad, "placements") for p in with_grad)
        # beside sharded gradients, a plain one is the same on every rank: counted once
        plain = 1.0 / dist.get_world_size() if self.sharded else 1.0
        grads, shares = [], []
        for p in with_grad:
            g, share = _local_shard(p.grad, plain)
            if g.is_sparse:
                g = g.coalesce().values()
            elif g.requires_grad:  # (after create_graph=True; an op per gradient otherwise)
                g = g.detach()
            grads.append(g)
            shares.append(share)
        # gradients of one model's parameters: checked once, the first time
        # (a model spread over devices takes the checked path every step)
        devices = self._devices
        if devices is None:
            devices = self._devices = {g.device for g in grads}
        values = ops.sq_norms(grads, checked=len(devices) != 1).tolist()
        out: dict[str, float] = {}
        for p, v, share in zip(with_grad, values, shares):
            layer = self.owners.get(id(p), "")
            out[layer] = out.get(layer, 0.0) + v * share
        if self.sharded:
            layers = list(out)
            out = dict(zip(layers, all_reduce([out[n] for n in layers], "sum")))
        return out

    def batch(self, total: float | None = None) -> dict[str, float]:
        """`per_layer()`, which must not be empty: the step's batch gradient.
        With `total` (‖G‖² before clipping, from the trainer), the layers are
        scaled to sum to it: clipping scales every gradient by one factor."""
        grads = self.per_layer()
        if grads and total is not None:
            read = sum(grads.values())
            if read > 0 and total > 0:
                grads = {k: v * (total / read) for k, v in grads.items()}
        if not grads:
            raise RuntimeError(
                "GradientNoiseScale.step: no parameter of the model has a gradient. Call step() "
                "after the step's last backward and before optimizer.zero_grad(), and build "
                "GradientNoiseScale after anything that replaces the model's parameters "
                "(FSDP2's fully_shard).")
        return grads
