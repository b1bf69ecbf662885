"""The state of one measured step: what its forward recorded and its backward
has summed so far (docs/design.md §6)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import layers
from ..layers.calls import Call

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
    broadcast: object = None     # layers.broadcast.SharedContributions
    # id(module) -> the ParameterUses of its calls in progress / of its measured calls
    capturing: dict[int, list] = field(default_factory=dict)
    uses: dict[int, list] = field(default_factory=dict)
    # hooks on captured modules' parameters, removed at the end of the step
    param_hooks: list = field(default_factory=list)
    calls: dict[int, list[Call]] = field(default_factory=dict)      # id(module) -> calls
    pending: dict[int, int] = field(default_factory=dict)           # id(call) -> grads awaited
    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)    # layer -> raw [B]
    batch: dict[str, int] = field(default_factory=dict)             # layer -> B seen
    # id(module) -> Σ ‖G_i‖² of its one, shared, parameter over this step's
    # single call, from the fused backward (the cross terms come at the end)
    tied_own: dict[int, torch.Tensor] = field(default_factory=dict)
    # id(module) -> the factor of such a call whose output gradient was not
    # kept (layers.tied.gathered_dense)
    tied_factors: dict[int, object] = field(default_factory=dict)
    callback_queued: bool = False
    # why this step's backward cannot be measured (a create_graph backward)
    unmeasurable: str | None = None
    # ids of the model's parameters and buffers, taken at its first fallback call
    state_ids: set | None = None
    # set when its backward has ended: a further backward through the same
    # graph (retain_graph=True) is not measured
    finished: bool = False


