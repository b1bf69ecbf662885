"""The adaptive-batch controller: chooses the batch size and scales the learning
rate while training runs, from the gradient noise scale measured on the way.

    controller = AdaptiveBatch(model, opt, dataset, initial_batch=32, max_batch=1024)
    for x, y in controller:                 # one epoch of micro-batches (already collated)
        loss = loss_fn(model(x), y)         # a mean over the micro-batch's samples
        controller.backward(loss)           # instead of loss.backward()
        if controller.step():               # instead of opt.step(); opt.zero_grad()
            scheduler.step()                # the user's own scheduler, untouched

Batch = micro_batch × accumulation steps × world size (global batch = per-replica
batch × replicas; gradient accumulation raises the batch beyond what fits in
memory). The controller owns sampling, so that a batch that grows in the
middle of an epoch drops no sample and repeats none (gradnoise.data).

Policies (the batch for the next steps):
  "critical"  follow the critical batch B_crit ≈ B_noise ≈ B_simple = tr Σ/‖G‖²
              (McCandlish et al. 2018, "An Empirical Model of Large-Batch
              Training"): training at B ≪ B_noise wastes optimizer steps,
              B ≫ B_noise wastes samples, since steps and samples to a target
              loss trade off as (S/S_min − 1)(E/E_min − 1) = 1. Target
              c·B_simple (c = critical_factor), with hysteresis, grow-only by
              default.
  "goodput"   maximise goodput(B) = throughput(B) × efficiency(B) (Pollux /
              AdaptDL, Qiao et al. 2021, OSDI). Under McCandlish's model a
              step of batch B makes as much progress as (1 + B_noise/B)⁻¹
              noiseless steps, so the progress *per sample*, relative to the
              initial batch B0, is
                  efficiency(B) = (φ + B0) / (φ + B),   φ = B_simple;
              throughput(B) = B / time(B) with time(B) = α + β·B fitted by
              least squares to the measured seconds per optimizer step. The
              optimum of B/(α+βB) · (φ+B0)/(φ+B) is B* = sqrt(α φ / β); the
              valid batch sizes on either side of it are compared.
  "schedule"  a given ramp: a callable samples_seen -> batch, or a list of
              (samples_seen threshold, batch) pairs (Megatron-LM's batch-size
              ramp-up; Smith et al. 2018, "Don't Decay the Learning Rate,
              Increase the Batch Size"). See `ramp_schedule`.

Learning-rate rules (a factor on the optimizer's current lr, s = B/B0):
  "none"        1
  "linear"      s (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
  "sqrt"        sqrt(s) (for the Adam family; Malladi et al. 2022, "On the
                SDEs and Scaling Rules for Adaptive Gradient Algorithms")
  "adascale"    r = (tr Σ + ‖G‖²) / (tr Σ/s + ‖G‖²) (Johnson et al. 2020,
                "AdaScale SGD"), from the smoothed estimates
  "mccandlish"  ε(B)/ε(B0) with ε(B) = ε_max / (1 + B_noise/B)
When the batch changes, the factor moves linearly from its old value to the
new one over `warmup_steps` optimizer steps. Goyal et al. 2017 pair the linear
rule with a warm-up, and practice explains why: the "double the
batch, double the learning rate" rule fails while the weights still change
fast and while the batch is small and its gradient variance large, and a
learning rate that jumps at once can throw the model far off before the
larger batch has steadied it.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, default_collate

from .data import EpochSampler, StepPlan, plan_step
from .estimators import NoiseScale

__all__ = ["AdaptiveBatch", "BatchLimits", "CriticalBatchPolicy", "GoodputPolicy",
           "SchedulePolicy", "probe_micro_batch", "ramp_schedule",
           "lr_factor", "default_memory_budget", "LR_RULES", "POLICIES", "NOISE_SOURCES",
           "RECORD_FIELDS", "MIN_ESTIMATE_STEPS"]

LR_RULES = ("none", "linear", "sqrt", "adascale", "mccandlish")
POLICIES = ("critical", "goodput", "schedule")
NOISE_SOURCES = ("auto", "per_sample", "micro_batch", "distributed")
# Steps the smoothed estimate must have behind it before a policy or an LR
# rule acts on it: a bias-corrected EMA of fewer steps is mostly noise.
MIN_ESTIMATE_STEPS = 10
RECORD_FIELDS = ("step", "samples", "epoch", "loss", "b_simple", "b_simple_stderr",
                 "batch_size", "micro_batch", "accumulation", "lr", "lr_factor", "seconds",
                 "next_batch_size", "skipped")


def _usable(reading: NoiseScale | None, min_steps: int = MIN_ESTIMATE_STEPS) -> bool:
    """A reading a decision may rest on: defined, positive, finite, and
    averaged over at least `min_steps` steps."""
    return (reading is not None and reading.b_simple is not None
            and reading.sq_norm is not None and reading.sq_norm > 0
            and math.isfinite(reading.b_simple) and reading.b_simple > 0
            and reading.steps >= min_steps)


# --------------------------------------------------------------- LR rules
def lr_factor(rule: str, batch: int, initial_batch: int, reading: NoiseScale | None,
              min_estimate_steps: int = MIN_ESTIMATE_STEPS) -> float | None:
    """The factor on the learning rate at batch B relative to B0 = initial_batch
    (s = B/B0), or None when the rule needs a noise estimate that is not
    usable yet.

        none        1
        linear      s                                      (Goyal et al. 2017)
        sqrt        sqrt(s)                                (Malladi et al. 2022)
        adascale    (tr Σ + ‖G‖²) / (tr Σ/s + ‖G‖²)        (Johnson et al. 2020)
        mccandlish  ε(B)/ε(B0) = (1 + φ/B0) / (1 + φ/B),  φ = B_simple,
                    from ε(B) = ε_max / (1 + B_noise/B)    (McCandlish et al. 2018)
    """
    s = batch / initial_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return s
    if rule == "sqrt":
        return math.sqrt(s)
    if rule not in ("adascale", "mccandlish"):
        raise ValueError(f"lr_factor: unknown rule {rule!r}; expected one of {LR_RULES}")
    if batch == initial_batch:
        return 1.0
    if not _usable(reading, min_estimate_steps):
        return None
    if rule == "adascale":
        trace, sq_norm = max(reading.trace, 0.0), reading.sq_norm
        return (trace + sq_norm) / (trace / s + sq_norm)
    phi = reading.b_simple
    return (1.0 + phi / initial_batch) / (1.0 + phi / batch)


class _LRRamp:
    """Linear warm-up of the LR factor after a batch change: over the next
    `warmup_steps` optimizer steps the factor goes from the last factor used
    before the change to the rule's current value (which the adascale and
    mccandlish rules keep moving), reaching it at the last step."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.start: float | None = None
        self.done = 0

    @property
    def active(self) -> bool:
        return self.start is not None

    def begin(self, from_factor: float) -> None:
        if self.warmup_steps > 0:
            self.start, self.done = float(from_factor), 0

    def value(self, target: float) -> float:
        """The factor for the coming optimizer step (does not advance)."""
        if self.start is None:
            return target
        return self.start + (target - self.start) * (self.done + 1) / self.warmup_steps

    def advance(self) -> None:
        if self.start is not None:
            self.done += 1
            if self.done >= self.warmup_steps:
                self.start, self.done = None, 0

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "start": self.start, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps, self.start, self.done = (state["warmup_steps"], state["start"],
                                                    state["done"])


# --------------------------------------------------------------- policies
@dataclass
class BatchLimits:
    """Valid batch sizes and how a policy's wish becomes a change.

    Valid sizes are the multiples of `unit` = micro_batch × world_size in
    [min_batch, max_batch]. `accept` applies grow-only and hysteresis: the
    batch moves to the wanted size only if it is at least (1 + hysteresis)
    times the current one (at most current/(1 + hysteresis) when shrinking is
    allowed), or if the wish lies at or beyond a bound (then the bound is
    taken, since a batch one step short of max_batch would otherwise wait
    forever for a wish it cannot reach).
    """
    min_batch: int
    max_batch: int
    unit: int
    initial_batch: int
    grow_only: bool = True
    hysteresis: float = 0.25
    min_estimate_steps: int = MIN_ESTIMATE_STEPS

    def round(self, batch: float) -> int:
        """The nearest valid batch size (halves round up), clamped to the bounds."""
        k = math.floor(batch / self.unit + 0.5)
        return int(min(max(k * self.unit, self.min_batch), self.max_batch))

    def accept(self, current: int, wanted: float) -> int:
        """The next batch size given the policy's (unrounded) wish."""
        if not math.isfinite(wanted):
            return current
        target = self.round(wanted)
        h = 1.0 + self.hysteresis
        if target > current and (wanted >= h * current or wanted >= self.max_batch):
            return target
        if (not self.grow_only and target < current
                and (wanted <= current / h or wanted <= self.min_batch)):
            return target
        return current


class CriticalBatchPolicy:
    """Follow the critical batch: wish = critical_factor · B_simple (the
    smoothed estimate; McCandlish et al. 2018), applied through
    `BatchLimits.accept` (bounds, grow-only, hysteresis) once the estimate has
    `min_estimate_steps` steps behind it."""
    name = "critical"

    def __init__(self, critical_factor: float = 1.0):
        if not (isinstance(critical_factor, (int, float)) and critical_factor > 0
                and math.isfinite(critical_factor)):
            raise ValueError(f"AdaptiveBatch: `critical_factor` must be a positive number, "
                             f"got {critical_factor!r}")
        self.critical_factor = float(critical_factor)

    def observe(self, batch_size: int, seconds: float) -> None:
        pass

    def decide(self, current: int, reading: NoiseScale | None, samples_seen: int,
               limits: BatchLimits) -> int:
        if not _usable(reading, limits.min_estimate_steps):
            return current
        return limits.accept(current, self.critical_factor * reading.b_simple)

    def state_dict(self) -> dict:
        return {"name": self.name, "critical_factor": self.critical_factor}

    def load_state_dict(self, state: dict) -> None:
        self.critical_factor = state["critical_factor"]


class GoodputPolicy:
    """Maximise goodput (Pollux/AdaptDL, Qiao et al. 2021):

        goodput(B) = throughput(B) · efficiency(B)
                   = B / (α + β·B) · (φ + B0) / (φ + B),     φ = B_simple,

    efficiency being the progress per sample relative to the initial batch
    B0 under McCandlish's model (a batch-B step is worth 1/(1 + φ/B) noiseless
    steps). time(B) = α + β·B (seconds per optimizer step: α the per-step
    overhead, β the cost per sample) is a least-squares fit, weighted by the
    number of steps, to the mean time of each batch size measured. Its
    maximiser is B* = sqrt(α φ / β); the valid sizes either side of B* (within
    the bounds, and ≥ the current batch when grow-only) are compared.

    Prior: while the measured batch sizes span less than a factor
    `min_spread` (a single size, or a batch and the smaller last step of an
    epoch), α and β cannot be told apart from timing noise; the fit then
    assumes a share `prior_overhead` of the (pooled) step time is overhead.
    With the default 0.5 this puts B* at sqrt(B·φ), the geometric mean of
    the current batch and the noise scale: a cautious first move that also
    yields the second, distinct size the fit needs.

    The controller feeds it the seconds of every optimizer step (the slowest
    rank's under DDP) except the first one of each process, which pays for
    warm-up (allocations, lazy initialisation).
    """
    name = "goodput"

    def __init__(self, prior_overhead: float = 0.5, min_spread: float = 1.5):
        if not 0.0 < prior_overhead < 1.0:
            raise ValueError(f"GoodputPolicy: `prior_overhead` must be in (0, 1), got "
                             f"{prior_overhead!r}")
        if not min_spread > 1.0:
            raise ValueError(f"GoodputPolicy: `min_spread` must be > 1, got {min_spread!r}")
        self.prior_overhead = float(prior_overhead)
        self.min_spread = float(min_spread)
        self.times: dict[int, list[float]] = {}   # batch -> [steps, Σ seconds]

    def observe(self, batch_size: int, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            entry = self.times.setdefault(int(batch_size), [0, 0.0])
            entry[0] += 1
            entry[1] += float(seconds)

    def fit(self) -> tuple[float, float] | None:
        """(α, β) of time(B) = α + β·B, both ≥ 0, or None without data."""
        points = [(b, n, s / n) for b, (n, s) in sorted(self.times.items()) if n > 0]
        if not points:
            return None
        w = sum(n for _, n, _ in points)
        mean_b = sum(n * b for b, n, _ in points) / w
        mean_t = sum(n * t for _, n, t in points) / w
        if points[-1][0] < self.min_spread * points[0][0]:
            return self.prior_overhead * mean_t, (1.0 - self.prior_overhead) * mean_t / mean_b
        var = sum(n * (b - mean_b) ** 2 for b, n, _ in points)
        cov = sum(n * (b - mean_b) * (t - mean_t) for b, n, t in points)
        beta = cov / var
        alpha = mean_t - beta * mean_b
        if beta < 0:
            return mean_t, 0.0
        if alpha < 0:
            return 0.0, sum(n * t * b for b, n, t in points) / sum(n * b * b for b, n, _ in points)
        return alpha, beta

    @staticmethod
    def goodput(batch: float, alpha: float, beta: float, phi: float, initial_batch: float
                ) -> float:
        """Samples per second, discounted to initial-batch-equivalent progress."""
        return batch / (alpha + beta * batch) * (phi + initial_batch) / (phi + batch)

    def best(self, current: int, phi: float, limits: BatchLimits) -> int | None:
        """The valid batch of highest goodput (None without timing data)."""
        fit = self.fit()
        if fit is None:
            return None
        alpha, beta = fit
        lo = current if limits.grow_only else limits.min_batch
        hi = limits.max_batch
        if beta <= 0:
            return hi
        if alpha <= 0:
            return lo
        b_star = math.sqrt(alpha * phi / beta)
        below = math.floor(b_star / limits.unit) * limits.unit
        candidates = {min(max(b, lo), hi) for b in (below, below + limits.unit)}
        return max(sorted(candidates),
                   key=lambda b: self.goodput(b, alpha, beta, phi, limits.initial_batch))

    def decide(self, current: int, reading: NoiseScale | None, samples_seen: int,
               limits: BatchLimits) -> int:
        if not _usable(reading, limits.min_estimate_steps):
            return current
        best = self.best(current, reading.b_simple, limits)
        return current if best is None else limits.accept(current, best)

    def state_dict(self) -> dict:
        return {"name": self.name, "prior_overhead": self.prior_overhead,
                "min_spread": self.min_spread,
                "times": {b: list(v) for b, v in self.times.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prior_overhead, self.min_spread = state["prior_overhead"], state["min_spread"]
        self.times = {int(b): list(v) for b, v in state["times"].items()}


class SchedulePolicy:
    """A fixed batch-size ramp over samples seen: a callable
    samples_seen -> batch, or a list of (samples_seen threshold, batch)
    pairs, thresholds increasing (the batch of the last threshold reached;
    the initial batch before the first). Followed as given, rounded to a
    valid size and clamped to the bounds: no hysteresis, and it may shrink
    the batch whatever grow_only says."""
    name = "schedule"

    def __init__(self, schedule):
        if callable(schedule):
            self.schedule = schedule
            return
        try:
            pairs = [(int(t), int(b)) for t, b in schedule]
        except (TypeError, ValueError):
            raise ValueError("AdaptiveBatch: `schedule` must be a callable samples_seen -> batch "
                             "or a list of (samples_seen threshold, batch) pairs, got "
                             f"{schedule!r}") from None
        if not pairs:
            raise ValueError("AdaptiveBatch: `schedule` is an empty list")
        if any(t < 0 or b < 1 for t, b in pairs):
            raise ValueError(f"AdaptiveBatch: `schedule` thresholds must be ≥ 0 and batches ≥ 1, "
                             f"got {pairs}")
        if any(t2 <= t1 for (t1, _), (t2, _) in zip(pairs, pairs[1:])):
            raise ValueError(f"AdaptiveBatch: `schedule` thresholds must increase, got {pairs}")
        self.schedule = pairs

    def wanted(self, samples_seen: int) -> int | None:
        if callable(self.schedule):
            return int(self.schedule(samples_seen))
        chosen = None
        for threshold, batch in self.schedule:
            if samples_seen >= threshold:
                chosen = batch
        return chosen

    def observe(self, batch_size: int, seconds: float) -> None:
        pass

    def decide(self, current: int, reading: NoiseScale | None, samples_seen: int,
               limits: BatchLimits) -> int:
        wanted = self.wanted(samples_seen)
        return current if wanted is None else limits.round(wanted)

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        pass


class ramp_schedule:
    """Megatron-LM's batch-size ramp-up (``--rampup-batch-size start increment
    samples``, as in GPT-3's training): start at `start`, add `increment`
    in equal intervals of samples so as to reach `stop` after `ramp_samples`
    samples, then stay at `stop`. A picklable callable samples -> batch for
    policy="schedule"."""

    def __init__(self, start: int, stop: int, increment: int, ramp_samples: int):
        if not (0 < start <= stop and increment > 0 and ramp_samples > 0):
            raise ValueError("ramp_schedule: need 0 < start ≤ stop, increment > 0 and "
                             "ramp_samples > 0")
        if (stop - start) % increment:
            raise ValueError(f"ramp_schedule: stop − start = {stop - start} is not a multiple of "
                             f"increment = {increment}")
        self.start, self.stop = start, stop
        self.increment, self.ramp_samples = increment, ramp_samples

    def __call__(self, samples_seen: int) -> int:
        increments = (self.stop - self.start) // self.increment
        if increments == 0:
            return self.stop
        per = self.ramp_samples / increments
        return min(self.stop, self.start + self.increment * int(samples_seen // per))


# ------------------------------------------------------------ memory probe
def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """Bytes the controller may plan for: on CUDA 90% of (free memory + what
    this process's tensors already hold, torch.cuda.mem_get_info and
    memory_allocated); elsewhere half of MemAvailable from /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * (free + torch.cuda.memory_allocated(device)))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _default_probe_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    floats = [t for t in _flat_tensors(out) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise ValueError("probe_micro_batch: the model's output holds no floating-point tensor "
                         "that requires grad; pass loss_fn=(model, batch) -> scalar loss")
    return sum(t.sum() for t in floats)


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _flat_tensors(v)]
    return []


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):   # sparse, nested, ...
        return None, 0
    return (st.device, st.data_ptr()), st.nbytes()


def _optimizer_state_bytes(optimizer, module: nn.Module, probe_copy: nn.Module) -> int:
    """Bytes of optimizer state for `module`'s parameters, measured after one
    step of a fresh optimizer of the same type and settings on the probe's
    copy (which holds the probe's gradients); estimated as 2× the trainable
    parameters for Adam-like optimizers (those with `betas`), 1× for
    momentum SGD, 0 otherwise when the optimizer cannot be rebuilt."""
    if optimizer is None:
        return 0
    trainable = sum(p.nelement() * p.element_size() for p in module.parameters() if p.requires_grad)
    try:
        mapping = {id(p): q for p, q in zip(module.parameters(), probe_copy.parameters())}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [mapping[id(p)] for p in g["params"]]}
                  for g in optimizer.param_groups]
        clone = type(optimizer)(groups, **optimizer.defaults)
        clone.step()
        seen, total = set(), 0
        for state in clone.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    key, nbytes = _storage_key(v)
                    if key not in seen:
                        seen.add(key)
                        total += nbytes
        return total
    except Exception:
        defaults = getattr(optimizer, "defaults", {})
        if "betas" in defaults:
            return 2 * trainable
        if defaults.get("momentum", 0):
            return trainable
        return 0


def probe_micro_batch(model: nn.Module, sample_batch_fn: Callable[[int], Any], optimizer=None,
                      memory_budget: int | None = None, *,
                      loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                      samples: int = 2) -> tuple[int, int, int]:
    """The largest micro-batch whose training step fits in `memory_budget` bytes.

        micro_batch = ⌊(memory_budget − static_bytes) / bytes_per_sample⌋

    bytes_per_sample: one forward+backward of `samples` (2) samples from
    `sample_batch_fn(n)` on a deep copy of the model, under
    torch.autograd.graph.saved_tensors_hooks, counting the bytes of every
    storage saved for backward once (by data_ptr) and leaving out the
    parameters' and buffers' own storages; divided by the number of samples.
    static_bytes: parameters + buffers + gradients of the trainable
    parameters + optimizer state (measured after one step of a copy of the
    optimizer, see `_optimizer_state_bytes`). Transient memory (the
    activation gradients of backward, allocator slack) is not counted: the
    default budget (`default_memory_budget`) leaves room for it.

    The model and optimizer are left untouched. `loss_fn(model, batch)` gives
    the scalar to differentiate; by default the sum of the model's outputs
    for `batch[0]` (or `**batch` for a mapping, or `batch` itself).

    Returns (micro_batch, bytes_per_sample, static_bytes).
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    probe = copy.deepcopy(module)
    own = {_storage_key(t)[0] for t in list(probe.parameters()) + list(probe.buffers())}
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key is not None and key[1] != 0 and key not in own:
            saved.setdefault(key, nbytes)
        return t

    batch = sample_batch_fn(samples)
    with torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (loss_fn or _default_probe_loss)(probe, batch)
        loss.backward()
    bytes_per_sample = max(1, math.ceil(sum(saved.values()) / samples))
    unique = {id(p): p for p in module.parameters()}.values()
    param_bytes = sum(p.nelement() * p.element_size() for p in unique)
    grad_bytes = sum(p.nelement() * p.element_size() for p in unique if p.requires_grad)
    buffer_bytes = sum(b.nelement() * b.element_size() for b in module.buffers())
    static = (param_bytes + buffer_bytes + grad_bytes
              + _optimizer_state_bytes(optimizer, module, probe))
    micro = (int(memory_budget) - static) // bytes_per_sample
    if micro < 1:
        raise ValueError(
            f"probe_micro_batch: memory_budget={int(memory_budget)} bytes cannot hold the model "
            f"({static} bytes of parameters, gradients, buffers and optimizer state) plus one "
            f"sample ({bytes_per_sample} bytes saved for backward)")
    return int(micro), int(bytes_per_sample), int(static)


# ------------------------------------------------------- per-sample source
# ------------------------------------------------------------- controller
def _positive_int(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"AdaptiveBatch: `{name}` must be a positive integer, got {value!r}")
    return value


def _batchnorm_training(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _require_methods(obj, methods, what: str) -> None:
    """Raise naming the methods a user-supplied object lacks."""
    missing = [m for m in methods if not hasattr(obj, m)]
    if missing:
        raise ValueError(f"AdaptiveBatch: {what}; {type(obj).__name__} lacks {missing}")


class AdaptiveBatch:
    """Adaptive batch size and learning rate for a plain training loop.

        controller = AdaptiveBatch(model, opt, dataset, initial_batch=32, max_batch=1024)
        for x, y in controller:              # micro-batches of one epoch
            loss = loss_fn(model(x), y)
            controller.backward(loss)
            if controller.step():
                scheduler.step()

    Args:
        model: the model (a DistributedDataParallel model for data parallelism).
        optimizer: its optimizer; `step()` calls optimizer.step() and zero_grad().
        data: a map-style torch Dataset, or a DataLoader, of which only the
            dataset and collate_fn are used: the controller owns sampling
            (its sampler, batch size, shuffle and workers are ignored; batches
            are loaded in the main process).
        initial_batch: the first global batch size B0, also the batch the
            optimizer's learning rate is tuned for (the LR rules' reference).
        min_batch, max_batch: bounds of the global batch (min_batch defaults
            to the smallest valid size, micro_batch × world_size).
        micro_batch: samples per forward/backward on one process. Default: the
            largest size that fits `memory_budget` (`probe_micro_batch`),
            lowered to the largest divisor of initial_batch / world_size, so
            that the initial batch is realised exactly. Batch sizes are
            multiples of micro_batch × world_size: when micro_batch is given,
            initial_batch, min_batch and max_batch must be such multiples
            (a clear error otherwise); when it is probed, min_batch is rounded
            up and max_batch down to one.
        policy: "critical", "goodput", "schedule" (see the module docstring),
            or a policy object (e.g. GoodputPolicy(prior_overhead=0.3)).
        lr_rule: "none", "linear", "sqrt", "adascale", "mccandlish", or a
            callable (batch, initial_batch, reading) -> factor or None.
            The factor multiplies every param group's lr only for the
            duration of optimizer.step(): the lr your scheduler sets is
            restored afterwards, so the scheduler never sees the factor.
            The factor is that of the nominal batch, also in the smaller last
            step of an epoch. The adascale and mccandlish rules need a noise
            estimate (MIN_ESTIMATE_STEPS steps); until then the last factor
            (1 at first) is kept.
        noise_source: where the small batch of the noise-scale estimate comes
            from. "auto": "distributed" under DistributedDataParallel with
            ≥ 2 processes; otherwise "per_sample" (a GradNoiseTracker) unless
            the model has BatchNorm in train mode or a module the tracker
            could only measure by its slow fallback, then "micro_batch".
            "micro_batch" needs ≥ 2 backward passes per step: a step of one
            micro-batch is run as two halves (BatchNorm then normalises over
            half as many samples). Not available with ≥ 2 DDP processes. A
            ready object with the GradientNoiseScale interface (step(batch_size),
            read(), state_dict(), load_state_dict(); optional
            after_backward(loss_scale, batch_size) and attribute `source`) is
            used as is.
        warmup_steps: optimizer steps over which the LR factor ramps linearly
            to its new value after a batch change (0: at once).
        critical_factor: c in the critical policy's target c·B_simple.
        hysteresis: h: a policy's wish is taken only when ≥ (1 + h)·current
            (≤ current/(1 + h) when shrinking), or beyond a bound.
        grow_only: never shrink the batch (critical and goodput policies).
        schedule: for policy="schedule": a callable samples_seen -> batch, or
            a list of (samples_seen threshold, batch) pairs; see ramp_schedule.
        memory_budget: bytes for the micro-batch probe (default
            `default_memory_budget`); unused when micro_batch is given.
        seed: seed of the per-epoch permutations (the same on every rank).
        collate_fn: turns a list of dataset items into a batch (default: the
            DataLoader's, else torch.utils.data.default_collate).
        log_path: a .csv or .jsonl file that receives every record (rank 0 only).
        tensorboard_dir: a directory for TensorBoard scalars (rank 0 only);
            warns and carries on if the tensorboard package is missing.
        scaler: a torch.amp.GradScaler; backward scales the loss with it and
            step() runs scaler.step/update. A step it skips (inf/nan
            gradients) counts its samples but not as an optimizer step.
        beta: EMA factor of the noise-scale estimates.
        noise_interval: measure the noise scale on one optimizer step in k
            (GradientNoiseScale(interval=k)): the steps between run without
            any measurement, the estimate (and so the batch and LR decisions)
            moves once per measured step.
        max_steps, max_samples, max_epochs: when iterating the controller
            itself: stop at the first step boundary where one is reached.
            Without any, `for batch in controller` runs to the end of the
            current epoch, like a DataLoader. All limits are totals since
            the start of training, so a resumed script with the same limits
            ends where the uninterrupted one would. `run(...)` and
            `epochs(n)` take the same limits.

    Data accounting: each epoch is a seeded permutation, taken step by step
    (gradnoise.data): a batch change in mid-epoch drops and repeats nothing.
    The last step of an epoch takes what remains, so it may be smaller (or,
    if fewer than 2 × world_size samples would be left over, those join it).
    Under DDP each rank takes its own contiguous share of every global batch.

    Loss: `backward(loss)` expects the mean loss over the micro-batch's
    samples and multiplies it by n_j·R/N (n_j samples in the micro-batch, R
    processes, N samples in the step on all of them), so that the
    accumulated, all-reduced gradient is exactly that of the mean over all N.

    Records: after each step, a dict with RECORD_FIELDS is appended to
    `history`, written to log_path and TensorBoard. `loss` is the mean loss
    over the step's samples (all ranks), `seconds` the wall time of the step
    from loading its first micro-batch to the end of optimizer.step (the
    slowest rank's), `batch_size` the samples of this step, `next_batch_size`
    the policy's decision for the following steps, `lr` the effective lr of
    the first param group, `lr_factor` the factor.

    Under DDP every rank takes the same decisions: they rest only on
    all-reduced statistics (noise estimates, the slowest rank's step time)
    and on step and sample counts.

    Checkpoints: `state_dict()` (at a step boundary) holds the noise-scale
    estimates, the policy's state (goodput's timing data), the batch size,
    the LR ramp, the sampler (epoch, position, RNG state), the counters and
    the length of the history. Save the model's, optimizer's (and scaler's)
    state dicts next to it; with those restored, a resumed CPU run follows
    the uninterrupted run's batch sizes, learning rates and losses bit for
    bit (the goodput policy excepted: its decisions rest on measured times).
    Restore torch's global RNG too if the model draws random numbers
    (dropout).
    """

    def __init__(self, model: nn.Module, optimizer, data, *, initial_batch: int,
                 min_batch: int | None = None, max_batch: int, micro_batch: int | None = None,
                 policy="critical", lr_rule="linear", noise_source="auto", warmup_steps: int = 20,
                 critical_factor: float = 1.0, hysteresis: float = 0.25, grow_only: bool = True,
                 schedule=None, memory_budget: int | None = None, seed: int = 0,
                 collate_fn: Callable | None = None, log_path: str | os.PathLike | None = None,
                 tensorboard_dir: str | os.PathLike | None = None, scaler=None, beta: float = 0.95,
                 noise_interval: int = 1,
                 max_steps: int | None = None, max_samples: int | None = None,
                 max_epochs: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"AdaptiveBatch: `model` must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "step"):
            raise TypeError(f"AdaptiveBatch: `optimizer` must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.dataset, self.collate_fn = self._resolve_data(data, collate_fn)

        # ----- distributed
        self._ddp = isinstance(model, DistributedDataParallel)
        self._group = getattr(model, "process_group", None) if self._ddp else None
        if self._ddp:
            self.world_size = dist.get_world_size(self._group)
            self.rank = dist.get_rank(self._group)
        else:
            self.world_size, self.rank = 1, 0
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn("AdaptiveBatch: torch.distributed is initialised but the model is "
                              "not DistributedDataParallel, so every process samples the whole "
                              "dataset on its own; wrap the model in DDP to share the batches.",
                              RuntimeWarning, stacklevel=2)
        self._distributed = self._ddp and self.world_size > 1

        # ----- cheap validation first: nothing expensive runs on a bad config
        _positive_int("initial_batch", initial_batch)
        _positive_int("max_batch", max_batch)
        _positive_int("min_batch", min_batch, allow_none=True)
        _positive_int("micro_batch", micro_batch, allow_none=True)
        if min_batch is not None and max_batch < min_batch:
            raise ValueError(f"AdaptiveBatch: `max_batch`={max_batch} is smaller than "
                             f"`min_batch`={min_batch}")
        if not (min_batch or 1) <= initial_batch <= max_batch:
            raise ValueError(f"AdaptiveBatch: `initial_batch`={initial_batch} is outside "
                             f"[min_batch, max_batch] = [{min_batch or 1}, {max_batch}]")
        if initial_batch % self.world_size:
            raise ValueError(f"AdaptiveBatch: `initial_batch`={initial_batch} is not divisible by "
                             f"the world size {self.world_size} (global batch = per-replica "
                             f"batch × replicas)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"AdaptiveBatch: `warmup_steps` must be an integer ≥ 0, got "
                             f"{warmup_steps!r}")
        if not (isinstance(hysteresis, (int, float)) and hysteresis >= 0):
            raise ValueError(f"AdaptiveBatch: `hysteresis` must be a number ≥ 0, got "
                             f"{hysteresis!r}")
        if not (isinstance(beta, float) or isinstance(beta, int)) or not 0 <= beta < 1:
            raise ValueError(f"AdaptiveBatch: `beta` must be in [0, 1), got {beta!r}")
        _positive_int("noise_interval", noise_interval)
        for name, value in (("max_steps", max_steps), ("max_samples", max_samples),
                            ("max_epochs", max_epochs)):
            _positive_int(name, value, allow_none=True)
        self.lr_rule = self._resolve_lr_rule(lr_rule)
        self.policy = self._resolve_policy(policy, schedule, critical_factor)
        self.log_path = self._check_log_path(log_path)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.warmup_steps = warmup_steps
        self._default_limits = {"max_steps": max_steps, "max_samples": max_samples,
                               "max_epochs": max_epochs}

        self._min_step = 2 * self.world_size
        if len(self.dataset) < self._min_step:
            raise ValueError(f"AdaptiveBatch: the dataset has {len(self.dataset)} samples; at "
                             f"least 2 × world_size = {self._min_step} are needed")

        # ----- micro-batch (the probe runs before any hook is installed)
        local_initial = initial_batch // self.world_size
        if micro_batch is None:
            fit, self.bytes_per_sample, self.static_bytes = probe_micro_batch(
                model, lambda n: self._load(list(range(min(n, len(self.dataset))))),
                optimizer, memory_budget)
            fit = self._all_reduce_min(fit)
            micro_batch = max(d for d in range(1, min(fit, local_initial) + 1)
                              if local_initial % d == 0)
            unit = micro_batch * self.world_size
            min_batch = unit if min_batch is None else -(-min_batch // unit) * unit
            max_batch = max_batch // unit * unit
        else:
            self.bytes_per_sample = self.static_bytes = None
            unit = micro_batch * self.world_size
            for name, value in (("initial_batch", initial_batch), ("min_batch", min_batch),
                                ("max_batch", max_batch)):
                if value is not None and value % unit:
                    lower, upper = value // unit * unit, (value // unit + 1) * unit
                    hint = f"{lower} or {upper}" if lower else f"{upper}"
                    raise ValueError(
                        f"AdaptiveBatch: `{name}`={value} is not a multiple of micro_batch × "
                        f"world_size = {micro_batch} × {self.world_size} = {unit}; use {hint}")
            min_batch = unit if min_batch is None else min_batch
        self.micro_batch = micro_batch
        self.limits = BatchLimits(min_batch=min_batch, max_batch=max_batch, unit=unit,
                                  initial_batch=initial_batch, grow_only=bool(grow_only),
                                  hysteresis=float(hysteresis))
        self.initial_batch = initial_batch
        self.batch_size = initial_batch

        # ----- noise source
        self.noise, self.noise_source, self.noise_source_reason = self._resolve_noise(
            noise_source, beta, noise_interval)
        needs_two = getattr(self.noise, "source", None) == "micro_batch"
        self._min_micro_batches = 2 if needs_two else 1
        bn = _batchnorm_training(self.module)
        if bn:
            # A common rule of thumb: BatchNorm wants ≥ 32 samples.
            k = max(-(-local_initial // micro_batch), self._min_micro_batches)
            if local_initial // k < 32:
                warnings.warn(
                    f"AdaptiveBatch: BatchNorm ({', '.join(bn[:3])}) normalises over each "
                    f"micro-batch of about {local_initial // k} samples, not over the whole batch; "
                    "below ~32 samples its statistics get noisy (consider GroupNorm/LayerNorm, "
                    "SyncBatchNorm, or a larger micro_batch).", RuntimeWarning, stacklevel=2)

        # ----- state
        self.sampler = EpochSampler(len(self.dataset), seed)
        self.steps = 0
        self.samples_seen = 0
        self.history: list[dict] = []
        self.history_start = 0       # records before this process (restored runs)
        self.lr_factor = 1.0          # factor of the last optimizer step
        self._lr_target = 1.0         # the rule's last value (kept while it is None)
        self._lr_estimated = False
        self._ramp = _LRRamp(warmup_steps)
        self._plan: StepPlan | None = None
        self._timed_steps = 0         # in this process: the first step is not timed
        self._cuda = any(p.is_cuda for p in self.module.parameters())
        self._log_file = None
        self._csv = None
        self._tb = self._open_tensorboard(tensorboard_dir) if tensorboard_dir and self.rank == 0 \
            else None

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_data(data, collate_fn):
        if isinstance(data, DataLoader):
            dataset = data.dataset
            collate_fn = collate_fn or data.collate_fn
        else:
            dataset = data
        if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__")
                                                        and hasattr(dataset, "__getitem__")):
            raise TypeError("AdaptiveBatch: `data` must be a map-style Dataset (with __len__ and "
                            "__getitem__) or a DataLoader over one; the controller samples it "
                            f"itself. Got {type(dataset).__name__}")
        return dataset, collate_fn or default_collate

    @staticmethod
    def _resolve_lr_rule(lr_rule):
        if callable(lr_rule):
            return lr_rule
        if lr_rule not in LR_RULES:
            raise ValueError(f"AdaptiveBatch: unknown `lr_rule` {lr_rule!r}; expected one of "
                             f"{LR_RULES} or a callable (batch, initial_batch, reading) -> factor")
        return lr_rule

    @staticmethod
    def _resolve_policy(policy, schedule, critical_factor):
        if not isinstance(policy, str):
            _require_methods(policy, ("decide", "observe", "state_dict", "load_state_dict"),
                             f"`policy` must be one of {POLICIES} or a policy object")
            return policy
        if policy not in POLICIES:
            raise ValueError(f"AdaptiveBatch: unknown `policy` {policy!r}; expected one of "
                             f"{POLICIES}")
        if policy == "schedule":
            if schedule is None:
                raise ValueError("AdaptiveBatch: policy='schedule' needs `schedule` (a callable "
                                 "samples_seen -> batch or a list of (samples, batch) pairs)")
            return SchedulePolicy(schedule)
        if schedule is not None:
            raise ValueError(f"AdaptiveBatch: `schedule` is only used with policy='schedule', "
                             f"but policy={policy!r}")
        if policy == "goodput":
            return GoodputPolicy()
        return CriticalBatchPolicy(critical_factor)

    @staticmethod
    def _check_log_path(log_path):
        if log_path is None:
            return None
        log_path = os.fspath(log_path)
        if not log_path.endswith((".csv", ".jsonl")):
            raise ValueError(f"AdaptiveBatch: `log_path` must end in .csv or .jsonl, got "
                             f"{log_path!r}")
        return log_path

    def _resolve_noise(self, noise_source, beta, interval):
        """(object, name, reason) of the noise-scale source."""
        from .noise_scale import GradientNoiseScale
        from .tracker import GradNoiseTracker
        if not isinstance(noise_source, str):
            _require_methods(noise_source, ("step", "read", "state_dict", "load_state_dict"),
                             f"`noise_source` must be one of {NOISE_SOURCES} or an object "
                             "with the GradientNoiseScale interface")
            return noise_source, getattr(noise_source, "source", "custom"), "given"
        if noise_source not in NOISE_SOURCES:
            raise ValueError(f"AdaptiveBatch: unknown `noise_source` {noise_source!r}; expected "
                             f"one of {NOISE_SOURCES}")
        name, reason, tracker = noise_source, "requested", None
        if noise_source == "auto":
            bn = _batchnorm_training(self.module)
            if self._distributed:
                name, reason = "distributed", (f"DistributedDataParallel over {self.world_size} "
                                               "processes: local against global gradients")
            elif bn:
                name, reason = "micro_batch", (f"BatchNorm in train mode ({', '.join(bn[:3])}) "
                                               "mixes samples: no per-sample gradients")
            else:
                try:
                    tracker = GradNoiseTracker(self.module, loss_reduction="mean")
                except (ValueError, RuntimeError) as e:
                    name, reason = "micro_batch", f"the per-sample tracker refused the model: {e}"
                else:
                    if tracker.fallback_modules:
                        slow = ", ".join(repr(n) for n in tracker.fallback_modules[:4])
                        tracker.detach()
                        tracker = None
                        name, reason = "micro_batch", (
                            f"per-sample norms of {slow} would need the slow torch.func fallback")
                    else:
                        name, reason = "per_sample", "per-sample gradient norms (GradNoiseTracker)"
        if name == "distributed" and not self._distributed:
            raise ValueError("AdaptiveBatch: noise_source='distributed' needs a "
                             "DistributedDataParallel model over ≥ 2 processes")
        if name == "micro_batch" and self._distributed:
            raise ValueError("AdaptiveBatch: noise_source='micro_batch' is not available with "
                             f"{self.world_size} DDP processes; use 'distributed' (the default) "
                             "or 'per_sample'")
        if name == "per_sample":
            noise = GradientNoiseScale(self.module, source="per_sample", beta=beta,
                                       tracker=tracker, scaler=self.scaler,
                                       optimizer=self.optimizer, process_group=self._group,
                                       owns_tracker=True, interval=interval)
        else:
            noise = GradientNoiseScale(self.module, source=name, beta=beta, scaler=self.scaler,
                                       optimizer=self.optimizer, process_group=self._group,
                                       interval=interval)
        return noise, name, reason

    def _open_tensorboard(self, directory):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"AdaptiveBatch: tensorboard_dir={os.fspath(directory)!r} was given but "
                          f"TensorBoard is not installed ({e}); nothing is written there. "
                          "`pip install tensorboard` to enable it; records still go to "
                          "controller.history and log_path.", RuntimeWarning, stacklevel=3)
            return None
        return SummaryWriter(log_dir=os.fspath(directory))

    # --------------------------------------------------------- collectives
    def _all_reduce_min(self, value: int) -> int:
        if not self._distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._group)
        return int(t.item())

    # ----------------------------------------------------------- iteration
    @property
    def epoch(self) -> int:
        """Index of the epoch being read (0-based)."""
        return self.sampler.epoch

    @property
    def epochs_completed(self) -> int:
        return self.sampler.epochs_completed

    @property
    def accumulation(self) -> int:
        """Micro-batches per step at the current batch size (nominal)."""
        return self.batch_size // (self.micro_batch * self.world_size)

    def __iter__(self) -> Iterator:
        if any(v is not None for v in self._default_limits.values()):
            return self.run(**self._default_limits)
        return self.run(_one_epoch=True)

    def epochs(self, n: int) -> Iterator:
        """Micro-batches until `n` epochs in total are complete."""
        return self.run(max_epochs=n)

    def run(self, max_steps: int | None = None, max_samples: int | None = None,
            max_epochs: int | None = None, *, _one_epoch: bool = False) -> Iterator:
        """Micro-batches until one of the limits (totals since the start of
        training) is reached, checked at step boundaries. With no limit:
        forever."""
        for name, value in (("max_steps", max_steps), ("max_samples", max_samples),
                            ("max_epochs", max_epochs)):
            _positive_int(name, value, allow_none=True)
        goal_epochs = self.epochs_completed + 1 if _one_epoch else max_epochs

        def done() -> bool:
            return ((max_steps is not None and self.steps >= max_steps)
                    or (max_samples is not None and self.samples_seen >= max_samples)
                    or (goal_epochs is not None and self.epochs_completed >= goal_epochs))

        return self._iterate(done)

    def _load(self, indices: Sequence[int]):
        return self.collate_fn([self.dataset[i] for i in indices])

    def _iterate(self, done: Callable[[], bool]):
        if self._plan is not None:
            # A loop left in mid-step: hand out again what got no backward.
            self._plan.yielded = self._plan.backwards
        while True:
            if self._plan is None:
                if done():
                    return
                self._plan = plan_step(self.sampler, self.batch_size, self.micro_batch,
                                       self.world_size, self.rank, self._min_step,
                                       self._min_micro_batches)
                self._plan.started = time.perf_counter()
            plan = self._plan
            while plan.yielded < plan.accumulation:
                batch = self._load(plan.parts[plan.yielded])
                plan.yielded += 1
                # DDP decides at forward time whether the coming backward
                # all-reduces, so no_sync must cover the forward as well.
                last = plan.yielded == plan.accumulation
                with self.model.no_sync() if self._ddp and not last else nullcontext():
                    yield batch
                if plan.backwards < plan.yielded:
                    raise RuntimeError("AdaptiveBatch: call controller.backward(loss) once for "
                                       "every micro-batch (instead of loss.backward())")
            if self._plan is plan:
                raise RuntimeError("AdaptiveBatch: call controller.step() after "
                                   "controller.backward(loss), at every micro-batch; it runs "
                                   "the optimizer at the end of each step")

    # -------------------------------------------------------------- backward
    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Backward of this micro-batch's mean loss, scaled by n_j·R/N (its
        share of the step's samples; R processes) and by the GradScaler's
        scale if any. Under DDP, gradients are all-reduced only with the last
        micro-batch of the step. kwargs go to Tensor.backward."""
        plan = self._plan
        if plan is None or plan.backwards >= plan.yielded:
            raise RuntimeError("AdaptiveBatch.backward: no micro-batch is waiting for its "
                               "backward; iterate the controller to get micro-batches")
        n = len(plan.parts[plan.backwards])
        share = n * self.world_size / plan.global_size
        scaled = loss * share
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward(**kwargs)
        plan.backwards += 1
        value = loss.detach().double().reshape(()) * n
        plan.loss_sum = value if plan.loss_sum is None else plan.loss_sum + value
        after = getattr(self.noise, "after_backward", None)
        if after is not None:
            after(share, n)

    # ------------------------------------------------------------------ step
    def step(self, clip_grad_norm: float | None = None) -> bool:
        """At the end of a step (the last micro-batch's backward done): update
        the noise scale, scale the LR, run the optimizer (clipping the
        gradient norm to `clip_grad_norm` if given), zero the gradients,
        record, and let the policy choose the next batch. Returns True when an
        optimizer step happened; False inside a step, or when the GradScaler
        skipped it."""
        plan = self._plan
        if plan is None or plan.backwards < plan.accumulation:
            return False
        self.noise.step(plan.local_size)
        reading = self.noise.read()

        target = (self.lr_rule(self.batch_size, self.initial_batch, reading)
                  if callable(self.lr_rule)
                  else lr_factor(self.lr_rule, self.batch_size, self.initial_batch, reading,
                                 self.limits.min_estimate_steps))
        if target is None:
            target = self._lr_target
        elif not self._lr_estimated and self.lr_rule in ("adascale", "mccandlish") \
                and self.batch_size != self.initial_batch:
            # the estimate just became usable: ramp from the held factor
            self._lr_estimated = True
            if target != self._lr_target:
                self._ramp.begin(self.lr_factor)
        self._lr_target = target
        factor = self._ramp.value(target)

        skipped, lr = self._optimizer_step(factor, clip_grad_norm)
        if self._cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - plan.started
        loss, seconds = self._reduce_stats(plan, seconds)
        self._plan = None
        self.samples_seen += plan.global_size
        if not skipped:
            self.steps += 1
            self._ramp.advance()
            self.lr_factor = factor
            if self._timed_steps > 0:
                self.policy.observe(plan.global_size, seconds)
            self._timed_steps += 1
            new = self.policy.decide(self.batch_size, reading, self.samples_seen, self.limits)
            if new != self.batch_size:
                self._ramp.begin(factor)
                self.batch_size = int(new)
        self._record({
            "step": self.steps, "samples": self.samples_seen, "epoch": plan.epoch,
            "loss": loss, "b_simple": reading.b_simple, "b_simple_stderr": reading.stderr,
            "batch_size": plan.global_size, "micro_batch": self.micro_batch,
            "accumulation": plan.accumulation, "lr": lr, "lr_factor": factor,
            "seconds": seconds, "next_batch_size": self.batch_size, "skipped": skipped})
        return not skipped

    def _optimizer_step(self, factor: float, clip_grad_norm: float | None) -> tuple[bool, float]:
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor
        skipped = False
        try:
            params = [p for g in groups for p in g["params"]]
            if self.scaler is not None:
                if clip_grad_norm is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
                before = float(self.scaler.get_scale())
                self.scaler.step(self.optimizer)
                self.scaler.update()
                skipped = float(self.scaler.get_scale()) < before
            else:
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
                self.optimizer.step()
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad(set_to_none=True)
        return skipped, float(saved[0] * factor) if groups else float("nan")

    def _reduce_stats(self, plan: StepPlan, seconds: float) -> tuple[float, float]:
        loss_sum = float(plan.loss_sum) if plan.loss_sum is not None else float("nan")
        if self._distributed:
            t = torch.tensor([loss_sum], dtype=torch.float64)
            dist.all_reduce(t, group=self._group)
            s = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(s, op=dist.ReduceOp.MAX, group=self._group)
            loss_sum, seconds = float(t), float(s)
        return loss_sum / plan.global_size, seconds

    # --------------------------------------------------------------- records
    def _record(self, record: dict) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        if self.log_path is not None:
            if self._log_file is None:
                new = not os.path.exists(self.log_path) or os.path.getsize(self.log_path) == 0
                self._log_file = open(self.log_path, "a", newline="")
                if self.log_path.endswith(".csv"):
                    self._csv = csv.DictWriter(self._log_file, fieldnames=RECORD_FIELDS,
                                               extrasaction="ignore")
                    if new:
                        self._csv.writeheader()
            if self._csv is not None:
                self._csv.writerow({k: ("" if v is None else v) for k, v in record.items()})
            else:
                self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"gradnoise/{key}", float(value), record["step"])
            self._tb.flush()

    def _truncate_log(self, records: int) -> None:
        """Keep the first `records` records of log_path (drops those a crashed
        run wrote after its last checkpoint)."""
        if self.rank != 0 or self.log_path is None or not os.path.exists(self.log_path):
            return
        if self._log_file is not None:
            self._log_file.close()
            self._log_file, self._csv = None, None
        with open(self.log_path, newline="") as f:
            lines = f.readlines()
        keep = records + (1 if self.log_path.endswith(".csv") and lines else 0)
        if len(lines) > keep:
            with open(self.log_path, "w", newline="") as f:
                f.writelines(lines[:keep])

    def close(self) -> None:
        """Close the log files and remove the noise source's hooks."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file, self._csv = None, None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        close = getattr(self.noise, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "AdaptiveBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Everything the controller needs to resume (at a step boundary)."""
        if self._plan is not None:
            raise RuntimeError("AdaptiveBatch.state_dict: a step is in progress; checkpoint "
                               "after controller.step() has returned True")
        return {
            "version": 1,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "initial_batch": self.initial_batch,
            "min_batch": self.limits.min_batch,
            "max_batch": self.limits.max_batch,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "samples_seen": self.samples_seen,
            "history_len": self.history_start + len(self.history),
            "sampler": self.sampler.state_dict(),
            "noise_source": self.noise_source,
            "noise": self.noise.state_dict(),
            "policy": self.policy.state_dict(),
            "lr": {"factor": self.lr_factor, "target": self._lr_target,
                   "estimated": self._lr_estimated, "ramp": self._ramp.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`. The saved micro_batch and bounds win over
        the constructor's (a probe may find another micro-batch on another
        machine), so that the run continues as it began; the world size must
        match."""
        if self._plan is not None:
            raise RuntimeError("AdaptiveBatch.load_state_dict: a step is in progress")
        if state["world_size"] != self.world_size:
            raise ValueError(f"AdaptiveBatch.load_state_dict: the state was saved with "
                             f"world_size={state['world_size']}, this run has {self.world_size}")
        if state["noise_source"] != self.noise_source:
            raise ValueError(f"AdaptiveBatch.load_state_dict: the state was measured with "
                             f"noise_source={state['noise_source']!r}, this controller uses "
                             f"{self.noise_source!r}")
        name = getattr(self.policy, "name", None)
        if state["policy"].get("name") != name:
            raise ValueError(f"AdaptiveBatch.load_state_dict: the state is from policy "
                             f"{state['policy'].get('name')!r}, this controller uses {name!r}")
        if state["micro_batch"] != self.micro_batch:
            warnings.warn(f"AdaptiveBatch.load_state_dict: continuing with the saved "
                          f"micro_batch={state['micro_batch']} (this run chose "
                          f"{self.micro_batch})", RuntimeWarning, stacklevel=2)
        self.micro_batch = state["micro_batch"]
        self.initial_batch = state["initial_batch"]
        self.limits.unit = self.micro_batch * self.world_size
        self.limits.min_batch, self.limits.max_batch = state["min_batch"], state["max_batch"]
        self.limits.initial_batch = self.initial_batch
        self.batch_size = state["batch_size"]
        self.steps, self.samples_seen = state["steps"], state["samples_seen"]
        self.sampler.load_state_dict(state["sampler"])
        self.noise.load_state_dict(state["noise"])
        self.policy.load_state_dict(state["policy"])
        lr = state["lr"]
        self.lr_factor, self._lr_target, self._lr_estimated = (lr["factor"], lr["target"],
                                                               lr["estimated"])
        self._ramp.load_state_dict(lr["ramp"])
        self.history = []
        self.history_start = state["history_len"]
        self._truncate_log(self.history_start)

