"""Module classes without a rule of their own, measured from the functional
calls their forward makes with their parameters (docs/design.md §6).

Transformers' and timm's layers are written in terms of a few functional
calls: GPT-2's Conv1D is `torch.addmm(bias, x.view(-1, d), weight)`, Llama's
RMSNorm ends in `weight * x̂`, ViT's embeddings expand a class token and add a
position parameter. While such a module's forward runs in a measured step,
`ParameterUses` sees every call that takes one of the module's own
parameters (layers.watch hands it every op), and records the ones whose per-sample gradient the
built-in rules give (each use's input and output gradient):

    F.linear(x, W, b)                      Linear rule: ‖G_i‖² by the fused/ghost ops
    addmm(b, x, W), x @ W, matmul(x, W)    the same problem with W transposed
    F.embedding(idx, W)                    Embedding rule
    F.layer_norm / F.rms_norm / F.group_norm   the normalisation-layer rules
    P * h, h + P, h − P                    g_i = Σ_broadcast dZ_i ⊙ h_i, Σ dZ_i, −Σ dZ_i
    P.expand(B, …)                         g_i = Σ_broadcast dZ_i

A parameter may first be cast, made contiguous, reshaped or transposed (an
alias: its per-sample gradient maps back exactly). A parameter used once in
the step gets its norms from the use directly; one used several times has
its per-sample gradients summed over the uses before squaring. A module
whose forward uses a parameter in any other way (or with an input whose
batch is not along dim 0) is measured by the exact torch.func fallback,
with that reason in `GradNoiseTracker.fallback_reasons`.
"""
from __future__ import annotations

import types
import weakref

import torch
from torch.nn import functional as F

from ..ops.norm_layers import rms_norm_default_eps
from . import batching
from .calls import Call
from .embedding import EmbeddingRule
from .linear import LinearRule
from .normalization import GroupNormRule, LayerNormRule, RMSNormRule

_T = torch.Tensor
_LINEAR, _EMBEDDING, _LAYER_NORM, _RMS_NORM, _GROUP_NORM = (
    LinearRule(), EmbeddingRule(), LayerNormRule(), RMSNormRule(), GroupNormRule())
_MATMUL = {torch.addmm, torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm}
_SCALE = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}
_SHIFT = {torch.add, _T.add, _T.__add__, _T.__radd__, torch.sub, _T.sub, _T.__sub__}
_SAME_VALUES = {_T.to, _T.float, _T.half, _T.bfloat16, _T.double, _T.type_as, _T.contiguous}
_RESHAPES = {_T.view, _T.reshape, _T.unsqueeze, _T.squeeze, _T.flatten, torch.reshape,
             torch.unsqueeze, torch.squeeze, torch.flatten}
_TRANSPOSES = {_T.t, torch.t, _T.transpose, torch.transpose}


class Use:
    """One call that used parameters: how to get their per-sample gradients
    from its output gradient."""
    __slots__ = ("kind", "params", "inputs", "meta", "grad", "done")

    def __init__(self, kind, params, inputs, meta):
        self.kind, self.params, self.inputs, self.meta, self.grad = kind, params, inputs, meta, None
        self.done = False

    def release(self) -> None:
        self.inputs = self.grad = None
        self.done = True

    def names(self) -> set[str]:
        """Names of the parameters this use takes."""
        return {name for name, _, _ in self.params.values()}


class ParameterUses:
    """The uses of one module's own parameters during one forward call."""

    def __init__(self, params: dict[str, torch.Tensor], lent: dict[str, torch.Tensor],
                 lent_watched, B: int, on_grad, on_fused):
        #: on_grad(capture, use, grad): a use's output gradient has arrived;
        #: on_fused(capture, use): asked by a use run through the fused kernel
        #: (layers.captured_linear) at its backward: a function that takes its
        #: norms if the use is measured alone, else None (None: no use runs so,
        #: as with GradNoiseTracker(fused_backward=False))
        self.B, self.on_grad, self.on_fused = B, on_grad, on_fused
        #: set once the call is known to be measured this way; until then the
        #: uses' gradients are ignored (the call may fall back)
        self.armed = False
        # id(tensor) -> (weak ref, parameter name, map of a per-sample gradient back)
        self._aliases = {id(p): (weakref.ref(p), n, None) for n, p in params.items()}
        self.uses: list[Use] = []
        self.unsupported: str | None = None
        # parameters the module owns but a module inside it measures: a use
        # of one in this forward is an error (lent_use names it)
        # (lent_watched() is False while a module that measures them runs)
        self._lent = {id(p): (weakref.ref(p), n) for n, p in lent.items()}
        self._lent_watched = lent_watched
        self.lent_use: str | None = None

    def _param(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._aliases.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def observe(self, func, args, kwargs, out) -> None:
        """Record the op `out = func(*args, **kwargs)` if it uses a parameter."""
        if self.unsupported is not None:
            return
        if self._lent and self._lent_watched():
            self._check_lent(args, kwargs)
        if not any(self._param(a) is not None for a in (*args, *kwargs.values())):
            if any(isinstance(a, (list, tuple)) and any(self._param(t) is not None for t in a)
                   for a in (*args, *kwargs.values())):
                self.unsupported = getattr(func, "__name__", repr(func))   # GRU's _VF.gru
            return
        if not torch.is_grad_enabled():
            return
        if out is None or (isinstance(out, (tuple, list)) and any(
                isinstance(o, torch.Tensor) and o.requires_grad for o in out)):
            # (chunk, split, unbind; __setitem__ with a parameter as the value)
            self.unsupported = getattr(func, "__name__", repr(func))
            return
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return
        try:
            self._record(func, args, kwargs, out)
        except _Unsupported as e:
            self.unsupported = str(e)

    def _check_lent(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                entry = self._lent.get(id(t)) if isinstance(t, torch.Tensor) else None
                if entry is not None and entry[0]() is t and self.lent_use is None:
                    self.lent_use = entry[1]

    # ------------------------------------------------------------ recording
    def _record(self, func, args, kwargs, out):
        name = getattr(func, "__name__", repr(func))
        if func in _SAME_VALUES or func in _RESHAPES or func in _TRANSPOSES:
            self._alias(func, args, out)
            return
        if func is F.linear:
            x, w, b = _bound(args, kwargs, ("input", "weight", "bias"), {"bias": None})
            self._use("linear", out, x, {"weight": w, "bias": b}, None)
        elif func in _MATMUL:
            if func is torch.addmm:
                bias, x, w = _bound(args, kwargs, ("input", "mat1", "mat2"), {})
                if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                    raise _Unsupported(f"{name} with beta or alpha")
            else:
                (x, w), bias = args[:2], None
            if self._param(x) is not None or w.dim() != 2:
                raise _Unsupported(f"{name} with a parameter as its first operand")
            self._use("matmul", out, x, {"weight": w, "bias": bias}, None)
        elif func is F.embedding:
            idx, w, pad, max_norm, _, by_freq = _bound(
                args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type",
                               "scale_grad_by_freq"),
                {"padding_idx": None, "max_norm": None, "norm_type": 2.0,
                 "scale_grad_by_freq": False})
            if max_norm is not None or by_freq:
                raise _Unsupported("embedding with max_norm or scale_grad_by_freq")
            if pad is not None and pad < 0:
                pad += w.shape[0]
            self._use("embedding", out, idx, {"weight": w}, pad)
        elif func in (F.layer_norm, F.rms_norm):
            rms = func is F.rms_norm
            names = ("input", "normalized_shape", "weight", "eps") if rms else (
                "input", "normalized_shape", "weight", "bias", "eps")
            got = _bound(args, kwargs, names, {"weight": None, "bias": None,
                                               "eps": None if rms else 1e-5})
            x, shape, w = got[:3]
            b, eps = (None, got[3]) if rms else got[3:]
            self._use("rms_norm" if rms else "layer_norm", out, x, {"weight": w, "bias": b},
                      (tuple(shape), eps))
        elif func is F.group_norm:
            x, groups, w, b, eps = _bound(args, kwargs, ("input", "num_groups", "weight",
                                                         "bias", "eps"),
                                          {"weight": None, "bias": None, "eps": 1e-5})
            self._use("group_norm", out, x, {"weight": w, "bias": b}, (groups, eps))
        elif func in _SCALE or func in _SHIFT:
            if len(args) != 2 or kwargs.get("alpha", 1) != 1:
                raise _Unsupported(f"{name} with alpha")
            a, c = args
            p, other = (a, c) if self._param(a) is not None else (c, a)
            if self._param(other) is not None:
                raise _Unsupported(f"{name} of two parameters")
            sign = -1.0 if func in (torch.sub, _T.sub, _T.__sub__) and p is c else 1.0
            kind = "scale" if func in _SCALE else "shift"
            self._use(kind, out, other, {"param": p}, sign)
        elif func in (_T.expand, _T.expand_as, torch.broadcast_to, _T.broadcast_to):
            self._use("expand", out, None, {"param": args[0]}, None)
        else:
            raise _Unsupported(name)

    def _alias(self, func, args, out):
        entry = self._param(args[0])
        if entry is None:
            raise _Unsupported(getattr(func, "__name__", repr(func)))
        _, name, back = entry
        shape = args[0].shape
        if func in _RESHAPES:
            step = (lambda g, shape=shape: g.reshape(g.shape[0], *shape))
        elif func in _TRANSPOSES:
            if args[0].dim() != 2:
                raise _Unsupported("transpose of a parameter with other than 2 dims")
            dims = [d % 2 for d in args[1:3]] if func in (_T.transpose, torch.transpose) else [0, 1]
            step = None if dims[0] == dims[1] else (lambda g: g.transpose(1, 2))
        else:
            step = None
        chain = step if back is None else (back if step is None else
                                           (lambda g, s=step, b=back: b(s(g))))
        self._aliases[id(out)] = (weakref.ref(out), name, chain)

    def _use(self, kind, out, x, operands, meta):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            layout = batching.layout(x, self.B)
            if layout == batching.ROWS:
                x = batching.split_rows(x, self.B)
            elif layout != batching.BATCH or x.shape[0] != self.B:
                raise _Unsupported(f"{kind} on an input whose batch is not along dim 0")
        elif kind == "expand" and not (out.dim() > 0 and out.shape[0] == self.B):
            raise _Unsupported("expand of a parameter to other than the batch")
        if kind in ("scale", "shift") and not (out.dim() > 0 and out.shape[0] == self.B):
            raise _Unsupported(f"{kind} of a parameter by a tensor without the batch")
        use = self.record(kind, x, operands, meta)
        rows = out.shape[0] != self.B
        out.register_hook(lambda g, use=use: self.on_grad(
            self, use, batching.split_rows(g, self.B) if rows else g))

    def record(self, kind, x, operands, meta=None) -> Use:
        """A use of the parameters among `operands` ({role: tensor}) on input
        `x` (its batch along dim 0), appended to the call's uses."""
        params = {}
        for role, t in operands.items():
            entry = self._param(t)
            if entry is not None:
                params[role] = (entry[1], entry[2], t.shape)
        use = Use(kind, params, x, meta)
        self.uses.append(use)
        return use


class _Unsupported(Exception):
    pass


def _bound(args, kwargs, names, defaults):
    """Arguments by name, positional first, then keyword, then default."""
    values = []
    for k, n in enumerate(names):
        if k < len(args):
            values.append(args[k])
        elif n in kwargs:
            values.append(kwargs[n])
        elif n in defaults:
            values.append(defaults[n])
        else:
            raise _Unsupported(f"a call without `{n}`")
    return values


# ------------------------------------------------------------------ norms
def several_uses_sq_norms(uses: list[Use], B: int) -> torch.Tensor:
    """Σ over parameters of ‖Σ_uses per-sample gradient‖², float32 [B]."""
    total: dict[str, torch.Tensor] = {}
    for use in uses:
        for name, g in per_sample_grads(use, B).items():
            total[name] = g.float() if name not in total else total[name] + g.float()
    return sum(g.flatten(1).square().sum(1) for g in total.values())


def per_sample_grads(use: Use, B: int) -> dict[str, torch.Tensor]:
    """{parameter name: [B, *shape]}: the use's share of each parameter's
    per-sample gradient, in the parameter's own shape."""
    g, x = use.grad, use.inputs
    out = {}
    if use.kind in ("scale", "shift", "expand"):
        name, back, shape = use.params["param"]
        term = g * x if use.kind == "scale" else g
        grad = batching.reduce_per_sample(term.float(), shape, B)
        if use.kind == "shift" and use.meta < 0:
            grad = -grad
        out[name] = grad if back is None else back(grad)
        return out
    rule, ns, roles = _as_rule(use)
    call = [Call((x,), {}, [g])]
    grads = rule.per_sample_grads(ns, call, list(roles), slice(0, B))
    for role, grad in grads.items():
        name, back, shape = use.params[role]
        if use.kind == "matmul" and role == "weight":
            grad = grad.transpose(1, 2)       # W is [d, p] here
        grad = grad.reshape(B, *shape) if role == "bias" or use.kind != "matmul" else grad
        out[name] = grad if back is None else back(grad)
    return out


def sq_norms(use: Use, B: int) -> torch.Tensor:
    """Σ over the use's parameters of ‖per-sample gradient‖², float32 [B]."""
    if use.kind in ("scale", "shift", "expand"):
        (grad,) = per_sample_grads(use, B).values()
        return grad.flatten(1).square().sum(1)
    rule, ns, roles = _as_rule(use)
    return rule.sq_norms(ns, [Call((use.inputs,), {}, [use.grad])], list(roles)).float()


def _as_rule(use: Use):
    """The built-in rule of the use's kind, a stand-in for the module it
    expects, and the roles of the parameters used ('weight', 'bias')."""
    roles = use.params
    shape = lambda r: use.params[r][2] if r in use.params else None  # noqa: E731
    if use.kind in ("linear", "matmul"):
        return _LINEAR, None, roles
    if use.kind == "embedding":
        ns = types.SimpleNamespace(num_embeddings=use.params["weight"][2][0],
                                   padding_idx=use.meta)
        return _EMBEDDING, ns, roles
    weight = types.SimpleNamespace(shape=shape("weight"))
    bias = types.SimpleNamespace(shape=shape("bias"))
    if use.kind in ("layer_norm", "rms_norm"):
        normalized, eps = use.meta
        if use.kind == "rms_norm" and eps is None:
            eps = rms_norm_default_eps(use.inputs.dtype)
        ns = types.SimpleNamespace(normalized_shape=normalized, eps=eps, weight=weight,
                                   bias=bias)
        return (_RMS_NORM if use.kind == "rms_norm" else _LAYER_NORM), ns, roles
    groups, eps = use.meta
    return _GROUP_NORM, types.SimpleNamespace(num_groups=groups, eps=eps), roles
