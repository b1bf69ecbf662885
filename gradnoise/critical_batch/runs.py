"""One fixed-batch training run of a sweep: the task it trains, what it is
asked (batch, learning rate, seed, target losses, a step budget) and what it
records (the loss curve, the step each target was reached, the noise scale
along the way).

Losses are read smoothed without lag. The loss of step t is taken before its
update, at the parameters t − 1 updates made; a trailing mean over the last n
steps (n = `window`, fewer in the first steps) describes the loss (n − 1)/2
steps back. So a run whose trailing mean first drops below a target at step t
reached it after S = t − 1 − (n − 1)/2 updates (`updates_at`, `first_crossing`):
the steps S of McCandlish et al., and E = B·S examples. The
run stops once the last target is reached, once it can no longer reach it
within `max_steps` (the sweep sets that to the best run's count at the same
batch: a run that has not got there by then cannot beat it), or once its
loss is not finite or rises above `diverge_factor` times its first value.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from ..data import EpochSampler
from ..hessian import hessian_noise_scale_of


@dataclass
class Task:
    """What a sweep trains, as factories (module-level functions or
    functools.partial of them, so that runs can go to other processes).

    model(): a freshly initialised model (the run seeds torch first);
    optimizer(params, lr): its optimizer;
    data(): a map-style dataset, sampled without replacement epoch by epoch,
        or None when `batches` draws the batches itself;
    loss(model, batch): the mean loss of a batch;
    batches(generator, size): a batch drawn with the torch.Generator given,
        for tasks without a dataset (the noisy quadratic model);
    collate: how `data`'s samples make a batch.
    """
    name: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[Any, float], torch.optim.Optimizer]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    data: Callable[[], Any] | None = None
    batches: Callable[[torch.Generator, int], Any] | None = None
    collate: Callable = default_collate

    def __post_init__(self):
        if (self.data is None) == (self.batches is None):
            raise ValueError(f"Task {self.name!r}: give exactly one of `data` (a dataset "
                             "factory) and `batches` (a batch-drawing function)")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep."""
    batch: int
    lr: float
    seed: int
    targets: tuple[float, ...]       # target losses, any order
    max_steps: int
    window: int = 20                 # trailing-mean length, steps
    diverge_factor: float = 1.5
    noise_interval: int = 0          # measure B_simple one step in this many (0: never)
    noise_source: str = "per_sample"
    noise_per_layer: bool = False    # B_simple of each module that owns parameters, too
    hessian_interval: int = 0        # B_noise (Hessian-aware) one step in this many (0: never)
    hessian_samples: int = 16        # its own batch, drawn apart from the training batches

    @property
    def key(self) -> str:
        """A file name that identifies the run in a sweep's folder."""
        return f"B{self.batch}_lr{self.lr:.6g}_seed{self.seed}"


@dataclass
class RunRecord:
    spec: dict
    losses: list[float] = field(default_factory=list)     # per step, as trained
    reached: dict = field(default_factory=dict)           # str(target) -> updates (lag corrected)
    status: str = "running"       # "done", "budget" (stopped at max_steps), "diverged"
    seconds: float = 0.0
    noise: list[dict] = field(default_factory=list)       # step, loss, b_simple, stderr, ...
    hessian: list[dict] = field(default_factory=list)     # step, loss, b_noise

    def steps_to(self, target: float) -> float:
        """Lag-corrected steps to `target`, or inf if the run did not reach it."""
        return self.reached.get(target_key(target), math.inf)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        return cls(**d)


def target_key(target: float) -> str:
    """Targets as JSON keys: the shortest exact repr."""
    return repr(float(target))


def tail_mean(losses: list[float], window: int) -> float:
    """The trailing mean at the last step: the mean of the last min(len, window) losses."""
    tail = losses[-window:]
    return sum(tail) / len(tail)


def lag(window: int, step: int | None = None) -> float:
    """How many steps the trailing mean at `step` (1-based) lags the loss: it
    averages n = min(step, window) steps, centred (n − 1)/2 steps back."""
    n = window if step is None else min(step, window)
    return (n - 1) / 2.0


def updates_at(step: int, window: int) -> float:
    """Updates behind the loss that the trailing mean at `step` (1-based)
    describes: step − 1 − lag."""
    return step - 1 - lag(window, step)


def first_crossing(losses, target: float, window: int):
    """Updates after which the trailing mean of `losses` (each step's loss
    before its update) first falls below `target`, lag corrected (inf if
    never): one curve [steps], or one per row [curves, steps] (then an array)."""
    curves = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    steps = np.arange(1, curves.shape[1] + 1)
    n = np.minimum(steps, window)
    cs = np.concatenate([np.zeros((curves.shape[0], 1)), np.cumsum(curves, 1)], 1)
    with np.errstate(invalid="ignore"):      # inf − inf of a diverged curve: nan, never below
        means = (cs[:, steps] - cs[:, steps - n]) / n
    below = means < target
    hit = below.argmax(1)
    out = np.where(below.any(1), steps[hit] - 1 - (n[hit] - 1) / 2.0, np.inf)
    return float(out[0]) if np.ndim(losses) == 1 else out


def draw_batches(task: Task, seed: int):
    """A function size -> batch for the run: the task's own draw, or its
    dataset sampled epoch by epoch without replacement, every batch of
    exactly `size` samples (one that meets the end of an epoch takes the
    rest from the next)."""
    if task.batches is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        return lambda size: task.batches(gen, size)
    dataset = task.data()
    tensors = getattr(dataset, "tensors", None)
    sampler = EpochSampler(len(dataset), seed=seed)

    def indices(size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            out += sampler.take(size - len(out))[1]
        return out

    if tensors is not None and task.collate is default_collate:
        # a TensorDataset: index its tensors at once instead of item by item
        def draw(size):
            index = torch.tensor(indices(size))
            return tuple(t[index] for t in tensors)
        return draw
    return lambda size: task.collate([dataset[i] for i in indices(size)])


def _half(batch, k: int):
    """The k-th half (k = 0, 1) of a batch: a tensor, or a tuple or list of them."""
    if isinstance(batch, torch.Tensor):
        return batch.chunk(2)[k]
    return type(batch)(t.chunk(2)[k] for t in batch)


def _sample(batch, i: int):
    """Sample i of a batch (a tensor, or a tuple or list of them), batch dim kept."""
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    return type(batch)(t[i:i + 1] for t in batch)


def _b_noise(task: Task, model: nn.Module, batch) -> float | None:
    """B_noise = tr(HΣ)/GᵀHG at the model's parameters (hessian.py), from every
    sample of `batch`, the batch gradient's own noise removed. On a fresh copy
    of the model: the run's noise-scale hooks must not see these backward passes."""
    with torch.random.fork_rng(devices=[]):   # the run's own random draws stay as they were
        twin = task.model()
    twin.load_state_dict(model.state_dict())
    params = [p for p in twin.parameters() if p.requires_grad]
    size = batch.shape[0] if isinstance(batch, torch.Tensor) else batch[0].shape[0]
    return hessian_noise_scale_of(params, lambda: task.loss(twin, batch),
                                  lambda i: task.loss(twin, _sample(batch, i)), size,
                                  batch_size=size).b_noise


def _noise_reader(model: nn.Module, spec: RunSpec):
    if not spec.noise_interval:
        return None
    from ..noise_scale import GradientNoiseScale
    return GradientNoiseScale(model, source=spec.noise_source, interval=spec.noise_interval,
                              per_layer=spec.noise_per_layer)


def train_run(task: Task, spec: RunSpec, on_step: Callable[[int, float], None] | None = None,
              model_state: dict | None = None) -> RunRecord:
    """Train one run of `spec` and return what it recorded.

    model_state: {"model": ..., "optimizer": ...} to start from (a branch of
    a checkpoint) instead of a fresh initialisation.
    """
    torch.manual_seed(spec.seed)
    model = task.model()
    optimizer = task.optimizer(model.parameters(), spec.lr)
    if model_state is not None:
        model.load_state_dict(model_state["model"])
        optimizer.load_state_dict(model_state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = spec.lr
    draw = draw_batches(task, spec.seed)
    # measurements draw from their own stream: the training batches stay those of a run without
    measure = draw_batches(task, spec.seed + 7919) if spec.hessian_interval else None
    record = RunRecord(spec=asdict(spec))
    pending = sorted(set(spec.targets), reverse=True)
    noise = _noise_reader(model, spec)
    split = spec.noise_source == "micro_batch" and noise is not None
    start = time.perf_counter()
    total, first = 0.0, None
    try:
        for step in range(1, spec.max_steps + 1):
            batch = draw(spec.batch)
            b_noise = None
            if spec.hessian_interval and (step - 1) % spec.hessian_interval == 0:
                b_noise = _b_noise(task, model, measure(spec.hessian_samples))
            optimizer.zero_grad(set_to_none=True)
            if split:   # two backward passes: the micro-batch source compares them
                parts = [_half(batch, k) for k in range(2)]
                loss = sum(task.loss(model, p).detach() / 2 for p in parts)
                for p in parts:
                    (task.loss(model, p) / 2).backward()
            else:
                loss = task.loss(model, batch)
                loss.backward()
            if noise is not None:
                reading = noise.step(spec.batch)
            optimizer.step()
            value = float(loss.detach())
            record.losses.append(value)
            if on_step is not None:
                on_step(step, value)
            first = value if first is None else first
            if not math.isfinite(value) or value > spec.diverge_factor * first:
                record.status = "diverged"
                break
            total += value
            if step > spec.window:
                total -= record.losses[step - 1 - spec.window]
            mean = total / min(step, spec.window)
            if noise is not None and reading is not None and reading.b_simple is not None \
                    and (step - 1) % spec.noise_interval == 0:
                entry = {"step": updates_at(step, spec.window), "loss": mean,
                         "b_simple": reading.b_simple, "stderr": reading.stderr}
                if spec.noise_per_layer:
                    entry["layers"] = {name: r.b_simple for name, r in noise.read_layers().items()}
                record.noise.append(entry)
            if b_noise is not None:
                record.hessian.append({"step": updates_at(step, spec.window), "loss": mean,
                                       "b_noise": b_noise})
            while pending and mean < pending[0]:
                record.reached[target_key(pending.pop(0))] = updates_at(step, spec.window)
            if not pending:
                record.status = "done"
                break
        else:
            record.status = "budget"
    finally:
        if noise is not None:
            noise.close()
    record.seconds = time.perf_counter() - start
    return record
