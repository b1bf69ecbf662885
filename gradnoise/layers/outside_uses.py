"""Uses of a tracked parameter outside the forward of the modules that
measure it (docs/design.md §6).

A rule measures a parameter from the calls of its module (or, for a tied
weight, of each module that holds it). A use elsewhere — a parent computing
`F.linear(h, self.embed.weight)` beside the embedding's own use — adds to
the parameter's gradient without being measured, and its per-sample norm
would come out too small, silently. `OutsideUses` finds such a use in one
training forward:

- each call of a measuring module is an interval of autograd sequence
  numbers (a node made by a probe at its start and at its end: every node
  created in between belongs to the call);
- at the end of the model's forward, a walk of its graph from the outputs
  finds each edge into a tracked parameter's AccumulateGrad node; through
  aliases (a cast, a view, a transpose: the autocast cache shares one cast
  between uses) it is traced back to the ops that use the parameter;
- an op created outside every interval of the parameter's modules is such a
  use: its parameter and the op's backward are named.

The check costs a walk of the graph, so the tracker runs it on its first
measured step; it sees the uses of that step's forward.
"""
from __future__ import annotations

import torch
from torch import nn

# Backward nodes of ops that alias or cast their input: not uses themselves.
_ALIASES = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "UnsafeViewBackward0",
            "ReshapeAliasBackward0", "TransposeBackward0", "TransposeBackward1",
            "PermuteBackward0", "AliasBackward0", "CloneBackward0", "UnsqueezeBackward0",
            "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2"}


def _sequence_number() -> int:
    """The autograd sequence number the next node will get, less one."""
    with torch.enable_grad():
        return torch.empty(0, requires_grad=True).view(0).grad_fn._sequence_nr()


class OutsideUses:
    """One step's check; `measured` maps id(parameter) to (its name, the
    modules that measure it). Made when the model's forward starts: the
    model's own call, if it measures parameters, is open from then on.

    `own` maps id(module) to (parameter name in the module, entry of
    `measured`) for each parameter the module measures. A module may hold
    other parameter objects while it runs than when the check was made
    (FSDP2's fully_shard swaps in the unsharded parameters before a forward
    and the sharded ones after): each call's start adds the objects it holds
    then, which are the ones autograd records."""

    def __init__(self, measured: dict[int, tuple[str, list[nn.Module]]], model: nn.Module,
                 own: dict[int, list[tuple[str, tuple]]] | None = None):
        self.measured = measured
        self._own = own or {}
        self._intervals: dict[int, list[list[int]]] = {}
        self._open: dict[int, list[list[int]]] = {}
        self._handles = []
        modules = {id(m): m for _, ms in measured.values() for m in ms}
        for m in modules.values():
            if m is model:
                self._start(m, ())
                continue
            self._handles.append(m.register_forward_pre_hook(self._start))
            self._handles.append(m.register_forward_hook(self._end, always_call=True))

    def _start(self, module, args) -> None:
        for pname, entry in self._own.get(id(module), ()):
            self.measured.setdefault(id(module.get_parameter(pname)), entry)
        interval = [_sequence_number(), None]
        self._open.setdefault(id(module), []).append(interval)
        self._intervals.setdefault(id(module), []).append(interval)

    def _end(self, module, args, out) -> None:
        stack = self._open.get(id(module))
        if stack:
            stack.pop()[1] = _sequence_number()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def find(self, outputs: list[torch.Tensor]) -> list[tuple[str, str]]:
        """(parameter name, backward node of the op) for each use found
        outside its modules' calls in the graph of `outputs`, at the end of
        the model's forward (a call still open, the model's own, ends now)."""
        self.remove()
        now = _sequence_number()
        for stack in self._open.values():
            for interval in stack:
                interval[1] = now
        users: dict[int, list] = {}            # id(node) -> nodes with an edge to it
        nodes: dict[int, object] = {}
        todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if id(node) in nodes:
                continue
            nodes[id(node)] = node
            if "CompiledFunction" in type(node).__name__:
                return []       # (torch.compile: the ops' own nodes are not in the graph)
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                users.setdefault(id(nxt), []).append(node)
                todo.append(nxt)
        found = []
        for node in list(nodes.values()):
            if type(node).__name__ != "AccumulateGrad":
                continue
            entry = self.measured.get(id(node.variable))
            if entry is None:
                continue
            name, modules = entry
            spans = [s for m in modules for s in self._intervals.get(id(m), [])
                     if s[1] is not None]
            for op in _uses(node, users):
                seq = op._sequence_nr()
                if not any(a < seq <= b for a, b in spans):
                    found.append((name, type(op).__name__))
        return found


def _uses(node, users) -> list:
    """The non-alias nodes whose inputs include `node`'s output, through aliases."""
    out, todo, seen = [], list(users.get(id(node), [])), set()
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if type(n).__name__ in _ALIASES:
            todo.extend(users.get(id(n), []))
        else:
            out.append(n)
    return out
