"""The backward passes of one optimizer step, with the weight and the number
of samples of each, and the two-batch estimate they lead to (estimators.py
has the maths)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import is_real
from ..estimators import unbiased_sq_norm_and_trace


@dataclass
class Backward:
    """One backward pass of the step being measured: the factor c on its
    loss (its mean over its samples, or their sum; a GradScaler's scale is
    not part of c), its number of samples b, and, for the micro-batch
    source, ‖g‖² of the gradient it produced, per layer."""
    loss_scale: float | None = None
    batch_size: float | None = None
    sq_norms: dict = field(default_factory=dict)


def positive(value, what: str) -> float:
    """`value` as a float if it is a finite number > 0, else a ValueError naming `what`."""
    if not is_real(value) or value <= 0:
        raise ValueError(f"GradientNoiseScale.{what} must be a finite number > 0, got {value!r}")
    return float(value)


def weights(backs: list[Backward], batch_size: float | None,
            loss_reduction: str) -> tuple[list[float], list[float]]:
    """(w_j, b_j) of a step's backward passes on this process: b_j its
    samples and w_j the factor on its mean gradient G_{b_j} in what it added
    to .grad (c_j for a mean loss, c_j·b_j for a sum)."""
    k = len(backs)
    declared = [bk.batch_size is not None for bk in backs]
    if all(declared):
        sizes = [bk.batch_size for bk in backs]
        if batch_size is not None and abs(sum(sizes) - batch_size) > 1e-9 * batch_size:
            raise ValueError(
                f"GradientNoiseScale.step: batch_size={batch_size:g} but the backward "
                f"passes declared {sum(sizes):g} samples ({', '.join(f'{b:g}' for b in sizes)})")
    elif any(declared):
        raise ValueError("GradientNoiseScale: after_backward gave batch_size for some "
                         "backward passes of this step and not for others")
    else:
        if batch_size is None:
            raise ValueError("GradientNoiseScale.step: pass batch_size (samples in this "
                             "optimizer step on this process)")
        if k > 1 and batch_size % k:
            raise ValueError(
                f"GradientNoiseScale.step: batch_size={batch_size:g} does not split evenly "
                f"into the step's {k} backward passes; call after_backward(loss_scale, "
                "batch_size) after each backward to give each one's samples")
        sizes = [batch_size / k] * k
    default_c = 1.0 / k if loss_reduction == "mean" else 1.0
    scales = [default_c if bk.loss_scale is None else bk.loss_scale for bk in backs]
    if loss_reduction == "sum":
        return [c * b for c, b in zip(scales, sizes)], sizes
    return scales, sizes


def two_batch_estimates(small, big, b, B):
    """estimators.unbiased_sq_norm_and_trace, with what to check when the
    declared weights make the accumulated batch no larger than the small one."""
    if not b < B:
        raise ValueError(
            f"GradientNoiseScale: the backward passes' weights and sizes give a small batch "
            f"b = {b:g} no smaller than the accumulated one B_eff = {B:g}; check the loss_scale "
            "and batch_size given to after_backward (weights far from proportional to the sizes "
            "leave no larger batch to compare with)")
    return unbiased_sq_norm_and_trace(small, big, b, B)
