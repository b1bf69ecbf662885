"""What a per-layer norm rule is, and the registry that maps module types to rules.

A rule turns what the tracker recorded for one module during a step (its
inputs and its output gradients, for every call) into, for each sample i,
‖∂ℓ_i/∂θ‖² over the module's own trainable parameters θ (docs/design.md §1).
Rules see raw output gradients (of the loss as the user reduced it); the
tracker undoes the loss reduction afterwards.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from .calls import Call
from .torch_func import per_sample_grads_by_torch_func


class NormRule(ABC):
    """Per-sample squared gradient norms of one module type's own parameters.

    Subclasses implement `sq_norms` (the fast path, used when none of the
    module's parameters is shared with another module) and may override
    `per_sample_grads` (chunks of materialised per-sample gradients, used for
    parameters that are shared, whose per-sample gradient must be summed over
    every use before it is squared). A rule whose gradient factors as
    Aᵀ Z (gradnoise.layers.tied) lists those parameters in `factorable`,
    names the kind in `factor_kind` and defines
    `factor(module, calls, param) -> shared.Factor`; a parameter shared only
    by such uses is then measured from the factors instead.
    """

    #: counted by GradNoiseTracker(layers="norm")
    is_norm_layer = False
    #: the module treats each row along dim 0 (and each position) on its own,
    #: so a call on the batch reshaped into rows can be measured (layers.batching)
    rowwise = False
    #: children whose parameters this rule measures (their forward never runs)
    claims_children: tuple = ()
    #: parameters with factors, and their kind ("dense" or "onehot")
    factorable: tuple = ()
    factor_kind: str | None = None

    def check(self, module: nn.Module, name: str) -> None:
        """Raise if this module's configuration is not supported."""

    @abstractmethod
    def sq_norms(self, module: nn.Module, calls: list[Call], params: list[str]):
        """float32 [B]: Σ over `params` of ‖per-sample gradient‖², summed over calls
        before squaring; or {child name ("" for the module): [B]} for a rule
        that claims children."""

    def per_sample_grads(self, module: nn.Module, calls: list[Call], params: list[str],
                         samples: slice) -> dict[str, torch.Tensor]:
        """{param name: float32 [b, *param.shape]} for the samples in `samples`,
        summed over calls. Default: exact, by torch.func over the recorded
        calls (gradnoise.layers.torch_func); rules override it with a direct
        formula."""
        return per_sample_grads_by_torch_func(module, calls, params, samples)


_RULES: dict[type, NormRule] = {}


def register_rule(*module_types: type) -> Callable:
    """Class decorator: use this rule for modules of these types (and their
    subclasses, unless a subclass has a rule of its own).

        @gradnoise.layers.register_rule(MyBlock)
        class MyBlockRule(gradnoise.layers.NormRule):
            def sq_norms(self, module, calls, params): ...
    """
    def decorate(rule_cls):
        for t in module_types:
            _RULES[t] = rule_cls()
        return rule_cls
    return decorate


def find_rule(module: nn.Module) -> NormRule | None:
    """The rule registered for the module's type or, for a subclass that keeps
    its parent's forward, for the nearest such parent."""
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    for parent in cls.__mro__[1:]:
        if parent in _RULES and cls.forward is parent.forward:
            return _RULES[parent]
    return None
