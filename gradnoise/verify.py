"""Checking the tracker on one's own model: one step against exact per-sample
gradients.

`GradNoiseTracker.verify(inputs, loss_fn)` runs one tracked step on a batch,
then the ground truth, independent of gradnoise: on a float64 copy of the
model, the batch's loss gives the gradient of every batched output
(dL/dY, [B, …]), and each sample alone is run forward and back with its own
slice of it, so that plain autograd yields g_i = J_iᵀ (dL/dY)_i, sample i's
share of the batch's gradient, whatever the loss (token means, padding,
label smoothing). Per layer it reports the worst relative error over the
samples and how the layer was measured. The model's gradients, the RNG
state and the tracker's last results are left as they were.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .layers.calls import output_tensors


@dataclass
class LayerCheck:
    name: str
    worst_relative_error: float
    fallback: bool
    reason: str = ""


@dataclass
class Verification:
    """Per layer, the worst relative error of the tracker's per-sample norms
    against the exact ones; `worst` over every layer and the per-sample total."""
    layers: dict[str, LayerCheck] = field(default_factory=dict)
    total_relative_error: float = 0.0
    samples: int = 0

    @property
    def worst(self) -> float:
        return max([self.total_relative_error,
                    *(c.worst_relative_error for c in self.layers.values())])

    def ok(self, rtol: float = 1e-4) -> bool:
        return self.worst <= rtol

    def __str__(self) -> str:
        width = max([5, *(len(n) for n in self.layers)])
        lines = [f"{'layer':<{width}}  worst rel. error  measured by",
                 *(f"{c.name or '(model)':<{width}}  {c.worst_relative_error:16.2e}  "
                   f"{'fallback: ' + c.reason if c.fallback else 'its rule'}"
                   for c in self.layers.values()),
                 f"{'total':<{width}}  {self.total_relative_error:16.2e}  "
                 f"({self.samples} samples)"]
        return "\n".join(lines)


def verify(tracker, inputs, loss_fn, samples: int | None = None) -> Verification:
    """One step of `tracker` on `inputs` (a tensor, a tuple of positional
    inputs or a dict of keyword inputs, batch along dim 0) with loss
    `loss_fn(output)`, against exact per-sample gradients of the first
    `samples` samples (all by default)."""
    model = tracker.model
    args, kwargs = _as_call(inputs)
    B = next(a.shape[0] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    n = B if samples is None else min(samples, B)
    grads = [(p, p.grad) for p in model.parameters()]
    rng = torch.get_rng_state()
    saved = (tracker._results, tracker._unmeasured, tracker.steps_measured)
    try:
        for p, _ in grads:
            p.grad = None
        torch.set_rng_state(rng)
        loss_fn(model(*args, **kwargs)).backward()
        got = {k: v.double()[:n] for k, v in tracker.per_layer_sq_norms().items()}
        fallback = set(tracker.fallback_modules)
        torch.set_rng_state(rng)
        want = _exact(tracker, args, kwargs, loss_fn, B, n)
    finally:
        for p, g in grads:
            p.grad = g
        tracker._results, tracker._unmeasured, tracker.steps_measured = saved
        torch.set_rng_state(rng)
    report = Verification(samples=n)
    for name in [*want, *(k for k in got if k not in want)]:
        g, w = got.get(name, torch.zeros(n, dtype=torch.float64)), want.get(name)
        w = torch.zeros(n, dtype=torch.float64) if w is None else w
        report.layers[name] = LayerCheck(name, _worst(g, w), name in fallback,
                                         tracker.fallback_reasons.get(name, ""))
    report.total_relative_error = _worst(sum(got.values()), sum(want.values()))
    return report


def _exact(tracker, args, kwargs, loss_fn, B, n) -> dict[str, torch.Tensor]:
    """{module: float64 [n]} of ‖g_i‖² over the module's own measured
    parameters (× B² for a mean loss, as the tracker reports)."""
    attached = tracker.attached
    tracker.detach()                     # a plain copy: no hooks, no fused forwards
    try:
        model = copy.deepcopy(tracker.model).double()
    finally:
        if attached:
            tracker.attach()
    args, kwargs = _double(args), _double(kwargs)
    out = model(*args, **kwargs)
    index = _independent([t for t in output_tensors(out)], B)
    outs = [output_tensors(out)[k] for k in index]
    grads = torch.autograd.grad(loss_fn(out), outs, allow_unused=True)
    scale = float(B) ** 2 if tracker.loss_reduction == "mean" else 1.0
    owners = {}
    for t in tracker._tracked:
        for pname in t.own:
            owners.setdefault(id(model.get_submodule(t.name).get_parameter(pname)), t.name)
    # each shared parameter once, under the module that measures it, as the tracker reports it
    params = [(p, owners[id(p)]) for p in dict.fromkeys(model.parameters()) if id(p) in owners]
    result: dict[str, torch.Tensor] = {}
    for i in range(n):
        a = tuple(_sample(x, i, B) for x in args)
        k = {key: _sample(x, i, B) for key, x in kwargs.items()}
        flat = output_tensors(model(*a, **k))
        if len(flat) != len(output_tensors(out)) or any(flat[j].shape[0] != 1 for j in index):
            raise ValueError("GradNoiseTracker.verify: the model's outputs for one sample do not "
                             "match its outputs for the batch")
        sample_outs = [flat[j] for j in index]
        pairs = [(o, g[i:i + 1]) for o, g in zip(sample_outs, grads) if g is not None]
        per_sample = torch.autograd.grad([o for o, _ in pairs], [p for p, _ in params],
                                         [g for _, g in pairs], allow_unused=True)
        for (p, name), g in zip(params, per_sample):
            layer = result.setdefault(name, torch.zeros(n, dtype=torch.float64))
            if g is not None:
                layer[i] += g.square().sum() * scale
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(result.items(), key=lambda item: order[item[0]]))


def _independent(outputs: list, B: int) -> list[int]:
    """Positions of the batched outputs that no other chosen output is computed
    from (T5 returns its encoder's states beside the logits made from them):
    the loss's gradient at those covers each path once."""
    chosen: list[int] = []
    for k, t in enumerate(outputs):
        if not (t.requires_grad and t.dim() > 0 and t.shape[0] == B) or t.grad_fn is None:
            continue
        upstream = {id(outputs[j].grad_fn) for j in chosen}
        if _reaches(t.grad_fn, upstream) or any(_reaches(outputs[j].grad_fn, {id(t.grad_fn)})
                                               for j in chosen):
            continue
        chosen.append(k)
    return chosen


def _reaches(node, targets: set) -> bool:
    """Whether any node in `targets` is reached from `node` going backward,
    other than `node` itself."""
    seen, todo = set(), [n for n, _ in node.next_functions if n is not None]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        if id(n) in targets:
            return True
        seen.add(id(n))
        todo += [m for m, _ in n.next_functions if m is not None]
    return False


def _as_call(inputs):
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _double(values):
    if isinstance(values, dict):
        return {k: _double(v) for k, v in values.items()}
    if isinstance(values, tuple):
        return tuple(_double(v) for v in values)
    return values.double() if isinstance(values, torch.Tensor) and values.is_floating_point() \
        else values


def _sample(x, i, B):
    return x[i:i + 1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == B else x


def _worst(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return float(((got - want).abs() / scale).max()) if want.numel() else 0.0
