"""The training-step benchmark: one forward + backward + per-sample gradient
norms, with gradnoise and with its peers, side by side in one process.

Candidates (each a callable doing one full step on its own copy of the model,
same weights, same batch, gradients set to None first, returning float [B]
per-sample squared norms in gradnoise's convention ‖∇θ ℓ_i‖², i.e. ‖B·g_i‖²
for a mean-reduced loss, or None for the plain step):

- "plain": the step without norms (the baseline of every ratio);
- "gradnoise all", "gradnoise norm": GradNoiseTracker(layers="all" / "norm");
- "gradnoise + noise scale": layers="all" feeding GradientNoiseScale (per-sample
  source); the estimator's own share of the step is reported beside it;
- "torch.func vmap": functional_call + vmap(grad) over the batch; the batch
  gradient is the mean of the per-sample gradients;
- "opacus hooks": opacus.GradSampleModule (per-sample gradients in
  p.grad_sample, then their norms);
- "opacus ghost": opacus GradSampleModuleFastGradientClipping with ghost
  clipping, first backward only (norms + the unclipped gradient; DP training
  adds a second, clipped backward);
- "backpack": BackPACK's BatchL2Grad.

Per candidate: median step time, the median over repetitions of its time /
the plain step's time in the same repetition, the peak memory of one step
(measured in a fresh subprocess: VmHWM − VmRSS around the step, after a
warm-up step, with the peak reset through /proc/self/clear_refs), and the
largest relative disagreement of its norms with gradnoise layers="all" and
with a float64 torch.func truth over the parameters the candidate covers.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import models as models_mod

CANDIDATES = ("plain", "gradnoise all", "gradnoise norm", "gradnoise + noise scale",
              "torch.func vmap", "opacus hooks", "opacus ghost", "backpack")
# Targets of gradnoise's step time as a multiple of the plain step, and of its
# step peak memory.
TIME_TARGETS = {("gradnoise all", "mlp"): 1.03, ("gradnoise all", "lm"): 1.08,
                ("gradnoise all", "cnn"): 1.15, ("gradnoise norm", "mlp"): 1.02,
                ("gradnoise norm", "lm"): 1.02, ("gradnoise norm", "cnn"): 1.02,
                ("gradnoise all", "gpt2"): 1.08, ("gradnoise norm", "gpt2"): 1.02,
                ("gradnoise all", "llama"): 1.08, ("gradnoise norm", "llama"): 1.02}
PEAK_TARGET = 1.10
# The noise-scale estimator's own time per step (its reductions and
# communication), as a share of the plain step.
ESTIMATOR_TARGET = 0.01
# Peers that materialise per-sample gradients are refused above this projection.
MATERIALISE_LIMIT_BYTES = 8 * 2**30

_QUIET = ("Full backward hook is firing", "does not have an extension for Module",
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


@dataclass
class TrackerRow:
    model: str
    candidate: str
    available: bool
    reason: str = ""
    short_reason: str = ""
    threads: int = 0
    median_ms: float | None = None
    ratio: float | None = None                 # median of per-repetition time / plain
    repeats: int = 0
    peak_mb: float | None = None               # VmHWM − VmRSS around one step
    peak_ratio: float | None = None            # / the plain step's
    err_vs_gradnoise: float | None = None      # max_i |n_i − gn_i| / gn_i
    err_vs_truth: float | None = None          # ... against float64 torch.func, covered params
    coverage: str = "all"
    note: str = ""
    detail: str = ""
    target: float | None = None
    estimator_share: float | None = None       # median estimator time / plain step time

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ helpers
def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters, each once (a tied parameter under its first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _sq(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B] squared norms, without a full-size temporary."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()


def _per_sample_bytes(model: nn.Module, batch: int) -> int:
    return batch * sum(p.numel() * p.element_size() for _, p in _params(model))


def _check_materialise(model: nn.Module, batch: int, who: str) -> None:
    need = _per_sample_bytes(model, batch)
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
    return [n for n, p in _params(model) if id(p) in ids]


# --------------------------------------------------------------- candidates
def _plain_step(model, x, y, loss_fn) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
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


def _gradnoise_noise_scale(model, x, y, loss_fn) -> Prepared:
    """GradNoiseTracker(layers="all") feeding GradientNoiseScale(source="per_sample"):
    the whole measurement an adaptive-batch run makes each step."""
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
        gns.step()
        spent.append(gns.overhead_seconds - before)  # its step() and its gradient hooks
        return norms
    return Prepared(step, estimator_times=spent,
                    detail="noise scale: B_simple from the per-sample norms and ‖G_B‖² of .grad",
                    own_plain=(tracker.detach, _plain_step(model, x, y, loss_fn), tracker.attach))


def _vmap(model, x, y, loss_fn) -> Prepared:
    from torch.func import functional_call, grad, vmap
    _check_materialise(model, x.shape[0], "torch.func vmap")
    params = dict(_params(model))

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
    params = _params(model)

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
    tied = [n for n, p in _params(model) if ids[id(p)] > 1]
    if tied:
        # Opacus raises NotImplementedError("Parameter tying is not supported
        # with Ghost Clipping") in the forward hook.
        raise Unavailable(f"ghost clipping refuses tied parameters ({', '.join(tied)})",
                          "tied weights")
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=1.0, use_ghost_clipping=True)
    params = _params(model)
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
    params = _params(model)
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
    "torch.func vmap": _vmap,
    "opacus hooks": _opacus_hooks,
    "opacus ghost": _opacus_ghost,
    "backpack": _backpack,
}


def prepare(candidate: str, model: nn.Module, x, y, loss_fn) -> Prepared:
    """The candidate's step on `model` (modified in place: hooks, wrappers)."""
    if candidate not in PREPARE:
        raise ValueError(f"unknown candidate {candidate!r}; choose from {list(PREPARE)}")
    return PREPARE[candidate](model, x, y, loss_fn)


@contextlib.contextmanager
def _quiet():
    """Silence the peers' per-step warnings (BackPACK warns on every backward
    for each module it skips; torch on Opacus' full backward hooks)."""
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{msg}")
        yield


# -------------------------------------------------------------------- truth
def truth_per_param(model: nn.Module, x, y, loss_fn, chunk: int = 32) -> dict[str, torch.Tensor]:
    """{param name: float64 [B]}: ‖∇_p ℓ_i‖² by torch.func in float64, over
    chunks of samples (independent of every candidate)."""
    from torch.func import functional_call, grad, vmap
    m = copy.deepcopy(model).double()
    xd = x.double() if x.is_floating_point() else x
    params = {k: v.detach() for k, v in _params(m)}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(m, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
    f = vmap(grad(loss_one), in_dims=(None, 0, 0))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    B = x.shape[0]
    per_chunk = max(1, min(chunk, (1 << 30) // max(1, 8 * sum(p.numel() for p in params.values()))))
    for s in range(0, B, per_chunk):
        g = f(params, xd[s:s + per_chunk], y[s:s + per_chunk])
        for k, t in g.items():
            out[k].append(t.reshape(t.shape[0], -1).square().sum(1))
        del g
    return {k: torch.cat(v) for k, v in out.items()}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def _warned(caught) -> list[str]:
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


# ------------------------------------------------------------------- timing
def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(steps: dict[str, Callable], first: dict[str, float], repeats: int,
                 warmup: int, slow_budget_s: float, min_repeats: int, tick,
                 own_plain: dict[str, tuple] | None = None
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(times, paired plain times). Each repetition runs every candidate once,
    in an order rotated by one per repetition, each right next to a plain
    step (before it in even repetitions, after it in odd ones): a candidate's
    ratio to the plain step is taken against that neighbour, so that this
    machine's drift in speed between the two is seconds, not a repetition.
    The neighbour is the candidate's own model's plain step where
    `own_plain` has one (Prepared.own_plain), else the shared plain model's.
    A candidate whose step × `repeats` would exceed `slow_budget_s` runs only
    in the first max(min_repeats, budget / step) repetitions."""
    reps = {}
    for name in steps:
        t = first[name]
        reps[name] = repeats if t * repeats <= slow_budget_s else \
            min(repeats, max(min_repeats, int(slow_budget_s // max(t, 1e-9))))
    for _ in range(warmup):
        for name, fn in steps.items():
            if reps[name] == repeats:
                fn()
    plain = steps["plain"]
    own_plain = own_plain or {}

    def time_plain(name: str) -> float:
        if name not in own_plain:
            t = _time(plain)
            times["plain"].append(t)
            return t
        before, step, after = own_plain[name]
        before()
        try:
            return _time(step)
        finally:
            after()

    names = [n for n in steps if n != "plain"]
    times: dict[str, list[float]] = {n: [] for n in steps}
    paired: dict[str, list[float]] = {n: [] for n in steps}
    for name, (before, step, after) in own_plain.items():
        for _ in range(warmup):
            before()
            step()
            after()
    for r in range(repeats):
        k = r % max(1, len(names))
        shared_before = len(times["plain"])
        for name in names[k:] + names[:k]:
            if r >= reps[name]:
                continue
            if r % 2 == 0:
                tp = time_plain(name)
                tc = _time(steps[name])
            else:
                tc = _time(steps[name])
                tp = time_plain(name)
            times[name].append(tc)
            paired[name].append(tp)
        if len(times["plain"]) == shared_before:  # every candidate had its own
            times["plain"].append(_time(plain))
        paired["plain"] = times["plain"]
        gc.collect()
        tick()
    return times, paired


# ------------------------------------------------------------------- memory
def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _clear_state(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        for attr in ("grad_sample", "batch_l2"):
            if getattr(p, attr, None) is not None:
                setattr(p, attr, None)


def measure_step_peak(model_name: str, candidate: str, samples: int = 3) -> float:
    """MB: peak resident memory of one step of `candidate` above what the
    process held before it (model, batch, libraries; gradients freed), in
    this process; the median over `samples` steps (one if a step takes over
    5 s). Run in a fresh process (see `peak_memory_mb`)."""
    with _quiet():
        model, x, y, loss_fn = models_mod.build(model_name)
        prepared = prepare(candidate, model, x, y, loss_fn)
        t = time.perf_counter()
        prepared.step()                       # warm-up: one-time allocations
        slow = time.perf_counter() - t > 5.0
        peaks = []
        for _ in range(1 if slow else samples):
            _clear_state(model)
            _trim()
            base = _status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                  # resets VmHWM to the current RSS
            prepared.step()
            peaks.append(_status_kb("VmHWM") - base)
    return statistics.median(peaks) / 1024


def peak_memory_mb(model_name: str, candidate: str, timeout: float = 600.0) -> float:
    """`measure_step_peak` in a fresh Python process (so that neither the
    allocator's cache nor the other candidates' tensors blur the number)."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # A fixed mmap threshold: every allocation over 128 KiB is a mapping of its
    # own, returned to the OS when freed, so resident memory follows the live
    # allocations (scratch inside ops included) instead of glibc's adaptive
    # heap, whose reuse pattern would move the peak by ±10 MB from run to run.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    code = ("import json, torch, warnings; warnings.simplefilter('ignore'); "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            "from gradnoise.benchmarking.tracker_step import measure_step_peak; "
            f"print('PEAK', json.dumps(measure_step_peak({model_name!r}, {candidate!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK "):
            return float(json.loads(line[5:]))
    raise RuntimeError(f"memory subprocess for {model_name}/{candidate} failed "
                       f"(exit {proc.returncode}): {proc.stderr.strip()[-600:]}")


def memory_supported() -> str | None:
    """None if step peaks can be measured here, else why not."""
    try:
        _status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, RuntimeError) as e:
        return f"cannot reset the peak RSS here ({e})"
    return None


# ---------------------------------------------------------------------- run
def run(models: Iterable[str] = models_mod.DEFAULT_MODELS, repeats: int = 10,
        on_progress: Callable[[str, int, int], None] | None = None,
        candidates: Iterable[str] = CANDIDATES, memory: bool = True, check: bool = True,
        warmup: int = 2, slow_budget_s: float = 30.0, min_repeats: int = 3) -> list[TrackerRow]:
    """Time every candidate on every model; one TrackerRow per (model, candidate).

    on_progress(description, completed, total) is called as the work advances
    (units: per model, one check, `repeats` repetitions, one memory run per
    available candidate).
    """
    models = list(models)
    candidates = list(candidates)
    if "plain" not in candidates:
        candidates = ["plain"] + candidates
    mem_why = memory_supported() if memory else "not requested"
    total = len(models) * (1 + repeats + (len(candidates) if mem_why is None else 0))
    done = 0

    def progress(desc: str, advance: int = 0):
        nonlocal done
        done += advance
        if on_progress is not None:
            on_progress(desc, done, total)

    rows: list[TrackerRow] = []
    with _quiet():
        for mname in models:
            model, x, y, loss_fn = models_mod.build(mname)
            progress(f"{mname}: preparing")
            prepared: dict[str, Prepared] = {}
            out: dict[str, TrackerRow] = {}
            for c in candidates:
                out[c] = TrackerRow(mname, c, True, threads=torch.get_num_threads(),
                                    target=TIME_TARGETS.get((c, mname)))
                try:
                    prepared[c] = prepare(c, copy.deepcopy(model), x, y, loss_fn)
                except Unavailable as e:
                    out[c].available, out[c].reason, out[c].short_reason = False, str(e), e.short
                except ImportError as e:
                    out[c].available, out[c].reason = False, f"not installed ({e})"
                    out[c].short_reason = "not installed"
                except Exception as e:  # the peer refuses the model: a result too
                    out[c].available, out[c].reason = False, f"{type(e).__name__}: {e}"
                    out[c].short_reason = type(e).__name__
            # One step each: the check of the norms, and the first warm-up.
            norms, first = {}, {}
            said: dict[str, list[str]] = {}
            for c, p in list(prepared.items()):
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        for msg in _QUIET:
                            warnings.filterwarnings("ignore", message=f".*{msg}")
                        t = time.perf_counter()
                        n = p.step()
                        first[c] = time.perf_counter() - t
                    norms[c] = None if n is None else n.detach().double()
                    said[c] = _warned(caught)
                except Exception as e:  # a peer failing on this model is a result
                    out[c].available, out[c].reason = False, f"{type(e).__name__}: {e}"
                    out[c].short_reason = f"fails: {type(e).__name__}"
                    del prepared[c]
            if "plain" not in prepared:
                raise RuntimeError(f"the plain step failed on {mname}: {out['plain'].reason}")
            if check:
                truth = truth_per_param(model, x, y, loss_fn)
                all_names = [n for n, _ in _params(model)]
                gn = norms.get("gradnoise all")
                for c, n in norms.items():
                    if n is None:
                        continue
                    covered = prepared[c].covered() or all_names
                    ref = sum(truth[k] for k in covered)
                    out[c].err_vs_truth = max_rel_err(n, ref)
                    if gn is not None and c not in ("gradnoise all", "gradnoise norm"):
                        out[c].err_vs_gradnoise = max_rel_err(n, gn)
                    if len(covered) != len(all_names):
                        cov = sum(int(dict(_params(model))[k].numel()) for k in covered)
                        tot = sum(int(p.numel()) for _, p in _params(model))
                        out[c].coverage = f"{len(covered)}/{len(all_names)} ({cov / tot:.1%})"
                        if c == "gradnoise norm":
                            frac = statistics.median((n / gn).tolist()) if gn is not None else float("nan")
                            out[c].coverage = f"norm ({cov / tot:.2%})"
                            out[c].note = ", ".join(filter(None, [out[c].note, f"= {frac:.1%} of all"]))
            progress(f"{mname}: checked", 1)
            for c, p in prepared.items():
                note, detail = p.describe() if p.describe else (p.note, p.detail)
                if any(w.startswith("no vmap batching rule") for w in said.get(c, [])):
                    note = ", ".join(filter(None, [note, "vmap loops"]))
                out[c].note = ", ".join(filter(None, [out[c].note, note]))
                out[c].detail = "; ".join(filter(None, [detail] + said.get(c, [])))
            steps = {c: p.step for c, p in prepared.items()}
            for p in prepared.values():
                if p.estimator_times is not None:
                    p.estimator_times.clear()  # the check and warm-up steps do not count
            own = {c: p.own_plain for c, p in prepared.items() if p.own_plain is not None}
            times, paired = _interleaved(steps, first, repeats, warmup, slow_budget_s,
                                         min_repeats, lambda: progress(f"{mname}: timing", 1),
                                         own)
            for c, ts in times.items():
                out[c].repeats = len(ts)
                out[c].median_ms = statistics.median(ts) * 1e3
                out[c].ratio = statistics.median(a / b for a, b in zip(ts, paired[c]))
                est = prepared[c].estimator_times
                if est:
                    # the last len(ts) entries are the timed steps (warm-up ran first)
                    share = statistics.median(e / b for e, b in zip(est[-len(ts):], paired[c]))
                    out[c].estimator_share = share
                    out[c].note = ", ".join(filter(None, [out[c].note, f"estimator {share:.2%}"]))
            del steps, prepared
            _trim()
            if mem_why is None:
                for c in candidates:
                    if out[c].available:
                        progress(f"{mname}: memory of {c}")
                        try:
                            out[c].peak_mb = peak_memory_mb(mname, c)
                        except Exception as e:
                            out[c].detail = "; ".join(filter(None, [out[c].detail, f"memory: {e}"]))
                    progress(f"{mname}: memory", 1)
            elif memory:
                out["plain"].detail = "; ".join(filter(None, [out["plain"].detail,
                                                              f"memory not measured: {mem_why}"]))
            if mem_why is None:
                base = out["plain"].peak_mb
                for c in candidates:
                    if out[c].peak_mb is not None and base:
                        out[c].peak_ratio = out[c].peak_mb / base
            rows.extend(out[c] for c in candidates)
    return rows


# ------------------------------------------------------------------ display
def _fmt(v, spec, suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def render_table(rows: list[TrackerRow], title: str | None = None):
    """A rich Table: one line per (model, candidate), a section per model.
    Fits 120 columns; the long texts are in `footnotes(rows)`."""
    from rich import box
    from rich.table import Table
    threads = max((r.threads for r in rows), default=0) or torch.get_num_threads()
    reps = max((r.repeats for r in rows), default=0)
    table = Table(title=title or (f"Training step with per-sample gradient norms vs the plain step "
                                  f"({threads} thread{'s' if threads != 1 else ''}, median of up to {reps} interleaved "
                                  f"repetitions)"), box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col, just in (("model", "left"), ("candidate", "left"), ("ms/step", "right"),
                      ("reps", "right"), ("×plain", "right"), ("target", "right"),
                      ("peak MB", "right"), ("×plain", "right"), ("Δ gn", "right"),
                      ("Δ fp64", "right"), ("covers", "left"), ("notes", "left")):
        table.add_column(col, justify=just, no_wrap=col != "notes")
    last = None
    for r in rows:
        if last is not None and r.model != last:
            table.add_section()
        model_cell = r.model if r.model != last else ""
        last = r.model
        if not r.available:
            table.add_row(model_cell, r.candidate, "n/a", "", "", "", "", "", "", "", "",
                          f"[yellow]{r.short_reason or _short(r.reason)}")
            continue
        ratio = _fmt(r.ratio, ".3f" if r.ratio is None or r.ratio < 10 else ".1f", "×")
        if r.target is not None and r.ratio is not None:
            ratio = f"[{'green' if r.ratio <= r.target else 'red'}]{ratio}"
        peak_ratio = _fmt(r.peak_ratio, ".2f" if r.peak_ratio is None or r.peak_ratio < 10 else ".0f", "×")
        if r.candidate.startswith("gradnoise") and r.peak_ratio is not None:
            peak_ratio = f"[{'green' if r.peak_ratio <= PEAK_TARGET else 'red'}]{peak_ratio}"
        plain = r.candidate == "plain"
        table.add_row(model_cell, r.candidate, _fmt(r.median_ms, ".1f"), str(r.repeats),
                      "1" if plain else ratio, _fmt(r.target, ".2f", "×"),
                      _fmt(r.peak_mb, ".0f"), "1" if plain else peak_ratio,
                      _fmt(r.err_vs_gradnoise, ".0e"), _fmt(r.err_vs_truth, ".0e"),
                      "" if plain else r.coverage, r.note)
    return table


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def footnotes(rows: list[TrackerRow]) -> list[str]:
    """The long texts: the columns, why a candidate is n/a, what a peer leaves out."""
    out = ["Δ gn: max over samples of |norm − gradnoise layers='all'| / gradnoise; Δ fp64: the same "
           "against torch.func in float64, over the parameters the candidate covers; covers: parameter "
           "tensors measured (share of all parameters); peak MB: resident-memory peak of one step "
           "above what the process held before it, in a fresh process"]
    for r in rows:
        if not r.available:
            out.append(f"{r.model} / {r.candidate}: n/a: {r.reason}")
        elif r.detail:
            out.append(f"{r.model} / {r.candidate}: {r.detail}")
    return out


def verdict(rows: list[TrackerRow]) -> tuple[int, list[str]]:
    """(number of gradnoise targets missed, one line per miss)."""
    missed = []
    for r in rows:
        if not (r.available and r.candidate.startswith("gradnoise")):
            continue
        if r.target is not None and r.ratio is not None and r.ratio > r.target:
            missed.append(f"{r.model} / {r.candidate}: {r.ratio:.3f}× > {r.target:.2f}×")
        if r.peak_ratio is not None and r.peak_ratio > PEAK_TARGET:
            missed.append(f"{r.model} / {r.candidate}: peak {r.peak_ratio:.2f}× > {PEAK_TARGET:.2f}×")
        if r.estimator_share is not None and r.estimator_share > ESTIMATOR_TARGET:
            missed.append(f"{r.model} / {r.candidate}: estimator {r.estimator_share:.2%} of the "
                          f"plain step > {ESTIMATOR_TARGET:.0%}")
    return len(missed), missed


def print_report(rows: list[TrackerRow], console) -> int:
    """Print the table, its footnotes and the targets; return the number missed."""
    console.print(render_table(rows))
    for line in footnotes(rows):
        console.print(f"  {line}", highlight=False)
    n, missed = verdict(rows)
    targets = ("targets for gradnoise: layers='all' ≤ 1.03× (mlp), ≤ 1.08× (lm), ≤ 1.15× (cnn); "
               f"layers='norm' ≤ 1.02×; step peak memory ≤ {PEAK_TARGET:.2f}× the plain step's; "
               f"noise-scale estimator ≤ {ESTIMATOR_TARGET:.0%} of the plain step.")
    console.print(targets + (" all met." if not n else f" {n} missed: " + "; ".join(missed)),
                  highlight=False)
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        console.print(f"load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs",
                      highlight=False)
    return n


if __name__ == "__main__":
    from rich.console import Console
    import argparse
    ap = argparse.ArgumentParser(description="training-step benchmark against peers")
    ap.add_argument("--models", nargs="*", default=["mlp", "lm", "cnn"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)
    res = run(a.models, a.repeats, memory=not a.no_memory,
              on_progress=lambda d, k, n: print(f"[{k}/{n}] {d}", file=sys.stderr, flush=True))
    print_report(res, console)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([r.to_dict() for r in res], f, indent=1)
