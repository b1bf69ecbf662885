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

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import layers
from .layers import batching
from .layers.base import Call, NormRule, batch_size_of

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_NORM_CLASS_ENDINGS = ("Norm", "LayerNorm", "RMSNorm", "GroupNorm", "NormLayer")
# Memory allowed for one chunk of materialised per-sample gradients of a
# shared parameter (each use's and their sum are alive at once), or of the
# [b, T_u, T_v] products of its cross terms: small, so that a tied
# embedding adds little to the step's peak memory.
_SHARED_CHUNK_BYTES = 2 * 2**20
_UNMEASURABLE = (
    "GradNoiseTracker: the last backward ran with create_graph=True (a gradient penalty, "
    "Hessian-vector products), which is not measured: the norms would miss the gradient "
    "that flows through the differentiated graph. Gradients are unaffected. Pause the "
    "tracker (tracker.paused = True) around such passes, or read results after an "
    "ordinary backward.")


@dataclass
class _Tracked:
    """A module that directly owns trainable parameters, and how it is measured."""
    name: str
    module: nn.Module
    rule: NormRule
    own: list[str]                   # its trainable parameters measured here
    shared: list[str]                # ... of which shared with another module
    fallback: bool = False
    fused: bool = False              # backward runs through the rule's fused op
    # no rule: measured from the functional calls of its forward (layers.functional)
    # while they are all ones that the built-in rules cover, else by the fallback
    capture: bool = False
    # {parameter name: module inside it that measures it}: parameters it owns
    # but lends to a module inside it (BERT's LM head and its decoder's bias);
    # its own forward must not use them (checked while it is captured)
    lent: dict = field(default_factory=dict)


@dataclass
class _Step:
    """What one training step has recorded so far."""
    #: B, dim 0 of the model's input (layers.batching); None if it has no tensor input
    batch_size: int | None = None
    #: the watch over the forward's functional calls (layers.watch), and over the
    #: tensors shared by every sample, from the first call on such an input (layers.broadcast)
    watch: object = field(default_factory=lambda: layers.watch.ForwardWatch())
    #: the check of this forward for uses outside the measuring modules, if it runs one
    outside: object = None
    shared: object = None
    # id(module) -> the ParameterUses of its calls in progress / of its measured calls
    capturing: dict[int, list] = field(default_factory=dict)
    uses: dict[int, list] = field(default_factory=dict)
    # hooks on captured modules' parameters, removed at the end of the step
    param_hooks: list = field(default_factory=list)
    calls: dict[int, list[Call]] = field(default_factory=dict)      # id(module) -> calls
    pending: dict[int, int] = field(default_factory=dict)           # id(call) -> grads awaited
    norms: dict[str, torch.Tensor] = field(default_factory=dict)    # layer -> raw [B]
    batch: dict[str, int] = field(default_factory=dict)             # layer -> B seen
    # id(module) -> Σ ‖G_i‖² of its one, shared, parameter over this step's
    # single call, from the fused backward (the cross terms come at the end)
    shared_own: dict[int, torch.Tensor] = field(default_factory=dict)
    # id(module) -> the factor of such a call whose output gradient was not
    # kept (layers.shared.gathered_dense)
    shared_factors: dict[int, object] = field(default_factory=dict)
    callback_queued: bool = False
    # why this step's backward cannot be measured (a create_graph backward)
    unmeasurable: str | None = None
    # ids of the model's parameters and buffers, taken at its first fallback call
    state_ids: set | None = None
    # set when its backward has ended: a further backward through the same
    # graph (retain_graph=True) is not measured
    finished: bool = False


class GradNoiseTracker:
    """Per-sample (and per-layer) squared gradient norms of `model`.

    Args:
        model: the module to measure. The batch dimension is dim 0 of every
            tracked module's input.
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

    Constructing the tracker attaches it; `attach()` and `detach()` are
    idempotent; `with tracker:` attaches on entry and detaches on exit.
    Every forward of the model with gradients enabled starts a new
    measurement of its training-mode modules, and the next backward
    completes it.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean",
                 layers: str | Callable[[str, nn.Module], bool] = "all",
                 unsupported: str = "fallback", fused_backward: bool = True):
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
        self.attach()

    # ------------------------------------------------------------------ setup
    def _batchnorm_mixing(self) -> list[tuple[str, nn.Module]]:
        """BatchNorm modules that normalise with the batch's statistics: in
        train mode, or in eval mode without running statistics."""
        return [(n, m) for n, m in self.model.named_modules()
                if isinstance(m, _BATCHNORM_TYPES) and _mixes_samples(m)]

    def _check_batchnorm(self) -> None:
        offending = self._batchnorm_mixing()
        if offending:
            raise ValueError(_batchnorm_message(offending))

    def _selected(self, name: str, module: nn.Module, rule: NormRule | None) -> bool:
        if self._layers == "all":
            return True
        if self._layers == "norm":
            return counts_as_norm_layer(module)
        return bool(self._layers(name, module))

    def _plan(self) -> None:
        # id(trainable parameter) -> names of the modules that own it
        owners: dict[int, list[str]] = {}
        for name, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), []).append(name)
        claimed: set[int] = set()
        for name, module in self.model.named_modules():
            if id(module) in claimed:
                continue
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            rule = layers.find_rule(module)
            if layers.fused_backward.replaced_forward(module):
                # A forward replaced on the instance computes what its owner
                # wrote, which the type's rule does not describe.
                rule = None
            for child in getattr(rule, "claims_children", ()):
                sub = module.get_submodule(child)
                claimed.add(id(sub))
                own += [f"{child}.{n}" for n, p in sub.named_parameters(recurse=False)
                        if p.requires_grad]
            if not own:
                continue
            if not self._selected(name, module, rule):
                continue
            fallback = False
            if rule is None:
                if self._unsupported == "skip":
                    self.skipped_modules.append(name)
                    continue
                if self._unsupported == "error":
                    raise ValueError(
                        f"GradNoiseTracker: module '{name}' ({type(module).__name__}) has trainable "
                        f"parameters {own} but no norm rule. Register one with "
                        "gradnoise.layers.register_rule, or pass unsupported='fallback' (exact, "
                        "slower) or unsupported='skip' (leave it out).")
                rule, fallback = layers.GENERIC_RULE, True
            if parametrize.is_parametrized(module) or isinstance(
                    module, parametrize.ParametrizationList):
                raise ValueError(
                    f"GradNoiseTracker: module '{name}' ({type(module).__name__}) is parametrized "
                    "(torch.nn.utils.parametrize, e.g. weight_norm), which is not supported. "
                    "Remove the parametrization (parametrize.remove_parametrizations), or leave "
                    "the module out with layers=.")
            if not fallback:
                rule.check(module, name)
            self._tracked.append(_Tracked(name, module, rule, own, [], fallback, capture=fallback))
        self._subtree_params_to_fallbacks(owners)
        for t in self._tracked:
            t.shared = [n for n in t.own if len(owners[id(t.module.get_parameter(n))]) > 1]
            if t.capture and t.shared:
                self._stop_capture(t, "shares a parameter with another module: measured by "
                                      "re-running its forward")
            # (another attached tracker's fused forward stays: this one uses hooks)
            t.fused = (self._fused_backward and getattr(t.rule, "replaces_backward", False)
                       and t.rule.supports_fused_backward(t.module) and not t.shared
                       and layers.fused_backward.installed_sink(t.module) is None)
        self._check_shared_with_untracked(owners)
        self._by_module = {id(t.module): t for t in self._tracked}
        self._module_order = {n: k for k, (n, _) in enumerate(self.model.named_modules())}
        # Each shared parameter is reported under its first owner.
        self._shared_params: dict[int, list[tuple[_Tracked, str]]] = {}
        for t in self._tracked:
            for pname in t.shared:
                p = t.module.get_parameter(pname)
                self._shared_params.setdefault(id(p), []).append((t, pname))
        # Shared weights whose every use has factors (Linear, Embedding) are
        # measured from them (gradnoise.layers.shared); a use whose only
        # parameter is that weight (a tied LM head) keeps its fused backward,
        # which gives the use's own term with the weight gradient.
        self._factored = {pid for pid, uses in self._shared_params.items()
                          if all(t.rule.factor_kind and pname in t.rule.factorable
                                 for t, pname in uses)}
        for t in self._tracked:
            if (t.shared and t.own == t.shared and len(t.own) == 1 and self._fused_backward
                    and getattr(t.rule, "replaces_backward", False)
                    and t.rule.supports_fused_backward(t.module)
                    and id(t.module.get_parameter(t.own[0])) in self._factored):
                t.fused = True

    def _stop_capture(self, t: _Tracked, why: str) -> None:
        """Measure a module without a rule by the torch.func fallback from now on."""
        if t.lent:
            # (the fallback would not cover the lent parameters' uses in its forward)
            raise RuntimeError(
                f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) cannot be "
                f"measured from its functional calls ({why}), and the torch.func fallback cannot "
                f"measure it either: it shares {sorted(t.lent)} with "
                f"{sorted(set(t.lent.values()))} inside it. Leave it out with `layers=`, or use "
                "the micro-batch noise source.")
        t.capture = False
        t.rule.check(t.module, t.name)
        self.fallback_modules.append(t.name)
        self.fallback_reasons[t.name] = why

    def _subtree_params_to_fallbacks(self, owners: dict[int, list[str]]) -> None:
        """A parameter that a module without a rule owns and a module inside
        it owns too (BERT's and RoBERTa's LM heads hold the bias of their
        decoder Linear) is measured once. A captured module lends it to the
        module inside, which measures its uses there; the capture checks that
        its own forward does not use it directly. A fallback module measures
        it alone: re-running the module's forward covers every use inside it,
        so a use measured again inside would be counted twice."""
        for t in [t for t in self._tracked if t.fallback]:
            inside = t.name + "." if t.name else ""
            for u in self._tracked:
                if u is t or not u.name.startswith(inside):
                    continue
                ids = {id(t.module.get_parameter(n)): n for n in t.own}
                common = [n for n in u.own if id(u.module.get_parameter(n)) in ids]
                if not common:
                    continue
                if t.capture:
                    for n in common:
                        pid = id(u.module.get_parameter(n))
                        t.lent[ids[pid]] = u.name
                        t.own.remove(ids[pid])
                        owners[pid].remove(t.name)
                    continue
                u.own = [n for n in u.own if n not in common]
                for n in common:
                    owners[id(u.module.get_parameter(n))].remove(u.name)
        self._tracked = [t for t in self._tracked if t.own or t.lent]

    def _check_shared_with_untracked(self, users: dict[int, list[str]]) -> None:
        """A tracked parameter that another, untracked module also uses would
        be measured from part of its gradient: refused."""
        measured: dict[int, set[str]] = {}
        for t in self._tracked:
            for pname in t.own:
                owner = t.name if "." not in pname else (
                    f"{t.name}.{pname.rsplit('.', 1)[0]}" if t.name else pname.rsplit(".", 1)[0])
                measured.setdefault(id(t.module.get_parameter(pname)), set()).add(owner)
        for pid, names in measured.items():
            missing = [n for n in users[pid] if n not in names]
            if missing:
                raise ValueError(
                    f"GradNoiseTracker: a parameter of {sorted(names)} is also used by "
                    f"{missing}, which this tracker does not measure ({self._why_untracked()}); its "
                    "per-sample gradient is the sum over every use. Measure all of them (add them "
                    "to `layers`, or register a rule) or none.")

    def _why_untracked(self) -> str:
        why = [f"layers={self._layers!r}" if isinstance(self._layers, str) else "layers="]
        if self.skipped_modules:
            why.append("unsupported='skip'")
        return " or ".join(why)

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
                if isinstance(module, _BATCHNORM_TYPES):
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

    # ------------------------------------------------------------------ hooks
    def _measuring(self) -> bool:
        # Every call in a measured step counts, modules in eval mode included
        # (their parameters get gradients all the same). Nothing is measured
        # inside torch.func transforms (vmap, grad, ...): those are someone
        # else's per-sample computations.
        return (self._step is not None and not self._step.finished and not self._eval_forward
                and not self._suspended and torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active())

    def _on_model_forward(self, model, args, kwargs) -> None:
        # A model may keep some submodules (e.g. BatchNorm) in eval mode while
        # the rest trains: the step is measured if any tracked module trains,
        # and then every tracked call counts. A forward in eval mode captures
        # nothing (it may come between a training forward and its backward);
        # the flag holds until the next forward of the model.
        self._eval_forward = False
        if self.paused:
            self._step = None
            return
        if not (torch.is_grad_enabled() and not self._suspended
                and not torch._C._are_functorch_transforms_active()):
            return
        if model.training or any(t.module.training for t in self._tracked):
            self._step = _Step(batch_size=batching.model_batch_size(args, kwargs))
            if self._outside_check_pending:
                self._step.outside = layers.outside_uses.OutsideUses(self._measured_by(), model)
        else:
            self._eval_forward = True

    def _on_model_forward_end(self, model, args, out) -> None:
        if self._step is None:
            return
        self._step.watch.leave()
        check, self._step.outside = self._step.outside, None
        if check is None:
            return
        found = check.find(_tensors(out)) if out is not None else None
        if found == []:
            self._outside_check_pending = False
        if found:
            uses = "; ".join(f"'{name}' by an op whose backward is {op}"
                             for name, op in dict.fromkeys(found))
            raise RuntimeError(
                f"GradNoiseTracker: parameters are used outside the forward of the modules that "
                f"measure them ({uses}), so part of their per-sample gradients would be missed. "
                "Use a parameter only inside a module that owns it (call the module, or register "
                "a rule for the module that uses it: gradnoise.layers.register_rule), leave it "
                "out with `layers=`, or use the micro-batch noise source.")

    def _measured_by(self) -> dict[int, tuple[str, list[nn.Module]]]:
        """id(tracked parameter) -> (its qualified name, the modules that measure it)."""
        measured: dict[int, tuple[str, list[nn.Module]]] = {}
        for t in self._tracked:
            for n in t.own:
                p = t.module.get_parameter(n)
                name = f"{t.name}.{n}" if t.name else n
                measured.setdefault(id(p), (name, []))[1].append(t.module)
        return measured

    def _on_batchnorm_forward(self, module: nn.Module) -> None:
        if self._measuring() and _mixes_samples(module):
            raise RuntimeError(_batchnorm_message(self._batchnorm_mixing()))

    def _on_capture_start(self, t: _Tracked) -> None:
        # (a forward re-run inside backward, by activation checkpointing, feeds no gradient
        # to its outputs' hooks: it is not watched)
        if not (t.capture and self._measuring()) or torch._C._current_graph_task_id() != -1:
            return
        step = self._step
        if step.batch_size is None:
            self._stop_capture(t, "the model's forward has no tensor input to read the batch from")
            return
        if id(t.module) not in step.uses:
            step.uses[id(t.module)] = []
            for n in t.own:
                step.param_hooks.append(t.module.get_parameter(n).register_hook(
                    lambda g, n=n: self._on_captured_param_grad(step, t, n)))
        params = {n: t.module.get_parameter(n) for n in t.own}
        lent = {n: t.module.get_parameter(n) for n in t.lent}
        capture = layers.functional.ParameterUses(
            params, lent, lambda: not self._borrowers_running, step.batch_size,
            lambda cap, use, g: self._on_use_grad(step, t, cap, use, g),
            (lambda cap, use: self._on_fused_use(step, t, cap, use)) if self._fused_backward
            else None)
        step.capturing.setdefault(id(t.module), []).append(capture)
        step.watch.need().captures.append(capture)

    def _end_capture(self, t: _Tracked) -> bool:
        """At the end of a captured call: whether its uses measure it."""
        stack = self._step.capturing.get(id(t.module)) if self._step is not None else None
        if not stack:
            return False
        capture = stack.pop()
        watch = self._step.watch
        watch.captures.remove(capture)
        if not watch.captures and watch.shared is None:
            watch.leave()       # the rest of the forward runs without the mode
        if capture.lent_use is not None:
            name = capture.lent_use
            raise RuntimeError(
                f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) uses its "
                f"parameter '{name}' in its own forward, but '{t.lent[name]}' inside it also owns "
                "it and is measured from its own calls only, so part of the parameter's "
                "per-sample gradient would be missed. Leave one of the two out with `layers=`, or "
                "use the micro-batch noise source.")
        if capture.unsupported is not None:
            self._stop_capture(t, f"its forward calls {capture.unsupported} on its parameters")
            if self._step.uses[id(t.module)]:
                # an earlier call of this step was measured from its uses, which the
                # fallback cannot add to: this step is not measured (the next ones are)
                self._step.unmeasurable = (
                    f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) was called "
                    f"several times in the last step and one call fell back to re-running its "
                    f"forward ({self.fallback_reasons[t.name]}), so that step was not measured; "
                    "from the next step on every call is measured that way.")
            return False
        capture.armed = True
        self._step.uses[id(t.module)].extend(capture.uses)
        return True

    def _on_use_grad(self, step: _Step, t: _Tracked, capture, use, grad) -> None:
        if not capture.armed:
            return
        step = self._enter_backward(step)
        if step is None:
            return
        use.grad = grad
        if self._only_use(step, t, use):
            self._step_add(step, t, layers.functional.sq_norms(use, step.batch_size),
                           step.batch_size)
            use.release()
        # else at the end of backward, summed over the uses

    def _on_fused_use(self, step: _Step, t: _Tracked, capture, use):
        """Asked by a use run through the fused kernel, at its backward: a
        function that takes its norms if it is measured alone, else None."""
        if not capture.armed:
            return None
        step = self._enter_backward(step)
        if step is None or not self._only_use(step, t, use):
            return None

        def add(norms):
            self._step_add(step, t, norms, step.batch_size)
            use.release()
        return add

    @staticmethod
    def _only_use(step: _Step, t: _Tracked, use) -> bool:
        """Whether each parameter of `use` has no other use in the step."""
        uses = step.uses[id(t.module)]
        return all(sum(n in u.names() for u in uses) == 1 for n in use.names())

    def _on_captured_param_grad(self, step: _Step, t: _Tracked, name: str) -> None:
        if step.finished or not t.capture or step is not self._step:
            return
        if not any(name in u.names() for u in step.uses[id(t.module)]):
            raise RuntimeError(
                f"GradNoiseTracker: parameter '{name}' of module '{t.name}' "
                f"({type(t.module).__name__}) received a gradient through a call that gradnoise "
                "did not see (a custom autograd Function?), so its per-sample norms are unknown. "
                "Register a rule for the module (gradnoise.layers.register_rule), or leave it out "
                "with `layers=` or unsupported='skip'.")

    def _on_forward(self, t: _Tracked, args, kwargs, out):
        """Record the call (nothing to record if its functional calls measure it)."""
        if not self._measuring():
            return None
        if t.capture and self._end_capture(t):
            return None
        flat = _tensors(out)
        index = [k for k, o in enumerate(flat) if o.requires_grad]
        if not index:
            return None
        shared = frozenset()
        if isinstance(t.rule, layers.generic.GenericRule):
            # the model's own tensors passed as inputs: never per-sample
            state = self._step.state_ids
            if state is None:
                state = self._step.state_ids = ({id(p) for p in self.model.parameters()}
                                                | {id(b) for b in self.model.buffers()})
            shared = frozenset([k for k, a in enumerate(args) if _is_state(a, state)]
                               + [k for k, a in kwargs.items() if _is_state(a, state)])
        step = self._step
        B = step.batch_size
        kind = _call_layout(t, args, kwargs, shared, B)
        if kind not in (batching.BATCH, batching.ROWS):
            self._sink_shared_call(t.module, step, args, kwargs, shared, out, kind)
            return
        split = None
        if kind == batching.ROWS:
            args, kwargs = _split(args, shared, B), _split(kwargs, shared, B)
            split = B
        outs = [flat[k] for k in index]
        call = Call(args, kwargs, [None] * len(outs), index, shared)
        step.calls.setdefault(id(t.module), []).append(call)
        step.pending[id(call)] = len(outs)
        for k, o in enumerate(outs):
            o.register_hook(lambda g, t=t, call=call, k=k: self._on_grad(
                step, t, call, k, g if split is None else batching.split_rows(g, split)))

    def _sink_shared_call(self, module: nn.Module, step: _Step, args, kwargs, shared: frozenset,
                    out, kind: str | None) -> None:
        """Record a call whose input has no batch: its output is shared by every
        sample, and its per-sample output gradient is gathered where it meets
        the batch (layers.broadcast). The rule then sees the call as B calls
        on the same input: a [1, …] input expanded to [B, …], another one
        stacked B times (rules that work row by row only)."""
        t, B = self._by_module[id(module)], step.batch_size
        if torch._C._current_graph_task_id() != -1:
            return          # re-run inside backward (activation checkpointing): not watched
        where = f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__})"
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(
                f"{where} was called on an input shared by every sample of the batch and returns "
                "several tensors; only a module with one tensor output can be measured per "
                "sample then. Leave it out with `layers=`, or call it on the batch.")
        x = next(a for k, a in (*enumerate(args), *kwargs.items())
                 if isinstance(a, torch.Tensor) and k not in shared)
        rows = x.shape[0]
        if (kind is None and x.requires_grad
                and (step.shared is None or not step.shared.is_shared(x))):
            raise RuntimeError(
                f"{where} was called on a tensor computed from the batch whose dim 0 ({rows}) is "
                f"not the batch ({B}, dim 0 of the model's input): the batch dimension differs "
                "between this module's input and the model's. Per-sample norms need every tracked "
                "module to see the samples along dim 0; move the batch to dim 0 (e.g. "
                "batch_first=True) or leave the module out with `layers=`.")
        if kind == batching.BROADCAST and out.dim() > 0 and out.shape[0] == 1:
            args, kwargs = _expanded(args, shared, B), _expanded(kwargs, shared, B)
            shape = out.shape[1:]
        elif t.rule.rowwise:
            args, kwargs = _stacked(args, shared, B), _stacked(kwargs, shared, B)
            shape = out.shape
        else:
            raise RuntimeError(
                f"{where} was called on an input of {rows} rows along dim 0 in a batch of {B} "
                "samples; per-sample norms need each call of this module to see the batch along "
                "dim 0, or an input shared by every sample with dim 0 of size 1. Leave the "
                "module out with `layers=`, or use the micro-batch noise source.")
        calls = step.calls.setdefault(id(module), [])
        if None in calls:     # the placeholder of a fused-backward module's call
            calls.remove(None)
        call = Call(args, kwargs, [None], [0], shared)
        calls.append(call)
        step.pending[id(call)] = 1
        if step.shared is None:
            step.shared = step.watch.need().shared = layers.broadcast.SharedContributions(B)
        step.shared.add_root(out, layers.broadcast.SharedRoot(
            t.name, out, B, lambda g: self._on_grad(step, t, call, 0, g.reshape(B, *shape))))

    def _sink_wants(self, module: nn.Module, x: torch.Tensor) -> _Step | None:
        """Called by a fused-backward module's forward: the step that measures
        this call, or None if it is not measured."""
        if not self._measuring():
            return None
        self._step.calls.setdefault(id(module), []).append(None)
        return self._step

    def _queue_finish(self, step: _Step) -> None:
        if not step.callback_queued:
            step.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._finish(step))

    def _backward_step(self, step: _Step | None) -> _Step | None:
        """The step a call's backward adds to: `step`, the one its forward
        recorded into; None if that step's backward has ended (a second
        backward through the same graph is not measured) or the tracker was
        detached or paused since. A backward that also reaches an earlier
        forward of the model than the last one cannot be measured: error."""
        if step is None or step.finished or self._step is None:
            return None
        if step is not self._step:
            raise RuntimeError(
                "GradNoiseTracker: this backward runs through two forward passes of the model "
                "(e.g. a loss made of model(a) and model(b)); a measurement covers one forward. "
                "Make them one call of a module that runs both (track that module), or measure "
                "the passes with separate backward calls.")
        return step

    def _enter_backward(self, step: _Step | None) -> _Step | None:
        """Every backward hook's first call: the step it measures (its
        end-of-backward work queued), or None. A backward with
        create_graph=True is not measured, and marks its step so."""
        step = self._backward_step(step)
        if step is None:
            return None
        self._queue_finish(step)
        if torch.is_grad_enabled():
            step.unmeasurable = _UNMEASURABLE
            return None
        return step

    def _on_grad(self, step: _Step, t: _Tracked, call: Call, k: int,
                 grad: torch.Tensor) -> None:
        step = self._enter_backward(step)
        if step is None:
            return
        call.grad_outputs[k] = grad
        step.pending[id(call)] -= 1
        if step.pending[id(call)] == 0 and self._is_simple(step, t):
            self._step_add(step, t, self._rule_call(t, "sq_norms", [call], t.own),
                           batch_size_of([call]))
            step.calls[id(t.module)].remove(call)
            call.release()

    def _sink_backward(self, module: nn.Module, step: _Step | None, x: torch.Tensor, weight,
                        saved: tuple, grad_out: torch.Tensor, need_input_grad: bool,
                        need_weight: bool, need_bias: bool):
        """Backward of a fused-backward module's call, measured by `step`:
        (grad_x, grad_weight, grad_bias)."""
        step = self._enter_backward(step)
        t = self._by_module[id(module)]
        if step is not None and len(step.calls.get(id(module), [])) == 1:
            gx, gw, gb, norms = t.rule.fused_backward(module, x, weight, saved, grad_out, t.own,
                                                      need_input_grad)
            self._add_own(step, t, norms, x, grad_out)
        else:
            # Called several times: the per-sample gradient sums over calls,
            # so keep (x, dY) until the end of backward.
            if step is not None:
                self._keep_call(step, t, x, grad_out)
            gx, gw, gb = t.rule.plain_backward(module, x, weight, saved, grad_out,
                                               need_input_grad, need_weight, need_bias)
        return ((gx if need_input_grad else None), (gw if need_weight else None),
                (gb if need_bias else None))

    def _sink_watch_output(self, module: nn.Module, step: _Step, x: torch.Tensor,
                     out: torch.Tensor) -> None:
        """Forward of a fused-backward module's call, measured by `step`, that
        keeps autograd's backward: its norms will come from the gradient of `out`."""
        t = self._by_module[id(module)]
        # The hook lives as long as the graph, so it holds x only until it
        # has used it: autograd's own reference goes after the layer's backward.
        held = [x]
        out.register_hook(lambda grad_out: self._output_grad(step, t, held, grad_out))

    def _output_grad(self, step: _Step, t: _Tracked, held: list, grad_out: torch.Tensor) -> None:
        """Its norms now or, if the module was called several times, at the
        end of backward over all its calls."""
        if not held:
            return
        x = held.pop()
        step = self._enter_backward(step)
        if step is None:
            return
        if len(step.calls.get(id(t.module), ())) == 1:
            self._add_own(step, t, t.rule.norms_from_output_grad(t.module, x, grad_out, t.own),
                          x, grad_out)
        else:
            self._keep_call(step, t, x, grad_out)

    def _sink_unmeasurable(self, step: _Step | None) -> None:
        """Told by a fused-backward module of a backward with create_graph=True."""
        self._enter_backward(step)

    @staticmethod
    def _keep_call(step: _Step, t: _Tracked, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Keep a call's (x, dY) for the end of backward."""
        step.calls[id(t.module)].append(Call((x,), {}, [grad_out]))

    def _add_own(self, step: _Step, t: _Tracked, norms: torch.Tensor, x: torch.Tensor,
                 grad_out: torch.Tensor) -> None:
        """A single call's norms: the module's, or for a shared weight its own
        term, the call being kept for the cross terms at the end of backward."""
        if t.shared:
            step.shared_own[id(t.module)] = norms
            factor = self._gathered_factor(step, t, x, grad_out)
            if factor is None:
                self._keep_call(step, t, x, grad_out)
            else:
                step.shared_factors[id(t.module)] = factor
        else:
            self._step_add(step, t, norms, x.shape[0])

    def _gathered_factor(self, step: _Step, t: _Tracked, x: torch.Tensor,
                         grad_out: torch.Tensor):
        """For a Linear use of a tied weight whose other uses are Embeddings
        called once this step (a tied LM head), its factor with dY gathered at
        their tokens now, so that dY itself is not kept; else None."""
        if t.rule.factor_kind != "dense":
            return None
        tokens = {}
        for u, _ in self._shared_params[id(t.module.get_parameter(t.own[0]))]:
            if u is t:
                continue
            calls = [c for c in step.calls.get(id(u.module), []) if c is not None]
            if u.rule.factor_kind != "onehot" or len(calls) != 1:
                return None
            tokens[id(u.module)] = calls[0].args[0]
        return layers.shared.gathered_dense(x, grad_out, tokens) if tokens else None

    def _is_simple(self, step: _Step, t: _Tracked) -> bool:
        calls = step.calls.get(id(t.module), [])
        return not t.shared and len(calls) == 1

    # --------------------------------------------------------- end of backward
    def _finish(self, step: _Step) -> None:
        """Runs once at the end of each backward pass: deferred modules, shared
        parameters, batch-size check, loss-reduction scaling."""
        self._suspended = True
        try:
            if step.unmeasurable is not None:
                self._results, self._unmeasured = None, step.unmeasurable
                return
            for mid, calls in step.calls.items():
                calls = [c for c in calls if c is not None and any(
                    g is not None for g in c.grad_outputs)]
                if not calls:
                    continue
                t = self._by_module[mid]
                sizes = sorted({batch_size_of([c]) for c in calls})
                if len(sizes) > 1:
                    raise RuntimeError(
                        f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) was "
                        f"called with inputs of {sizes} rows along dim 0 in one step; per-sample "
                        "norms need every call of a tracked module to see the batch along dim 0 "
                        "(leave the module out with `layers=` if some calls do not).")
                unshared = [p for p in t.own if p not in t.shared]
                if unshared:
                    self._step_add(step, t, self._rule_call(t, "sq_norms", calls, unshared),
                                   sizes[0])
                step.batch.setdefault(t.name, sizes[0])
            for mid, uses in step.uses.items():
                left = [u for u in uses if not u.done and u.grad is not None]
                if left:
                    t = self._by_module[mid]
                    self._step_add(step, t, layers.functional.several_uses_sq_norms(
                        left, step.batch_size), step.batch_size)
            self._finish_shared(step)
            self._results, self._unmeasured = self._scaled(step), None
            self.steps_measured += 1
        finally:
            for calls in step.calls.values():
                for c in calls:
                    if c is not None:
                        c.release()
            self._suspended = False
            step.watch.leave()
            for h in step.param_hooks:
                h.remove()
            step.param_hooks.clear()
            step.uses.clear()
            step.calls.clear()
            step.pending.clear()
            step.shared_own.clear()
            step.shared_factors.clear()
            step.finished = True
            step.callback_queued = False
            step.norms = {}

    @staticmethod
    def _rule_call(t: _Tracked, method: str, *args):
        """A rule's method on the module's recorded calls; an error of the
        torch.func fallback (which knows no names) is given the module's."""
        try:
            return getattr(t.rule, method)(t.module, *args)
        except (ValueError, RuntimeError) as e:
            if not isinstance(t.rule, layers.generic.GenericRule):
                raise
            raise type(e)(f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}): "
                          f"{e}") from e

    def _step_add(self, step: _Step, t: _Tracked, norms, batch: int) -> None:
        """Add a rule's [B] result (or {child: [B]}) to the step's per-layer sums."""
        parts = norms if isinstance(norms, dict) else {"": norms}
        for child, n in parts.items():
            name = t.name if not child else (f"{t.name}.{child}" if t.name else child)
            step.batch[name] = batch
            if n.dtype != torch.float32:
                n = n.float()
            step.norms[name] = n if name not in step.norms else step.norms[name] + n

    def _finish_shared(self, step: _Step) -> None:
        for pid, uses in self._shared_params.items():
            owner, _ = uses[0]
            recorded = []
            for t, pname in uses:
                calls = [c for c in step.calls.get(id(t.module), [])
                         if c is not None and any(g is not None for g in c.grad_outputs)]
                factor = step.shared_factors.pop(id(t.module), None)
                if calls or factor is not None:
                    recorded.append((t, pname, calls, factor))
            if not recorded:
                continue
            first = recorded[0]
            B = first[3].z.shape[0] if first[3] is not None else batch_size_of(first[2])
            if pid in self._factored:
                total = self._factored_sq_norms(step, recorded)
            else:
                total = self._materialised_sq_norms(owner.module.get_parameter(uses[0][1]),
                                                    recorded, B)
            self._step_add(step, owner, total, B)

    def _factored_sq_norms(self, step: _Step, recorded) -> torch.Tensor:
        """Σ_u ‖G_i^u‖² + 2 Σ_{u<v} ⟨G_i^u, G_i^v⟩ over the uses (layers.shared)."""
        factors, total = [], None
        for t, pname, calls, factor in recorded:
            own = step.shared_own.pop(id(t.module), None)
            if own is None:
                own = t.rule.sq_norms(t.module, calls, [pname])
            own = own.float() if own.dtype != torch.float64 else own
            total = own if total is None else total + own
            if factor is None:
                factor = t.rule.factor(t.module, calls, pname)
            factor.key = id(t.module)
            factors.append(factor)
        for k, u in enumerate(factors):
            for v in factors[k + 1:]:
                total = total + 2 * layers.shared.cross_sq_norms(u, v, _SHARED_CHUNK_BYTES)
        return total

    def _materialised_sq_norms(self, param: torch.Tensor, recorded, B: int) -> torch.Tensor:
        """‖Σ_u G_i^u‖² from per-sample gradients, in chunks of samples."""
        chunk = max(1, _SHARED_CHUNK_BYTES // max(1, 4 * param.numel()))
        total = torch.zeros(B, dtype=torch.float32, device=param.device)
        for start in range(0, B, chunk):
            sl = slice(start, min(B, start + chunk))
            acc = None
            for t, pname, calls, _ in recorded:
                g = self._rule_call(t, "per_sample_grads", calls, [pname], sl)[pname]
                acc = g if acc is None else acc + g
            total[sl] = acc.flatten(1).square().sum(1)
        return total

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
        if any(name not in order for name in step.norms):
            order = self._module_order = {n: k for k, (n, _) in
                                          enumerate(self.model.named_modules())}
        names = sorted(step.norms, key=order.__getitem__)
        if not names:
            return names, None, 1.0
        matrix = torch.stack([step.norms[n] for n in names])
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
        from .verify import verify
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


def _tensors(out) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return list(itertools.chain.from_iterable(_tensors(o) for o in out))
    if isinstance(out, dict):
        return list(itertools.chain.from_iterable(_tensors(o) for o in out.values()))
    return []


def _call_layout(t: _Tracked, args, kwargs, shared: frozenset, B: int | None) -> str | None:
    """The batch layout (layers.batching) of a call's first per-sample tensor
    input; ROWS only for rules whose module works row by row."""
    inputs = [a for k, a in (*enumerate(args), *kwargs.items())
              if isinstance(a, torch.Tensor) and k not in shared]
    if not inputs:
        return batching.BATCH
    kind = batching.layout(inputs[0], B)
    if kind == batching.ROWS and not t.rule.rowwise:
        raise RuntimeError(
            f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) was called on the "
            f"batch of {B} samples reshaped into {inputs[0].shape[0]} rows; its rule cannot tell "
            "which rows belong to which sample. Call it on [B, …] input, or leave it out with "
            "`layers=`.")
    return kind


def _expanded(values, shared: frozenset, B: int):
    """Per-sample tensor inputs with dim 0 of size 1 expanded to B."""
    if isinstance(values, dict):
        return {k: v if k in shared else batching.expand_to(v, B) for k, v in values.items()}
    return tuple(v if k in shared else batching.expand_to(v, B) for k, v in enumerate(values))


def _stacked(values, shared: frozenset, B: int):
    """Per-sample tensor inputs stacked B times (a view)."""
    def stack(v):
        return v.unsqueeze(0).expand(B, *v.shape) if isinstance(v, torch.Tensor) else v
    if isinstance(values, dict):
        return {k: v if k in shared else stack(v) for k, v in values.items()}
    return tuple(v if k in shared else stack(v) for k, v in enumerate(values))


def _split(values, shared: frozenset, B: int):
    """Per-sample tensor inputs of B·k rows as [B, k, …]."""
    if isinstance(values, dict):
        return {k: v if k in shared else batching.split_rows(v, B) for k, v in values.items()}
    return tuple(v if k in shared else batching.split_rows(v, B) for k, v in enumerate(values))


def counts_as_norm_layer(module: nn.Module) -> bool:
    """What layers="norm" measures: LayerNorm, RMSNorm, GroupNorm, and module
    classes without a rule named like them (LlamaRMSNorm, T5LayerNorm, …),
    measured from their calls."""
    rule = layers.find_rule(module)
    if rule is None:
        return type(module).__name__.endswith(_NORM_CLASS_ENDINGS)
    return rule.is_norm_layer


def _mixes_samples(batchnorm: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the batch's statistics."""
    return (batchnorm.training or not batchnorm.track_running_stats
            or batchnorm.running_mean is None)


def _is_state(value, state_ids: set) -> bool:
    """Whether `value` is one of the model's parameters or buffers, or a view
    of one (a slice of a mask buffer, say)."""
    return isinstance(value, torch.Tensor) and (
        id(value) in state_ids or (value._base is not None and id(value._base) in state_ids))




def _batchnorm_message(offending) -> str:
    listed = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in offending)
    return (
        f"GradNoiseTracker: BatchNorm in train mode mixes the samples of a batch, so per-sample "
        f"gradients do not exist for this model: {listed}. Put these modules in eval mode "
        f"(module.eval(): running statistics, supported), replace them with GroupNorm or "
        f"LayerNorm, or measure the noise scale from micro-batches instead of per-sample norms.")
