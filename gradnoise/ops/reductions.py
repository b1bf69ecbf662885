"""‖t‖² of each tensor of a list, in one pass: the squared gradient norms the
noise-scale estimator reads every step (gradnoise.noise_scale)."""
from __future__ import annotations

import torch

from . import _validate
from .backends import resolve_backend


def _check(tensors) -> list[torch.Tensor]:
    tensors = list(tensors)
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradnoise.ops.sq_norms: item {k} is a {type(t).__name__}, "
                            "not a torch.Tensor")
        if t.dtype not in _validate.SUPPORTED_DTYPES:
            raise TypeError(f"gradnoise.ops.sq_norms: tensor {k} has dtype {t.dtype}; supported "
                            "dtypes are float32, float64, bfloat16 and float16")
        if t.layout != torch.strided:
            raise ValueError(f"gradnoise.ops.sq_norms: tensor {k} is sparse; pass its values "
                             "(t.coalesce().values())")
    return tensors


def sq_norms_ref(tensors) -> torch.Tensor:
    """Reference twin: float64 [n], ‖t_k‖² = Σ_j t_k[j]² summed in float64."""
    tensors = _check(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([t.detach().double().square().sum().to(tensors[0].device)
                        for t in tensors])


def sq_norms(tensors, backend: str | None = None, checked: bool = True) -> torch.Tensor:
    """float64 [n]: ‖t_k‖² of each tensor (any shape and strides).

    CPU tensors: one call of the compiled kernel, which streams every tensor
    with every thread and sums in float64 (no overflow, the same result for
    any number of threads). Other devices: torch._foreach_norm (one fused
    launch; accumulates in float32).

    checked=False skips the Python checks, for a non-empty list of dense
    tensors of a supported dtype on one device (the compiled kernel checks
    them too): the noise-scale estimator's call on every step, where a check
    per gradient costs more than the CPU kernel's pass over a small model's
    gradients.
    """
    if not checked:
        return _sq_norms(tensors, backend)
    tensors = _check(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("gradnoise.ops.sq_norms: the tensors are on several devices ("
                         + ", ".join(sorted({str(t.device) for t in tensors})) + ")")
    return _sq_norms(tensors, backend)


def _sq_norms(tensors: list[torch.Tensor], backend: str | None) -> torch.Tensor:
    be = resolve_backend(tensors[0].device, backend, "reductions")
    if be == "reference":
        return sq_norms_ref(tensors)
    if be == "cpu":
        return torch.ops.gradnoise.sq_norms.default(tensors)
    return torch.stack(torch._foreach_norm(tensors)).double().square()


def register_fakes() -> None:
    """Shape of the compiled sq_norms op for fake tensors."""
    @torch.library.register_fake("gradnoise::sq_norms")
    def _sq_norms_fake(tensors):
        return tensors[0].new_empty((len(tensors),), dtype=torch.float64)
