"""The candidates of the training-step benchmark: gradnoise and its peers
(torch.func, Opacus, BackPACK), each prepared as one full training step on
its own copy of the model that returns float [B] per-sample squared norms in
gradnoise's convention ‖∇θ ℓ_i‖² (None for the plain step)."""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

CANDIDATES = ("plain", "gradnoise all", "gradnoise norm", "gradnoise + noise scale",
              "gradnoise + noise scale, clipping", "torch.func vmap", "opacus hooks", "opacus ghost", "backpack")
# The model compiled by torch.compile (inductor): its plain step, the baseline
# of the other two, and the step tracked with layers="all" / "norm".
COMPILED_CANDIDATES = ("compiled plain", "compiled gradnoise all", "compiled gradnoise norm")
# Peers that materialise per-sample gradients are refused above this projection.
MATERIALISE_LIMIT_BYTES = 8 * 2**30

QUIET_WARNINGS = ("Full backward hook is firing", "does not have an extension for Module",
          "Using a non-full backward hook", "Secure RNG turned off")


class Unavailable(Exception):
    """The candidate cannot run this model; the message says why, `short` in a few words."""

    def __init__(self, reason: str, short: str = ""):
        super().__init__(reason)
        self.short = short or reason


@dataclass
class Prepared:
    step: Callable[[], torch.Tensor | None]
    #: qualified parameter names whose norms the last step covered; None = all
    covered: Callable[[], list[str] | None] = lambda: None
    #: a short note for the table and a longer one for the footnotes
    note: str = ""
    detail: str = ""
    #: (note, detail) known only after a step; overrides the two above
    describe: Callable[[], tuple[str, str]] | None = None
    #: seconds of each step spent in the noise-scale estimator, if it runs one
    estimator_times: list[float] | None = None
    #: (before, step, after): the plain step of this candidate's own model,
    #: `before` and `after` run outside the timing. A candidate that has one
    #: is paired with it rather than with the shared plain model's step, so
    #: that where each copy's tensors sit in memory (worth ±3% on the CNN
    #: between two identical copies) cancels out of its ratio.
    own_plain: tuple[Callable[[], None], Callable[[], None], Callable[[], None]] | None = None
    #: the candidate whose step its ratio is taken against (where it has no own_plain)
    baseline: str = "plain"
    #: steps before its step time is representative (a compiled step compiles in
    #: the first, and recompiles once after the first measured step's checks)
    warmup_steps: int = 1
    #: graph breaks of its model's forward under torch.compile (counted after timing:
    #: torch._dynamo.explain resets every compiled function)
    graph_breaks: Callable[[], int] | None = None


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters, each once (a tied parameter under its first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _sq(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B] squared norms, without a full-size temporary."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def per_sample_bytes(model: nn.Module, batch: int) -> int:
    return batch * sum(p.numel() * p.element_size() for _, p in trainable_params(model))


def _check_materialise(model: nn.Module, batch: int, who: str) -> None:
    need = per_sample_bytes(model, batch)
    if need > MATERIALISE_LIMIT_BYTES:
        raise Unavailable(f"{who} materialises per-sample gradients: {need / 2**30:.1f} GB "
                          f"projected > {MATERIALISE_LIMIT_BYTES / 2**30:.0f} GB limit",
                          f"> {MATERIALISE_LIMIT_BYTES / 2**30:.0f} GB")


def _is_norm_module(module: nn.Module) -> bool:
    from ..tracker import counts_as_norm_layer
    return counts_as_norm_layer(module)


def norm_layer_params(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that GradNoiseTracker(layers="norm") measures."""
    ids = {id(p) for m in model.modules() if _is_norm_module(m)
           for p in m.parameters(recurse=False)}
    return [n for n, p in trainable_params(model) if id(p) in ids]


def _plain_step(model, x, y, loss_fn, clip: bool = False) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return step


def _plain(model, x, y, loss_fn) -> Prepared:
    return Prepared(_plain_step(model, x, y, loss_fn))


def _gradnoise(layers: str):
    def prepare(model, x, y, loss_fn) -> Prepared:
        from ..tracker import GradNoiseTracker
        names = norm_layer_params(model) if layers == "norm" else None
        if layers == "norm" and not names:
            raise Unavailable("no LayerNorm/RMSNorm/GroupNorm in the model", "no norm layers")
        tracker = GradNoiseTracker(model, loss_reduction="mean", layers=layers)

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            return tracker.per_sample_sq_norms()
        note = ""
        if tracker.fallback_modules:
            note = f"torch.func fallback: {', '.join(tracker.fallback_modules)}"
        return Prepared(step, lambda: names, note=note, own_plain=(
            tracker.detach, _plain_step(model, x, y, loss_fn), tracker.attach))
    return prepare


def _gradnoise_noise_scale(model, x, y, loss_fn, clip: bool = False) -> Prepared:
    """GradNoiseTracker(layers="all") feeding GradientNoiseScale(source="per_sample"):
    the whole measurement an adaptive-batch run makes each step. With `clip`,
    the step clips its gradients, and the estimator takes ‖G_B‖ from the
    norm clipping returns instead of reading the gradients itself."""
    from ..noise_scale import GradientNoiseScale
    from ..tracker import GradNoiseTracker
    tracker = GradNoiseTracker(model, loss_reduction="mean")
    gns = GradientNoiseScale(model, source="per_sample", tracker=tracker)
    spent: list[float] = []

    def step():
        before = gns.overhead_seconds
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        norms = tracker.per_sample_sq_norms()
        if clip:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            gns.step(grad_norm=total)
        else:
            gns.step()
        spent.append(gns.overhead_seconds - before)  # its step() and its gradient hooks
        return norms
    detail = ("noise scale: B_simple from the per-sample norms and ‖G_B‖ from clip_grad_norm_"
              if clip else "noise scale: B_simple from the per-sample norms and ‖G_B‖² of .grad")
    return Prepared(step, estimator_times=spent, detail=detail,
                    own_plain=(tracker.detach, _plain_step(model, x, y, loss_fn, clip),
                               tracker.attach))


def graph_breaks(model: nn.Module, x) -> int:
    """Graph breaks of one forward of `model` (its hooks included) under
    torch.compile, by torch._dynamo.explain; resets every compiled function."""
    return torch._dynamo.explain(model)(x).graph_break_count


def _compiled(layers: str | None):
    def prepare(model, x, y, loss_fn) -> Prepared:
        from ..tracker import GradNoiseTracker
        names = norm_layer_params(model) if layers == "norm" else None
        if layers == "norm" and not names:
            raise Unavailable("no LayerNorm/RMSNorm/GroupNorm in the model", "no norm layers")
        tracker = None if layers is None else GradNoiseTracker(model, loss_reduction="mean",
                                                               layers=layers)
        if tracker is not None:
            # one eager step first: the check for parameters used outside their
            # modules runs on the first measured step, and cannot see into a compiled one
            loss_fn(model(x), y).backward()
        compiled = torch.compile(model)

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(compiled(x), y).backward()
            return None if tracker is None else tracker.per_sample_sq_norms()

        def describe():
            notes = [] if tracker is None else ["÷ compiled plain"]
            if tracker is not None and tracker.fallback_modules:
                notes.append(f"torch.func fallback: {', '.join(tracker.fallback_modules)}")
            return ", ".join(notes), ("the model compiled by torch.compile (inductor)" + (
                "" if tracker is None else "; ×plain and peak ×plain are to the compiled plain step"))
        return Prepared(step, lambda: names, describe=describe, warmup_steps=2,
                        baseline="plain" if tracker is None else "compiled plain",
                        graph_breaks=lambda: graph_breaks(model, x))
    return prepare


def _vmap(model, x, y, loss_fn) -> Prepared:
    from torch.func import functional_call, grad, vmap
    _check_materialise(model, x.shape[0], "torch.func vmap")
    params = dict(trainable_params(model))

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step():
        model.zero_grad(set_to_none=True)
        g = per_sample({k: v.detach() for k, v in params.items()}, x, y)
        norms = None
        for k, t in g.items():
            n = _sq(t)
            norms = n if norms is None else norms + n
            params[k].grad = t.mean(0)
        return norms
    return Prepared(step, own_plain=(lambda: None, _plain_step(model, x, y, loss_fn), lambda: None))


def _opacus_hooks(model, x, y, loss_fn) -> Prepared:
    from opacus import GradSampleModule
    _check_materialise(model, x.shape[0], "Opacus hooks")
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    params = trainable_params(model)

    def step():
        for _, p in params:
            p.grad = None
            p.grad_sample = None
        loss_fn(gsm(x), y).backward()
        # loss_reduction="mean": Opacus multiplies the output gradients by B,
        # so grad_sample_i = B·g_i, gradnoise's convention already.
        norms = None
        for _, p in params:
            gs = p.grad_sample
            if isinstance(gs, list):
                raise RuntimeError("Opacus accumulated grad_sample over several steps")
            n = _sq(gs)
            norms = n if norms is None else norms + n
            p.grad_sample = None
        return norms
    return Prepared(step)


def _opacus_ghost(model, x, y, loss_fn) -> Prepared:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    ids: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            ids[id(p)] = ids.get(id(p), 0) + 1
    tied = [n for n, p in trainable_params(model) if ids[id(p)] > 1]
    if tied:
        # Opacus raises NotImplementedError("Parameter tying is not supported
        # with Ghost Clipping") in the forward hook.
        raise Unavailable(f"ghost clipping refuses tied parameters ({', '.join(tied)})",
                          "tied weights")
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=1.0, use_ghost_clipping=True)
    params = trainable_params(model)
    def kinds(ghost: bool) -> str:
        count: dict[str, int] = {}
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)) and \
                    (type(m) in gsm.NORM_SAMPLERS) == ghost:
                count[type(m).__name__] = count.get(type(m).__name__, 0) + 1
        return ", ".join(f"{k} ×{v}" for k, v in count.items()) or "none"

    def step():
        for _, p in params:
            p.grad = None
        loss_fn(gsm(x), y).backward()
        # Per-sample norms (not squared) of B·g_i, stacked over parameters.
        return gsm.get_norm_sample().square()
    detail = (f"first backward only (norms and the unclipped gradient); ghost norms: {kinds(True)}; "
              f"per-sample gradients materialised, then normed: {kinds(False)}")
    return Prepared(step, detail=detail)


def _backpack(model, x, y, loss_fn) -> Prepared:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad
    extend(model)
    ext = BatchL2Grad()
    params = trainable_params(model)
    B = x.shape[0]
    covered: list[str] = []

    def step():
        for _, p in params:
            p.grad = None
            if hasattr(p, "batch_l2"):
                del p.batch_l2
        with backpack(ext):
            loss_fn(model(x), y).backward()
        # batch_l2 is ‖g_i‖² of the loss as given: ×B² undoes the mean.
        norms = None
        covered.clear()
        for n, p in params:
            if hasattr(p, "batch_l2"):
                covered.append(n)
                norms = p.batch_l2 if norms is None else norms + p.batch_l2
        return norms * float(B * B)

    owner = {}
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), []).append((f"{mn}.{pn}" if mn else pn, type(m).__name__))
    tied = [" = ".join(n for n, _ in v) for v in owner.values() if len(v) > 1]

    def describe():
        # What the last step left without batch_l2 (BackPACK only warns).
        missing = [n for n, p in params if n not in covered]
        kinds = sorted({owner[id(p)][0][1] for n, p in params if n in missing})
        note = f"skips {', '.join(kinds)}" if kinds else ""
        detail = (f"no BatchL2Grad extension for {', '.join(kinds)}; parameters left out: "
                  f"{', '.join(missing)}") if kinds else ""
        if tied:
            note = ", ".join(filter(None, [note, "tied: 1 use"]))
            detail = "; ".join(filter(None, [detail, f"tied {', '.join(tied)}: batch_l2 is set "
                                          "per module, so the last use overwrites the others "
                                          "instead of the per-sample gradients being summed"]))
        return note, detail
    return Prepared(step, lambda: list(covered), describe=describe)


PREPARE: dict[str, Callable] = {
    "plain": _plain,
    "gradnoise all": _gradnoise("all"),
    "gradnoise norm": _gradnoise("norm"),
    "gradnoise + noise scale": _gradnoise_noise_scale,
    "gradnoise + noise scale, clipping": lambda *a: _gradnoise_noise_scale(*a, clip=True),
    "torch.func vmap": _vmap,
    "opacus hooks": _opacus_hooks,
    "opacus ghost": _opacus_ghost,
    "backpack": _backpack,
    "compiled plain": _compiled(None),
    "compiled gradnoise all": _compiled("all"),
    "compiled gradnoise norm": _compiled("norm"),
}


def prepare(candidate: str, model: nn.Module, x, y, loss_fn) -> Prepared:
    """The candidate's step on `model` (modified in place: hooks, wrappers)."""
    if candidate not in PREPARE:
        raise ValueError(f"unknown candidate {candidate!r}; choose from {list(PREPARE)}")
    return PREPARE[candidate](model, x, y, loss_fn)


@contextlib.contextmanager
def quiet():
    """Silence the peers' per-step warnings (BackPACK warns on every backward
    for each module it skips; torch on Opacus' full backward hooks)."""
    with warnings.catch_warnings():
        for msg in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{msg}")
        yield


def first_step_warnings(caught) -> list[str]:
    """The warnings of a candidate's first step, shortened and deduplicated."""
    out: list[str] = []
    for w in caught:
        text = str(w.message)
        m = re.search(r"batching rule for (\S+?)\.", text)
        if m:
            text = f"no vmap batching rule for {m.group(1)} (torch loops over the samples)"
        else:
            text = "warning: " + text.splitlines()[0][:160]
        if text not in out:
            out.append(text)
    return out
