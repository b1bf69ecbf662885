"""What the trainer callbacks share (docs/design.md §11): the noise scale of
each optimizer step, the adaptive batch as a number of accumulated
micro-batches, and a learning-rate factor that exists only inside
optimizer.step().

A trainer owns its loop, so the callbacks cannot draw batches as
AdaptiveBatch does: the batch grows by the trainer's gradient accumulation,
global batch = micro-batch × accumulation × processes. A trainer decides
when to step by counting micro-batches modulo its accumulation and divides
each loss by it, so a new accumulation k' takes effect only at a step
boundary where the micro-batches of the epoch so far are a multiple of k':
otherwise the next step would hold fewer than k' micro-batches, each scaled
by 1/k', a gradient silently too small. Until then the batch stays (and so
does the learning rate's factor) and the policy decides again after the next
step; doubling waits at most one step."""
from __future__ import annotations

import math
import time

import torch

from ..collectives import all_reduce
from ..adaptive.arguments import positive_int, resolve_lr_rule, resolve_policy
from ..adaptive.decisions import BatchDecisions
from ..adaptive.noise_source import choose_noise_source
from ..adaptive.policies import CONFIDENCE_Z, BatchLimits
from ..estimators import NoiseScale


class LRInsideStep:
    """Multiplies every param group's lr by a factor for the duration of
    optimizer.step() only, through the optimizer's step hooks: the user's
    scheduler reads and writes the lr it set, never the factor. The factor
    of a step is set after its last backward (`set`), which some trainers
    run inside optimizer.step(closure): it is applied once both the step
    has begun and the factor is known, whichever comes second. A step the GradScaler skips never calls optimizer.step(), so
    nothing is applied."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.factor: float | None = None
        self._inside = False
        self._saved: list[float] | None = None
        self._handles = [optimizer.register_step_pre_hook(self._enter),
                         optimizer.register_step_post_hook(self._leave)]

    def set(self, factor: float) -> None:
        self.factor = float(factor)
        if self._inside:
            self._apply()

    def _apply(self) -> None:
        if self._saved is None and self.factor is not None and self.factor != 1.0:
            groups = self.optimizer.param_groups
            self._saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = g["lr"] * self.factor

    def _enter(self, optimizer, args, kwargs) -> None:
        self._inside = True
        self._apply()

    def _leave(self, optimizer, args, kwargs) -> None:
        self._inside = False
        if self._saved is not None:
            for g, lr in zip(self.optimizer.param_groups, self._saved):
                g["lr"] = lr
        self._saved, self.factor = None, None

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class SampleSchedule:
    """Steps a LambdaLR-type scheduler (every schedule of transformers'
    get_scheduler) by samples, not optimizer steps: at each optimizer step
    its step count becomes samples_seen / initial_batch, the steps a run at
    the initial batch would have taken over the same samples. A schedule laid
    out for N steps then ends after N × initial_batch samples, whatever the
    batch did on the way."""

    def __init__(self, scheduler, initial_batch: int):
        if not hasattr(scheduler, "lr_lambdas"):
            raise TypeError(
                f"the learning-rate scheduler {type(scheduler).__name__} cannot be stepped by "
                "samples (only LambdaLR-type schedulers, whose lr is a function of the step "
                "count, can); pass schedule_by='steps' to keep it in optimizer steps, or use "
                "LambdaLR")
        self.scheduler, self.initial_batch = scheduler, initial_batch

    def before_scheduler_step(self, samples_seen: int) -> None:
        # the scheduler's own step() adds the 1
        self.scheduler.last_epoch = samples_seen // self.initial_batch - 1


class _Context:
    """What `choose_noise_source` reads of the loop it serves."""

    def __init__(self, module, optimizer, scaler, world_size: int):
        self.module, self.optimizer, self.scaler = module, optimizer, scaler
        self.world_size = world_size
        self._distributed = world_size > 1
        self._group = None


def make_noise(module, optimizer, *, source: str, scaler, world_size: int, beta: float,
               interval: int, per_layer: bool, loss_reduction: str = "mean"):
    """(GradientNoiseScale, source name, why) for a model inside a trainer:
    "auto" takes the replicas under DDP, per-sample norms where the tracker
    measures every module by its rules, else the accumulated micro-batches."""
    return choose_noise_source(_Context(module, optimizer, scaler, world_size), source, beta,
                               interval, loss_reduction, bool(per_layer))


def reading_metrics(reading: NoiseScale, prefix: str) -> dict[str, float]:
    """The reading as scalars to log: B_simple with its standard error and
    95% interval, ‖G‖², tr(Σ); what is undefined is left out, never zero."""
    out = {}
    if reading.sq_norm is not None:
        out[f"{prefix}sq_norm"] = float(reading.sq_norm)
    if reading.trace is not None:
        out[f"{prefix}trace"] = float(reading.trace)
    if reading.b_simple is not None and math.isfinite(reading.b_simple):
        out[f"{prefix}b_simple"] = float(reading.b_simple)
        if reading.stderr is not None:
            out[f"{prefix}b_simple_stderr"] = float(reading.stderr)
            low, high = reading.interval()
            out[f"{prefix}b_simple_low"], out[f"{prefix}b_simple_high"] = low, high
    return out


class AccumulationPlan:
    """The adaptive batch of a trainer, as its gradient accumulation.

    micro_batch: samples per micro-batch on one process; world_size:
    processes; accumulation: the trainer's initial accumulation k0 (the
    initial batch B0 = micro × k0 × world is the batch the learning rate is
    tuned for). Valid batches are multiples of micro × world up to max_batch.
    """

    def __init__(self, *, micro_batch: int, world_size: int, accumulation: int, max_batch: int,
                 policy="critical", lr_rule="linear", warmup_steps: int = 20,
                 critical_factor: float = 1.0, hysteresis: float = 0.25,
                 confidence: float = CONFIDENCE_Z, grow_only: bool = True, schedule=None,
                 who: str = "AdaptiveBatch"):
        positive_int("max_batch", max_batch)
        unit = micro_batch * world_size
        initial = unit * accumulation
        if max_batch < initial:
            raise ValueError(f"{who}: `max_batch`={max_batch} is smaller than the initial batch "
                             f"{initial} = micro-batch {micro_batch} × accumulation "
                             f"{accumulation} × {world_size} process(es)")
        self.unit, self.world_size, self.micro_batch = unit, world_size, micro_batch
        limits = BatchLimits(min_batch=unit, max_batch=max_batch // unit * unit, unit=unit,
                             initial_batch=initial, grow_only=bool(grow_only),
                             hysteresis=float(hysteresis), confidence=float(confidence))
        self.decisions = BatchDecisions(resolve_policy(policy, schedule, critical_factor),
                                        resolve_lr_rule(lr_rule), limits, warmup_steps)
        self.accumulation = accumulation       # in effect now
        self.steps = 0
        self.samples_seen = 0
        self._last_end: float | None = None

    def lr_for_step(self, reading) -> float:
        return self.decisions.lr_for_step(reading)

    def after_step(self, factor: float, samples: int, reading, skipped: bool,
                   micro_batches_in_epoch: int) -> int:
        """The step just run (`samples` over every process), at a boundary
        after `micro_batches_in_epoch` micro-batches of the epoch (0 when the
        next step starts an epoch); returns the accumulation from here on."""
        now = time.perf_counter()
        (seconds,) = all_reduce([0.0 if self._last_end is None else now - self._last_end], "max")
        self._last_end = now
        self.samples_seen += samples
        if not skipped:
            self.steps += 1
        self.decisions.after_step(
            factor, samples, seconds, reading, self.samples_seen, skipped,
            applicable=lambda batch: micro_batches_in_epoch % (batch // self.unit) == 0)
        self.accumulation = self.decisions.batch_size // self.unit
        return self.accumulation

    def record(self, samples: int, accumulation: int, reading, skipped: bool) -> dict:
        """The step just recorded by `after_step`, as AdaptiveBatch records it."""
        return {"step": self.steps, "samples": self.samples_seen, "batch_size": samples,
                "accumulation": accumulation, "lr_factor": self.decisions.lr_factor,
                "b_simple": None if reading is None else reading.b_simple,
                "b_simple_stderr": None if reading is None else reading.stderr,
                "next_batch_size": self.decisions.batch_size, "skipped": skipped}

    def state_dict(self) -> dict:
        return {"version": 1, "unit": self.unit, "steps": self.steps, "samples_seen": self.samples_seen,
                "initial_batch": self.decisions.initial_batch, **self.decisions.state_dict()}

    def load_state_dict(self, state: dict, who: str) -> None:
        for key, mine in (("unit", self.unit), ("initial_batch", self.decisions.initial_batch)):
            if state[key] != mine:
                raise ValueError(f"{who}: the checkpoint's adaptive batch has {key}="
                                 f"{state[key]}, this run has {mine} (micro-batch × processes "
                                 "and the initial accumulation must match to resume)")
        try:
            self.decisions.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        self.accumulation = self.decisions.batch_size // self.unit
        self.steps, self.samples_seen = state["steps"], state["samples_seen"]


def _all_reduce_sum(value: int) -> int:
    return int(all_reduce([value], "sum", dtype=torch.int64)[0])


class TrainerSteps:
    """A trainer's optimizer steps under the adaptive batch: the samples of
    each step, the LR factor inside optimizer.step(), schedules by samples,
    the plan's decision at each boundary and a record per step.

    Per step: `count(n)` for each micro-batch of n samples on this process,
    `before_step(reading)` once the last backward is done, then
    `end_step(reading, micro_batches_in_epoch, accumulation)` after the
    optimizer step (or the GradScaler's skip): it returns the accumulation
    for the next steps."""

    def __init__(self, plan: AccumulationPlan, optimizer, schedulers, schedule_by: str, who: str):
        self.plan, self.who = plan, who
        self.history: list[dict] = []    # one record per optimizer step of this process
        self._schedules = []
        if schedule_by == "samples":
            try:
                self._schedules = [SampleSchedule(s, plan.decisions.initial_batch)
                                   for s in schedulers]
            except TypeError as e:
                raise TypeError(f"{who}: {e}") from None
        self._lr = LRInsideStep(optimizer)
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
        self._local = 0                  # this process's samples in the step so far
        self._samples: int | None = None  # every process's, once counted
        self._factor: float | None = None
        self._stepped = False

    def count(self, samples: int) -> None:
        self._local += samples

    def before_step(self, reading) -> None:
        self._factor = self.plan.lr_for_step(reading)
        self._lr.set(self._factor)
        self._stepped = False

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        # before the trainer steps its schedulers
        self._stepped = True
        self._samples = _all_reduce_sum(self._local)
        for schedule in self._schedules:
            schedule.before_scheduler_step(self.plan.samples_seen + self._samples)

    def end_step(self, reading, micro_batches_in_epoch: int, accumulation: int) -> int | None:
        """The accumulation from here on (None when no step ended here)."""
        if self._factor is None:
            return None
        samples = self._samples if self._stepped else _all_reduce_sum(self._local)
        factor, skipped = self._factor, not self._stepped
        self._local, self._samples, self._factor = 0, None, None
        new = self.plan.after_step(factor, samples, reading, skipped, micro_batches_in_epoch)
        self.history.append(self.plan.record(samples, accumulation, reading, skipped))
        return new

    def metrics(self, prefix: str) -> dict[str, float]:
        """The last step's batch, next batch, accumulation, LR factor and samples."""
        record = self.history[-1]
        return {f"{prefix}{k}": float(record[k]) for k in
                ("batch_size", "next_batch_size", "accumulation", "lr_factor", "samples")}

    def close(self) -> None:
        self._lr.close()
        self._hook.remove()


class NoiseMonitorSettings:
    """The settings and the per-fit state that both trainers' noise-scale
    monitors keep, and the name their errors give."""

    def _init_monitor(self, source: str, per_layer: bool, beta: float, interval: int,
                      prefix: str) -> None:
        self.source, self.per_layer, self.beta, self.interval = source, per_layer, beta, interval
        self.prefix = prefix
        self._requested = source
        self._backwards = 0          # this step's, so far
        self.noise = None
        self.source_reason = None
        self.reading = None

    @property
    def _who(self) -> str:
        return type(self).__name__

    _state = None  # a resumed estimator's state, loaded once the estimator exists

    def _start_noise(self, model, optimizer, *, scaler, world_size: int, accumulation: int,
                     setting: str, loss_reduction: str = "mean") -> None:
        """Build the estimator for this fit (its source chosen by `make_noise`)
        and restore a resumed state; the micro-batch source needs `setting`
        (the trainer's accumulation argument) to be at least 2."""
        self.noise, self.source, self.source_reason = make_noise(
            model, optimizer, source=self.source, scaler=scaler, world_size=world_size,
            beta=self.beta, interval=self.interval, per_layer=self.per_layer,
            loss_reduction=loss_reduction)
        if self.source == "micro_batch" and accumulation < 2:
            raise ValueError(
                f"{self._who}: the model needs the micro-batch source ({self.source_reason}), "
                f"which needs {setting} ≥ 2)")
        if self._state is not None:
            self.noise.load_state_dict(self._state)
            self._state = None


class AdaptiveCallback:
    """What the adaptive callbacks share around their TrainerSteps: the
    plan, the records, and the plan's part of their checkpointed state."""
    steps: TrainerSteps | None = None
    _plan_state: dict | None = None

    def _configure(self, schedule_by: str, **settings) -> None:
        """Keep AccumulationPlan's settings and how schedules are stepped."""
        if schedule_by not in ("samples", "steps"):
            raise ValueError(f"{type(self).__name__}: `schedule_by` must be 'samples' or "
                             f"'steps', got {schedule_by!r}")
        self.settings, self.schedule_by = settings, schedule_by

    @property
    def plan(self) -> AccumulationPlan | None:
        return None if self.steps is None else self.steps.plan

    @property
    def history(self) -> list[dict]:
        """One record per optimizer step of this process."""
        return [] if self.steps is None else self.steps.history

    def _with_plan(self, state: dict) -> dict:
        if self.plan is not None:
            state["plan"] = self.plan.state_dict()
        return state

    def _restore_plan(self, plan: AccumulationPlan, who: str) -> bool:
        """Load a checkpoint's plan into `plan`; whether there was one."""
        if self._plan_state is None:
            return False
        plan.load_state_dict(self._plan_state, who)
        self._plan_state = None
        return True


def step_noise(noise, backwards: int, grad_norm=None) -> bool:
    """The noise scale's step for an optimizer step of `backwards` backward
    passes: a step with none (a training_step that skipped its backward),
    or with one under the micro-batch source (an epoch's short last step),
    is discarded without a reading. Returns whether a reading was taken."""
    if backwards == 0 or (noise.source == "micro_batch" and backwards < 2):
        noise.discard_step()
        return False
    measured = noise.measuring
    noise.step(grad_norm=grad_norm)
    return measured


def noise_metrics(noise, prefix: str, per_layer: bool) -> dict[str, float]:
    """The reading's scalars (reading_metrics), with each layer's B_simple."""
    metrics = reading_metrics(noise.read(), prefix)
    if per_layer:
        for layer, r in noise.read_layers().items():
            if r.b_simple is not None:
                metrics[f"{prefix}b_simple/{layer or 'model'}"] = float(r.b_simple)
    return metrics
