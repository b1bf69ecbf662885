"""A tracked module's recorded call, the batch size of a module's calls, and
the tensors of a call's output, in one place for the rules and the tracker."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class Call:
    """One forward call of a tracked module: its positional and keyword
    inputs, and, once backward has reached it, the gradient of each output
    (None for an output that received no gradient). Tensors are held only
    until the step's backward has used them."""
    args: tuple
    kwargs: dict
    grad_outputs: list = field(default_factory=list)
    #: positions, among the call's flattened tensor outputs, of those in grad_outputs
    output_index: list = field(default_factory=lambda: [0])
    #: args positions and kwargs names of inputs that are the model's own
    #: parameters or buffers (never per-sample, whatever their dim 0)
    model_state: frozenset = frozenset()

    def release(self) -> None:
        """Drop the tensors once the call is measured: the gradient hooks that
        refer to this call live as long as the autograd graph."""
        self.args, self.kwargs, self.grad_outputs = (), {}, []


def received_gradient(calls: list[Call]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(first input, first output's gradient) of each call whose first output
    received a gradient in the step, in call order: what every layer rule's
    norm formula reads."""
    return [(c.args[0], c.grad_outputs[0]) for c in calls
            if c.grad_outputs and c.grad_outputs[0] is not None]


def batch_size_of(calls: list[Call]) -> int:
    """Dim 0 of the first tensor input (positional, else keyword) of the first call."""
    c = calls[0]
    for a in (*c.args, *c.kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.shape[0]
    raise RuntimeError("GradNoiseTracker: a tracked module was called without a tensor input, "
                       "so it has no batch dimension")


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a module's output, in order: the output itself, the
    items of a tuple or list, the values of a dict (transformers' ModelOutput),
    nested; anything else contributes none."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []
