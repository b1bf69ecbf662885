"""Contributions shared across the batch, measured per sample (docs/design.md §6).

A tracked call whose input carries no batch (a position embedding called with
a [1, T] index, T5's relative-position bias computed from a [T, T] bucket
index) gives an output Z that every sample uses. Autograd sums the samples'
gradients before Z receives its own, so sample i's share dZ_i is only
visible where Z, or a tensor computed from Z alone, meets the batch: an
elementwise op with a [B, …] operand (`h + pos`, `scores + bias`) or an
expand to B. `SharedContributions`, fed every op from the first such call
to the end of the model's forward (layers.watch), watches those tensors:

- an op on shared tensors only (a permute, an unsqueeze, a dropout) is
  recorded as a node of a chain from Z;
- at a meet, the shared operand S is replaced by S expanded to the result's
  shape (the same values, the same result), whose gradient is per sample;
  reduced to S's shape it is dS_i, and dZ_i = J_fᵀ dS_i follows by a vmap of
  vector-Jacobian products back along the chain (torch.func);
- when Z's own gradient arrives (after every use's), the sum of the dZ_i
  must equal it: a use that was not seen (an op that mixes samples, or a
  meet of an unsupported kind) would otherwise be missed silently, so it is
  an error that names the module and the op instead.

The model's forward runs unchanged: no tensor the model sees changes shape
or value.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.func import vjp, vmap
from torch.nn import functional as F

from . import batching

_T = torch.Tensor
# Elementwise ops whose operands broadcast: at a meet the shared operand is
# replaced by its expansion, which leaves the result unchanged.
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.masked_fill,
    _T.add, _T.sub, _T.mul, _T.div, _T.masked_fill, _T.add_, _T.sub_, _T.mul_, _T.div_,
    _T.__add__, _T.__radd__, _T.__iadd__, _T.__sub__, _T.__rsub__, _T.__isub__,
    _T.__mul__, _T.__rmul__, _T.__imul__, _T.__truediv__, _T.__rtruediv__, _T.__itruediv__,
}
# Ops that broadcast their one tensor operand to a given shape.
_EXPANDS = {_T.expand, _T.expand_as, torch.broadcast_to, _T.broadcast_to}


class _Node:
    """A shared tensor: Z itself (a root, with its call) or one computed from
    a single shared parent by `replay(parent_value)`."""
    __slots__ = ("parent", "parent_value", "replay", "root", "__weakref__")

    def __init__(self, parent=None, parent_value=None, replay=None, root=None):
        self.parent, self.parent_value, self.replay, self.root = parent, parent_value, replay, root


class SharedRoot:
    """One tracked call whose output every sample uses; its per-sample output
    gradient accumulates here, meet by meet."""

    def __init__(self, name: str, out: torch.Tensor, B: int, on_ready: Callable):
        self.name, self.B, self.on_ready = name, B, on_ready
        self.shape = out.shape
        self.per_sample: torch.Tensor | None = None    # [B, *Z.shape]
        self.unsupported: list[str] = []

    def add(self, grads: torch.Tensor) -> None:
        self.per_sample = grads if self.per_sample is None else self.per_sample + grads

    def finish(self, total: torch.Tensor) -> None:
        """Z's own gradient has arrived: check that the samples' shares add up
        to it, then hand the per-sample gradient [B, *Z.shape] on."""
        per_sample = self.per_sample
        if per_sample is None:
            per_sample = total.new_zeros((self.B, *self.shape))
        seen = per_sample.sum(0, dtype=torch.float32)
        total32 = total.float()
        scale = total32.norm().item()
        eps = torch.finfo(per_sample.dtype).eps if per_sample.is_floating_point() else 0.0
        if (seen - total32).norm().item() > max(1e-4, 8 * eps) * scale + 1e-30:
            ops = f" (ops seen on it that gradnoise cannot split: {sorted(set(self.unsupported))})" \
                if self.unsupported else ""
            raise RuntimeError(
                f"GradNoiseTracker: the output of '{self.name}' is shared by every sample (its "
                f"input has no batch dimension), and part of its gradient reached it other than "
                f"through an elementwise op with the batch or an expand to the batch{ops}, so "
                "its per-sample share cannot be told. Leave the module out with `layers=`, or "
                "use the micro-batch noise source.")
        self.per_sample = None
        self.on_ready(per_sample)


class SharedContributions:
    """Watches the shared tensors of one forward (see the module docstring);
    layers.watch.ForwardWatch hands it every op."""

    def __init__(self, B: int):
        self.B = B
        self._nodes: dict[int, tuple[weakref.ref, _Node]] = {}

    # -------------------------------------------------------------- roots
    def add_root(self, out: torch.Tensor, root: SharedRoot) -> None:
        """Track `out`, the output of a tracked call shared by every sample;
        `root.finish` runs when its gradient arrives."""
        node = self._node(out)
        if node is None:
            node = _Node()
            self._nodes[id(out)] = (weakref.ref(out), node)
        node.root = root
        out.register_hook(lambda g: root.finish(g))

    def is_shared(self, t: torch.Tensor) -> bool:
        """Whether `t` is a tracked output shared by every sample, or computed from one alone."""
        return self._node(t) is not None

    def touches(self, args, kwargs) -> bool:
        """Whether any of a call's arguments is a watched shared tensor."""
        return bool(self._nodes) and any(self._node(a) is not None
                                         for a in (*args, *kwargs.values()))

    def _node(self, t) -> _Node | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._nodes.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    # ---------------------------------------------------------- each op
    def run(self, func, args, kwargs):
        """func(*args, **kwargs), watched."""
        if not self._nodes:
            return func(*args, **kwargs)
        shared = [(k, a) for k, a in enumerate(args) if self._node(a) is not None]
        shared += [(k, a) for k, a in kwargs.items() if self._node(a) is not None]
        if not shared or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        batched = any(isinstance(a, torch.Tensor) and self._node(a) is None and a.dim() > 0
                      and a.shape[0] == self.B for a in (*args, *kwargs.values()))
        if func in _EXPANDS and len(shared) == 1:
            out = func(*args, **kwargs)
            if out.dim() > 0 and out.shape[0] == self.B and self.B > 1 and out.requires_grad:
                self._meet(shared[0][1], out)
                return out
            return self._derive(func, args, kwargs, shared, out)
        if batched and func is F.scaled_dot_product_attention:
            return self._attention_mask_meet(func, args, kwargs, shared)
        if batched:
            if func not in _ELEMENTWISE:
                for _, a in shared:
                    self._mark_unsupported(a, func)
                return func(*args, **kwargs)
            shape = torch.broadcast_shapes(*[a.shape for a in (*args, *kwargs.values())
                                             if isinstance(a, torch.Tensor)])
            args, kwargs = list(args), dict(kwargs)
            for k, a in shared:
                if a.dim() == len(shape) and a.shape[0] != 1:
                    self._mark_unsupported(a, func)   # its rows line up with the samples'
                elif a.requires_grad:
                    wide = a.expand(shape)
                    self._meet(a, wide)
                    if isinstance(k, int):
                        args[k] = wide
                    else:
                        kwargs[k] = wide
            return func(*args, **kwargs)
        rng = _rng_state(shared[0][1])
        return self._derive(func, args, kwargs, shared, func(*args, **kwargs), rng)

    def _attention_mask_meet(self, func, args, kwargs, shared):
        """A shared additive attention mask (T5's position bias given to
        scaled_dot_product_attention): its expansion to the scores' shape is
        the meet."""
        args, kwargs = list(args), dict(kwargs)
        where = 3 if len(args) > 3 else "attn_mask"
        mask = args[3] if where == 3 else kwargs.get("attn_mask")
        if [a for _, a in shared] != [mask] or not mask.is_floating_point():
            for _, a in shared:
                self._mark_unsupported(a, func)
            return func(*args, **kwargs)
        q, k = args[0], args[1]
        wide = mask.expand(torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2])))
        self._meet(mask, wide)
        if where == 3:
            args[3] = wide
        else:
            kwargs["attn_mask"] = wide
        return func(*args, **kwargs)

    def _derive(self, func, args, kwargs, shared, out, rng=None):
        """An op on shared tensors alone: its tensor output is shared too,
        computed from its one shared operand (several: not followed)."""
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return out
        inplace = any(out is a for a in (*args, *kwargs.values()))
        if len(shared) != 1 or inplace:
            for _, a in shared:
                self._mark_unsupported(a, func)
            return out
        (k, parent), = shared

        def replay(value, func=func, args=tuple(args), kwargs=dict(kwargs), k=k, rng=rng):
            if isinstance(k, int):
                a = list(args)
                a[k] = value
                call = lambda: func(*a, **kwargs)  # noqa: E731
            else:
                call = lambda: func(*args, **{**kwargs, k: value})  # noqa: E731
            # the forward's random numbers again (a dropout on the shared tensor)
            with torch.random.fork_rng(devices=[] if value.device.type != "cuda"
                                       else [value.device]):
                _set_rng_state(value, rng)
                return call()

        self._nodes[id(out)] = (weakref.ref(out), _Node(self._node(parent), parent, replay))
        return out

    def _mark_unsupported(self, t, func) -> None:
        node = self._node(t)
        name = getattr(func, "__name__", repr(func))
        while node is not None:
            if node.root is not None:
                node.root.unsupported.append(name)
            node = node.parent

    def _meet(self, s: torch.Tensor, wide: torch.Tensor) -> None:
        """`wide` is shared tensor `s` broadcast to [B, …]: its gradient, per
        sample and reduced to s's shape, goes back along the chain."""
        node = self._node(s)
        s_shape, B = s.shape, self.B

        def hook(g):
            g = batching.reduce_per_sample(g, s_shape, B)   # [B, *s.shape]
            n = node
            while n is not None:
                if n.root is not None:
                    n.root.add(g)
                if n.parent is None:
                    break
                g = _back_one_op(n, g)
                n = n.parent
        wide.register_hook(hook)


def _back_one_op(node: _Node, g: torch.Tensor) -> torch.Tensor:
    """Per-sample vector-Jacobian product through one recorded op."""
    value = node.parent_value.detach()
    _, pullback = vjp(node.replay, value)
    return vmap(lambda gi: pullback(gi)[0])(g)


def _rng_state(t: torch.Tensor):
    return (torch.cuda.get_rng_state(t.device) if t.device.type == "cuda"
            else torch.get_rng_state())


def _set_rng_state(t: torch.Tensor, state) -> None:
    if state is None:
        return
    if t.device.type == "cuda":
        torch.cuda.set_rng_state(state, t.device)
    else:
        torch.set_rng_state(state)
