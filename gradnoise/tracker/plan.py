"""Planning: which modules the tracker measures, by which rule, and how
(fused backward, captured calls, the torch.func fallback, shared and lent
parameters), from the model alone (docs/design.md §6)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from .. import layers
from ..layers.base import NormRule
from ..model_structure import batchnorm_mixing, parameter_owners

_NORM_CLASS_ENDINGS = ("Norm", "LayerNorm", "RMSNorm", "GroupNorm", "NormLayer")


@dataclass
class _Tracked:
    """A module that directly owns trainable parameters, and how it is measured."""
    name: str
    module: nn.Module
    rule: NormRule
    own: list[str]                   # its trainable parameters measured here
    tied: list[str]                  # ... of which another module holds too (tied)
    fallback: bool = False
    fused: bool = False              # backward runs through the rule's fused op
    # no rule: measured from the functional calls of its forward (layers.functional)
    # while they are all ones that the built-in rules cover, else by the fallback
    capture: bool = False
    # {parameter name: module inside it that measures it}: parameters it owns
    # but lends to a module inside it (BERT's LM head and its decoder's bias);
    # its own forward must not use them (checked while it is captured)
    lent: dict = field(default_factory=dict)
    # {name in `own`: id of the parameter at planning}: the key of the
    # tracker's maps by parameter. While the model runs, a module may hold
    # other objects for them (FSDP2's fully_shard swaps unsharded parameters
    # in for each forward and backward)
    param_ids: dict = field(default_factory=dict)




class _Planning:
    """GradNoiseTracker's planning (a mixin: the state is the tracker's)."""

    # ------------------------------------------------------------------ setup
    def _check_batchnorm(self) -> None:
        offending = batchnorm_mixing(self.model)
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
        owners = parameter_owners(self.model)
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
            t.tied = [n for n in t.own if len(owners[id(t.module.get_parameter(n))]) > 1]
            if t.capture and t.tied:
                self._stop_capture(t, "shares a parameter with another module: measured by "
                                      "re-running its forward")
            # (another attached tracker's fused forward stays: this one uses hooks)
            t.fused = (self._fused_backward and getattr(t.rule, "replaces_backward", False)
                       and t.rule.supports_fused_backward(t.module) and not t.tied
                       and layers.fused_backward.installed_sink(t.module) is None)
        self._check_shared_with_untracked(owners)
        for t in self._tracked:
            t.param_ids = {n: id(t.module.get_parameter(n)) for n in t.own}
        self._by_module = {id(t.module): t for t in self._tracked}
        self._module_order = {n: k for k, (n, _) in enumerate(self.model.named_modules())}
        # Each shared parameter is reported under its first owner.
        self._tied_params: dict[int, list[tuple[_Tracked, str]]] = {}
        for t in self._tracked:
            for pname in t.tied:
                p = t.module.get_parameter(pname)
                self._tied_params.setdefault(id(p), []).append((t, pname))
        # Shared weights whose every use has factors (Linear, Embedding) are
        # measured from them (gradnoise.layers.tied); a use whose only
        # parameter is that weight (a tied LM head) keeps its fused backward,
        # which gives the use's own term with the weight gradient.
        self._factored = {pid for pid, uses in self._tied_params.items()
                          if all(t.rule.factor_kind and pname in t.rule.factorable
                                 for t, pname in uses)}
        for t in self._tracked:
            if (t.tied and t.own == t.tied and len(t.own) == 1 and self._fused_backward
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


def counts_as_norm_layer(module: nn.Module) -> bool:
    """What layers="norm" measures: LayerNorm, RMSNorm, GroupNorm, and module
    classes without a rule named like them (LlamaRMSNorm, T5LayerNorm, …),
    measured from their calls."""
    rule = layers.find_rule(module)
    if rule is None:
        return type(module).__name__.endswith(_NORM_CLASS_ENDINGS)
    return rule.is_norm_layer


def _batchnorm_message(offending) -> str:
    listed = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in offending)
    return (
        f"GradNoiseTracker: BatchNorm in train mode mixes the samples of a batch, so per-sample "
        f"gradients do not exist for this model: {listed}. Put these modules in eval mode "
        f"(module.eval(): running statistics, supported), replace them with GroupNorm or "
        f"LayerNorm, or measure the noise scale from micro-batches instead of per-sample norms.")
