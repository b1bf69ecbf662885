"""GradNoiseTracker: exact per-sample gradient norms of a whole model, measured
during an ordinary training step.

    tracker = GradNoiseTracker(model, loss_reduction="mean")
    loss = loss_fn(model(x), y)
    loss.backward()
    tracker.per_sample_sq_norms()   # float32 [B]: ‖∇θ ℓ_i‖², ℓ_i = sample i's term of the loss

With loss_reduction "mean" (L = (1/B) Σ ℓ_i, or any mean over tokens) the
value for sample i is ‖B·g_i‖², g_i being the part of ∇θL that flows through
sample i, so it does not depend on B; with "sum" it is ‖g_i‖².

How: every module that directly owns trainable parameters gets a norm rule
(gradnoise.layers). A forward hook records each call's inputs and a tensor
hook on its output receives the output gradient; the rule turns them into
per-sample norms as soon as backward has passed the module, so no
activation is held longer than autograd holds it. nn.Linear layers with
positions (T > 1), convolutions and normalisation layers instead run their backward
through the fused kernel, which computes the weight gradient and the norms
in one pass; a Linear layer with 2-D input keeps autograd's backward, its
norms ‖dy_i‖²‖x_i‖² costing one pass over x and dY.
Parameters shared between modules, and modules called several times, are
summed over uses before squaring, at the end of backward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import layers
from .backward import _BackwardHooks
from .forward import _ForwardHooks
from ..model_structure import BATCHNORM_TYPES
from .plan import _Planning, _Tracked
from .results import _Results
from .step import _Step


class GradNoiseTracker(_Planning, _ForwardHooks, _BackwardHooks, _Results):
    """Per-sample (and per-layer) squared gradient norms of `model`.

    Args:
        model: the module to measure. The batch dimension is dim 0 of every
            tracked module's input. The tracker plans from the model's
            parameters: build it after anything that replaces them (FSDP2's
            fully_shard, whose sharded model it measures on each rank's samples).
        loss_reduction: "mean" or "sum", how the loss combines the samples.
        layers: "all"; "norm" (LayerNorm, RMSNorm and GroupNorm only, and
            module classes without a rule whose name ends in "Norm" or
            "LayerNorm", such as LlamaRMSNorm: the cheap proxy of Gray et al.
            2024); or a callable (name, module) -> bool choosing the modules
            to measure.
        unsupported: what to do with a module that owns trainable parameters
            but has no rule: "fallback" (exact per-sample gradients by
            torch.func, slower; see `fallback_modules`), "error", or "skip"
            (leave it out; see `skipped_modules`).
        fused_backward: let nn.Linear layers, zero-padded convolutions and
            the linear calls of module classes without a rule (GPT-2's
            Conv1D) compute their weight gradient with the fused kernel, which yields
            the norms for the cost of the kernel's epilogue. Their weight
            gradients then equal autograd's to float rounding (the sum runs
            in another order); False keeps autograd's backward bit for bit
            and computes the norms in a second pass.
        attach: install the hooks now (default); False only plans, e.g. to
            read `fallback_modules` before deciding to measure.

    Constructing the tracker plans which modules it measures and how
    (`fallback_modules`, `fused_modules`, ...) and, unless attach=False,
    attaches it; `attach()` and `detach()` are
    idempotent; `with tracker:` attaches on entry and detaches on exit.
    Every forward of the model with gradients enabled starts a new
    measurement of its training-mode modules, and the next backward
    completes it.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean",
                 layers: str | Callable[[str, nn.Module], bool] = "all",
                 unsupported: str = "fallback", fused_backward: bool = True,
                 attach: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradNoiseTracker: `model` must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"GradNoiseTracker: `loss_reduction` must be 'mean' or 'sum', "
                             f"got {loss_reduction!r}")
        if not (layers in ("all", "norm") or callable(layers)):
            raise ValueError(f"GradNoiseTracker: `layers` must be 'all', 'norm' or a callable "
                             f"(name, module) -> bool, got {layers!r}")
        if unsupported not in ("fallback", "error", "skip"):
            raise ValueError(f"GradNoiseTracker: `unsupported` must be 'fallback', 'error' or "
                             f"'skip', got {unsupported!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self._layers = layers
        self._unsupported = unsupported
        self._fused_backward = bool(fused_backward)
        self._tracked: list[_Tracked] = []
        self.fallback_modules: list[str] = []
        #: {module name: why it is measured by the torch.func fallback}
        self.fallback_reasons: dict[str, str] = {}
        self.skipped_modules: list[str] = []
        self._handles: list = []
        self._attached = False
        self._step: _Step | None = None
        self._results: tuple[list[str], torch.Tensor | None, float] | None = None
        self._unmeasured: str | None = None
        self._eval_forward = False
        #: backward passes measured so far
        self.steps_measured = 0
        self._suspended = False
        self._borrowers_running: list = []   # modules measuring lent parameters, running now
        # the first measured forward is checked for uses of tracked parameters
        # outside the modules that measure them (layers.outside_uses)
        self._outside_check_pending = True
        #: while True, forward passes start no measurement: the step runs as
        #: without the tracker (GradientNoiseScale(interval=k) pauses its own).
        self.paused = False
        self._check_batchnorm()
        self._plan()
        if attach:
            self.attach()

    # ------------------------------------------------------------ attach/detach
    def attach(self) -> "GradNoiseTracker":
        """Install the hooks (no-op if attached)."""
        if self._attached:
            return self
        self._attached = True
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward,
                                                                      with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(
                self._on_model_forward_end, always_call=True))
            for module in self.model.modules():
                if isinstance(module, BATCHNORM_TYPES):
                    self._handles.append(module.register_forward_pre_hook(
                        lambda m, args: self._on_batchnorm_forward(m)))
            for name in sorted({u for t in self._tracked for u in t.lent.values()}):
                # while a module that measures lent parameters runs, their
                # uses are its own, not its lender's
                borrower = self.model.get_submodule(name)
                self._handles.append(borrower.register_forward_pre_hook(
                    lambda m, args: self._borrowers_running.append(m) and None))
                self._handles.append(borrower.register_forward_hook(
                    lambda m, args, out: self._borrowers_running.pop() and None,
                    always_call=True))
            for t in self._tracked:
                if t.capture:
                    self._handles.append(t.module.register_forward_pre_hook(
                        lambda m, args, t=t: self._on_capture_start(t)))
                if t.fused:
                    layers.fused_backward.install_tracked_forward(t.module, t.rule, self, t.name)
                else:
                    self._handles.append(t.module.register_forward_hook(
                        lambda m, args, kwargs, out, t=t: self._on_forward(t, args, kwargs, out),
                        with_kwargs=True))
        except Exception:
            self.detach()
            raise
        return self

    def detach(self) -> "GradNoiseTracker":
        """Remove every hook and restore every module (no-op if detached).
        The last measured step stays readable."""
        if not self._attached:
            return self
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for t in self._tracked:
            if t.fused and layers.fused_backward.installed_sink(t.module) is self:
                layers.fused_backward.remove_tracked_forward(t.module)
        self._step = None
        self._attached = False
        return self

    # ------------------------------------------- loops that never call the model
    def begin_forward(self, batch_size: int) -> None:
        """Open a measured step as a call of the model would, for loops that
        run the model's submodules without calling the model itself (a
        LightningModule's training_step): its tracked modules' calls until
        `end_forward` are the step's, for `batch_size` samples. A call of the
        model in between opens its own step, as always."""
        if self._attached:
            self._on_model_forward(self.model, (torch.empty(int(batch_size), 0),), {})

    def end_forward(self, output=None) -> None:
        """Close the step `begin_forward` opened, before its backward;
        `output` (the loss, say) is checked for parameters used outside the
        modules that measure them."""
        if self._attached:
            self._on_model_forward_end(self.model, (), output)

    def __getstate__(self) -> dict:
        # A copy of a tracked model (deepcopy, pickling) copies its hooks and
        # so this tracker: without the step in progress, whose tensors belong
        # to the original's autograd graph.
        state = self.__dict__.copy()
        state["_step"] = None
        return state

    def __enter__(self) -> "GradNoiseTracker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._attached
