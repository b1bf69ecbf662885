"""GradNoiseTracker's results: the last measured step's per-sample and
per-layer squared norms, in the loss reduction's units."""
from __future__ import annotations

import torch

from ..verify import verify
from .step import _Step


class _Results:
    """Reading GradNoiseTracker's results (a mixin: the state is the tracker's)."""

    def _scaled(self, step: _Step) -> tuple[list[str], torch.Tensor | None, float]:
        """(layer names in named_modules() order, float32 [layers, B] of their
        norms, the factor that undoes the loss reduction), as one tensor so
        that reading and scaling them costs one op rather than one per layer.
        The factor is applied when the values are read: an op fewer in the
        step when only per_sample_sq_norms() is read."""
        sizes = {}
        for name, b in step.batch.items():
            sizes.setdefault(b, []).append(name)
        if len(sizes) > 1:
            detail = "; ".join(f"B={b}: {', '.join(repr(n) for n in names[:4])}"
                               + (" ..." if len(names) > 4 else "") for b, names in sizes.items())
            raise RuntimeError(
                "GradNoiseTracker: the batch dimension (dim 0 of each tracked module's input) "
                f"differs between layers in this backward ({detail}). Per-sample norms need "
                "every tracked module to see the samples along dim 0; move the batch to dim 0 "
                "(e.g. batch_first=True) or leave the other modules out with `layers=`.")
        order = self._module_order
        if any(name not in order for name in step.sq_norms):
            order = self._module_order = {n: k for k, (n, _) in
                                          enumerate(self.model.named_modules())}
        names = sorted(step.sq_norms, key=order.__getitem__)
        if not names:
            return names, None, 1.0
        matrix = torch.stack([step.sq_norms[n] for n in names])
        scale = float(matrix.shape[1]) ** 2 if self.loss_reduction == "mean" else 1.0
        return names, matrix, scale

    # ---------------------------------------------------------------- results
    def _require_results(self) -> tuple[list[str], torch.Tensor | None, float]:
        if self._unmeasured is not None:
            raise RuntimeError(self._unmeasured)
        if self._results is None:
            raise RuntimeError(
                "GradNoiseTracker: nothing measured yet. Run a training-mode forward "
                "(model.train(), gradients enabled) and loss.backward() first.")
        return self._results

    def per_layer_sq_norms(self) -> dict[str, torch.Tensor]:
        """{qualified module name: float32 [B]} of the last measured step, for
        each module that directly owns measured parameters (a shared parameter
        counts once, under its first owner; one that a module holds with a
        module inside it, under the inner module, which uses it)."""
        names, matrix, scale = self._require_results()
        if matrix is None:
            return {}
        return dict(zip(names, (matrix * scale).unbind(0)))

    def per_layer_sq_norm_matrix(self) -> tuple[list[str], torch.Tensor]:
        """The values of per_layer_sq_norms() as (names, float32 [layers, B]),
        row k belonging to names[k]."""
        names, matrix, scale = self._require_results()
        if matrix is None:
            return [], torch.zeros(0, 0)
        return list(names), matrix * scale

    def per_layer_sums(self) -> tuple[list[str], list[float], int]:
        """(layer names, Σ_i of each layer's per-sample norm, B) of the last
        measured step: what the noise-scale estimator reads, in one reduction
        and one host copy."""
        names, matrix, scale = self._require_results()
        if matrix is None:
            return [], [], 0
        sums = matrix.sum(1, dtype=torch.float64).tolist()
        return list(names), [v * scale for v in sums], matrix.shape[1]

    def per_sample_sq_norms(self) -> torch.Tensor:
        """float32 [B]: ‖∇θ ℓ_i‖² over every measured parameter, last measured step."""
        names, matrix, scale = self._require_results()
        if matrix is None:
            raise RuntimeError("GradNoiseTracker: the last backward reached no tracked module.")
        total = matrix.sum(0)
        return total.mul_(scale) if scale != 1.0 else total

    def verify(self, inputs, loss_fn, samples: int | None = None):
        """One step on `inputs` (a tensor, a tuple or a dict of the model's
        inputs) with loss `loss_fn(model_output)`, against exact per-sample
        gradients by plain autograd in float64: a gradnoise.verify.Verification
        with, per layer, the worst relative error and whether the fallback
        measured it (print it for a table). Gradients and results are kept."""
        return verify(self, inputs, loss_fn, samples)

    @property
    def tracked_modules(self) -> list[str]:
        return [t.name for t in self._tracked if t.own]

    @property
    def fused_modules(self) -> list[str]:
        """Modules whose backward the tracker takes over (nn.Linear, zero-padded
        convolutions, LayerNorm, RMSNorm and GroupNorm, not sharing
        parameters, or whose one parameter is a weight tied with Linear or
        Embedding uses): their weight
        gradient comes from the fused kernel with the norms, except for
        Linear calls with 2-D input, which keep autograd's backward."""
        return [t.name for t in self._tracked if t.fused]
