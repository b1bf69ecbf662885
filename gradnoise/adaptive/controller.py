"""AdaptiveBatch: the adaptive-batch controller of a plain training loop
(docs/design.md §8); the package's docstring describes the policies and
learning-rate rules it applies."""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checks import is_int, is_real
from ..collectives import all_reduce
from ..data import EpochSampler, StepPlan, plan_step
from ..model_structure import batchnorm_mixing
from ..noise_scale import GradientNoiseScale
from ..noise_scale.scale import sharded_modules
from .arguments import (check_optimizer_lr, positive_int, resolve_data, resolve_lr_rule,
                        resolve_policy)
from .decisions import BatchDecisions
from .memory_probe import probe_micro_batch
from .noise_source import choose_noise_source
from .policies import CONFIDENCE_Z, BatchLimits
from .records import RecordLog, check_log_path


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
        confidence: z of the one-sided bounds B_simple ∓ z·stderr the critical
            and goodput policies act on: the batch grows only as far as the
            lower bound asks, shrinks only as far as the upper one allows
            (default 1.645, 95%; 0 acts on the point estimate).
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
                 critical_factor: float = 1.0, hysteresis: float = 0.25,
                 confidence: float = CONFIDENCE_Z, grow_only: bool = True,
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
        self.dataset, self.collate_fn = resolve_data(data, collate_fn)

        # ----- distributed: DDP, or FSDP2 (fully_shard: the model is its own wrapper)
        self._ddp = isinstance(model, DistributedDataParallel)
        self._sharded = [] if self._ddp else sharded_modules(model)
        self._group = getattr(model, "process_group", None) if self._ddp else None
        if self._ddp or self._sharded:
            self.world_size = dist.get_world_size(self._group)
            self.rank = dist.get_rank(self._group)
        else:
            self.world_size, self.rank = 1, 0
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn("AdaptiveBatch: torch.distributed is initialised but the model is "
                              "not DistributedDataParallel, so every process samples the whole "
                              "dataset on its own; wrap the model in DDP to share the batches.",
                              RuntimeWarning, stacklevel=2)
        self._distributed = (self._ddp or bool(self._sharded)) and self.world_size > 1
        if self._sharded and micro_batch is None:
            raise ValueError("AdaptiveBatch: give `micro_batch` for a model sharded by FSDP2 "
                             "(fully_shard): the memory probe runs on a copy of the model, and "
                             "a sharded model cannot be copied")

        # ----- cheap validation first: nothing expensive runs on a bad config
        positive_int("initial_batch", initial_batch)
        positive_int("max_batch", max_batch)
        positive_int("min_batch", min_batch, allow_none=True)
        positive_int("micro_batch", micro_batch, allow_none=True)
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
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"AdaptiveBatch: `warmup_steps` must be an integer ≥ 0, got "
                             f"{warmup_steps!r}")
        if not (is_real(hysteresis, finite=False) and hysteresis >= 0):
            raise ValueError(f"AdaptiveBatch: `hysteresis` must be a number ≥ 0, got "
                             f"{hysteresis!r}")
        if not (is_real(confidence) and confidence >= 0):
            raise ValueError(f"AdaptiveBatch: `confidence` must be a number ≥ 0 (z of the bound "
                             f"on B_simple the policy acts on), got {confidence!r}")
        if not is_real(beta) or not 0 <= beta < 1:
            raise ValueError(f"AdaptiveBatch: `beta` must be in [0, 1), got {beta!r}")
        positive_int("noise_interval", noise_interval)
        for name, value in (("max_steps", max_steps), ("max_samples", max_samples),
                            ("max_epochs", max_epochs)):
            positive_int(name, value, allow_none=True)
        self.lr_rule = resolve_lr_rule(lr_rule)
        check_optimizer_lr(optimizer, self.lr_rule)
        self.policy = resolve_policy(policy, schedule, critical_factor)
        self.log_path = check_log_path(log_path)
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
                                  hysteresis=float(hysteresis), confidence=float(confidence))
        self.initial_batch = initial_batch
        self.decisions = BatchDecisions(self.policy, self.lr_rule, self.limits, warmup_steps)

        # ----- noise source
        self.noise, self.noise_source, self.noise_source_reason = choose_noise_source(
            self, noise_source, beta, noise_interval)
        # ‖G_B‖ from clipping when it covers exactly the parameters the noise scale measures
        self._clip_is_batch_norm = isinstance(self.noise, GradientNoiseScale) and (
            {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
            == {id(p) for p in self.noise.params})
        needs_two = getattr(self.noise, "source", None) == "micro_batch"
        self._min_micro_batches = 2 if needs_two else 1
        bn = [n for n, _ in batchnorm_mixing(self.module)]
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
        self._plan: StepPlan | None = None
        self._cuda = any(p.is_cuda for p in self.module.parameters())
        self._records = RecordLog(self.log_path, tensorboard_dir, self.rank)

    # --------------------------------------------------------- collectives
    def _all_reduce_min(self, value: int) -> int:
        if not self._distributed:
            return value
        return int(all_reduce([value], "min", self._group, torch.int64)[0])

    # ----------------------------------------------------------- iteration
    @property
    def epoch(self) -> int:
        """Index of the epoch being read (0-based)."""
        return self.sampler.epoch

    @property
    def epochs_completed(self) -> int:
        return self.sampler.epochs_completed

    @property
    def batch_size(self) -> int:
        """The global batch of the coming steps (the policy's last decision)."""
        return self.decisions.batch_size

    @property
    def lr_factor(self) -> float:
        """The factor on the learning rate of the last optimizer step."""
        return self.decisions.lr_factor

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
            positive_int(name, value, allow_none=True)
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
                with self._no_sync() if not last else nullcontext():
                    yield batch
                if plan.backwards < plan.yielded:
                    raise RuntimeError("AdaptiveBatch: call controller.backward(loss) once for "
                                       "every micro-batch (instead of loss.backward())")
            if self._plan is plan:
                raise RuntimeError("AdaptiveBatch: call controller.step() after "
                                   "controller.backward(loss), at every micro-batch; it runs "
                                   "the optimizer at the end of each step")

    @contextmanager
    def _no_sync(self):
        """Gradients stay local for the micro-batches before a step's last:
        DDP's no_sync, or FSDP2's requires_gradient_sync off (read during backward)."""
        if self._ddp:
            with self.model.no_sync():
                yield
        elif self._sharded:
            for m in self._sharded:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for m in self._sharded:
                    m.set_requires_gradient_sync(True, recurse=False)
        else:
            yield

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
        if clip_grad_norm is not None and self._clip_is_batch_norm:
            # clip first: ‖G_B‖ is the norm clipping computes anyway
            self.noise.step(plan.local_size, grad_norm=self._clip(clip_grad_norm))
            clip_grad_norm = None
        else:
            self.noise.step(plan.local_size)
        reading = self.noise.read()
        factor = self.decisions.lr_for_step(reading)
        skipped, lr = self._optimizer_step(factor, clip_grad_norm)
        if self._cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - plan.started
        loss, seconds = self._reduce_stats(plan, seconds)
        self._plan = None
        self.samples_seen += plan.global_size
        if not skipped:
            self.steps += 1
        self.decisions.after_step(factor, plan.global_size, seconds, reading, self.samples_seen,
                                  skipped)
        self._record({
            "step": self.steps, "samples": self.samples_seen, "epoch": plan.epoch,
            "loss": loss, "b_simple": reading.b_simple, "b_simple_stderr": reading.stderr,
            "batch_size": plan.global_size, "micro_batch": self.micro_batch,
            "accumulation": plan.accumulation, "lr": lr, "lr_factor": factor,
            "seconds": seconds, "next_batch_size": self.batch_size, "skipped": skipped})
        return not skipped

    def _clip(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients (unscaled first under a GradScaler); returns
        the total norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _optimizer_step(self, factor: float, clip_grad_norm: float | None) -> tuple[bool, float]:
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor
        skipped = False
        try:
            if self.scaler is not None:
                if clip_grad_norm is not None:
                    self._clip(clip_grad_norm)
                before = float(self.scaler.get_scale())
                self.scaler.step(self.optimizer)
                self.scaler.update()
                skipped = float(self.scaler.get_scale()) < before
            else:
                if clip_grad_norm is not None:
                    self._clip(clip_grad_norm)
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
            (loss_sum,) = all_reduce([loss_sum], "sum", self._group)
            (seconds,) = all_reduce([seconds], "max", self._group)
        return loss_sum / plan.global_size, seconds

    # --------------------------------------------------------------- records
    def _record(self, record: dict) -> None:
        self.history.append(record)
        self._records.write(record)

    def close(self) -> None:
        """Close the log files and remove the noise source's hooks."""
        self._records.close()
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
            **self.decisions.state_dict(),
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
        self.decisions.load_state_dict(state)
        self.steps, self.samples_seen = state["steps"], state["samples_seen"]
        self.sampler.load_state_dict(state["sampler"])
        self.noise.load_state_dict(state["noise"])
        self.history = []
        self.history_start = state["history_len"]
        self._records.truncate(self.history_start)

