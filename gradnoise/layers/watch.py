"""The one TorchFunctionMode of a measured forward (docs/design.md §6).

Two things need to see the functional calls of a forward: the uses of the
parameters of modules that have no rule (layers.functional.ParameterUses,
while such a module's forward runs) and the tensors shared by every sample
(layers.broadcast.SharedContributions, from the first call on a shared
input to the end of the model's forward). A linear use of a captured
module's weight is handed to layers.captured_linear before it runs, to be run
through the fused kernel. One mode serves both, so that
captures may start and end in any order: it is entered when the first of
them is needed, and left when no capture is in progress and no shared
tensor is watched, or at the end of the model's forward. A forward that
needs neither runs without it.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from . import captured_linear

_T = torch.Tensor
# Calls that read metadata only: handed through at once.
_PASSIVE = {_T.dim, _T.size, _T.numel, _T.__len__, _T.is_contiguous, _T.data_ptr,
            _T.__format__, _T.__repr__, _T.requires_grad_, _T.register_hook,
            _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.requires_grad.__get__,
            _T.is_floating_point}


class ForwardWatch(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.broadcast = None       # layers.broadcast.SharedContributions
        self.captures: list = []    # layers.functional.ParameterUses of the calls in progress
        self.entered = False

    def need(self) -> "ForwardWatch":
        if not self.entered:
            self.entered = True
            self.__enter__()
        return self

    def leave(self) -> None:
        if self.entered:
            self.entered = False
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PASSIVE:
            return func(*args, **kwargs)
        if func in captured_linear.INTERCEPTED and self.captures and (
                self.broadcast is None or not self.broadcast.touches(args, kwargs)):
            for capture in self.captures:
                out = captured_linear.intercept(capture, func, args, kwargs)
                if out is not None:
                    for other in self.captures:
                        if other is not capture:
                            other.observe(func, args, kwargs, out)
                    return out
        out = (self.broadcast.run(func, args, kwargs) if self.broadcast is not None
               else func(*args, **kwargs))
        for capture in self.captures:
            capture.observe(func, args, kwargs, out)
        return out
