"""PyTorch Lightning callbacks (docs/design.md §11).

    from gradnoise.integrations.lightning import NoiseScaleMonitor, AdaptiveBatchSize
    trainer = L.Trainer(callbacks=[NoiseScaleMonitor()])              # measure only
    trainer = L.Trainer(callbacks=[AdaptiveBatchSize(max_batch=1024)])  # and adapt

NoiseScaleMonitor logs B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018) with
its interval, ‖G‖² and tr(Σ) (per layer on request) through the Trainer's
logger, from per-sample norms, the accumulated micro-batches or the DDP
replicas. AdaptiveBatchSize also grows the batch by changing
`accumulate_grad_batches` at step boundaries, by AdaptiveBatch's policies and
learning-rate rules, the LR factor applied inside optimizer.step() on top of
the user's scheduler. Both keep their state in Lightning's checkpoints.

The training_step must return the mean loss over its micro-batch (Lightning
divides it by accumulate_grad_batches).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone pytorch_lightning package
    from pytorch_lightning import Callback

from ..adaptive.policies import CONFIDENCE_Z
from .stepping import AccumulationPlan, LRInsideStep, SampleSchedule, make_noise, reading_metrics


def samples_in(batch) -> int:
    """Samples in a batch: the length of its first tensor (in a tensor, a
    sequence or a mapping of them)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, dict):
        for item in items:
            try:
                return samples_in(item)
            except TypeError:
                continue
    raise TypeError(f"cannot tell the samples in a batch of type {type(batch).__name__}; pass "
                    "batch_size_fn=lambda batch: ... to the callback")


class NoiseScaleMonitor(Callback):
    """Logs the gradient noise scale of every measured optimizer step.

    Args:
        source: "auto", "per_sample", "micro_batch" or "distributed" (see
            gradnoise.noise_scale); "auto" takes the replicas under DDP, else
            per-sample norms where the tracker measures every module by its
            rules, else the micro-batches (which needs accumulate_grad_batches ≥ 2).
        per_layer: also log each layer's B_simple.
        beta: EMA factor of the estimates; interval: measure one step in this many.
        prefix: of the logged names.
        batch_size_fn: samples in a batch (default: the first tensor's length).
    """

    def __init__(self, source: str = "auto", per_layer: bool = False, beta: float = 0.95,
                 interval: int = 1, prefix: str = "noise/", batch_size_fn=None):
        self.source, self.per_layer, self.beta, self.interval = source, per_layer, beta, interval
        self.prefix, self.batch_size_fn = prefix, batch_size_fn or samples_in
        self.noise = None
        self.source_reason = None
        self.reading = None
        self._state = None
        self._n = 0

    @property
    def _who(self) -> str:
        return type(self).__name__

    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(f"{self._who}: the LightningModule uses manual optimization; the "
                             "callback measures the steps of automatic optimization only")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{self._who}: the LightningModule has {len(trainer.optimizers)} "
                             "optimizers; the noise scale is measured for one")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.source in ("micro_batch", "auto") and trainer.world_size == 1:
            accumulate = trainer.accumulate_grad_batches
            if self.source == "micro_batch" and accumulate < 2:
                raise ValueError(f"{self._who}(source='micro_batch') needs Trainer("
                                 f"accumulate_grad_batches ≥ 2), got {accumulate}")
        self.noise, self.source, self.source_reason = make_noise(
            pl_module, trainer.optimizers[0], source=self.source, scaler=scaler,
            world_size=trainer.world_size, beta=self.beta, interval=self.interval,
            per_layer=self.per_layer)
        if self.source == "micro_batch" and trainer.accumulate_grad_batches < 2:
            raise ValueError(
                f"{self._who}: the model needs the micro-batch source ({self.source_reason}), "
                "which needs Trainer(accumulate_grad_batches ≥ 2)")
        if self._state is not None:
            self.noise.load_state_dict(self._state)
            self._state = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._n = int(self.batch_size_fn(batch))
        if self.noise.tracker is not None:
            # Lightning calls training_step, not the module's forward
            self.noise.tracker.begin_forward(self._n)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.noise.tracker is not None:
            self.noise.tracker.end_forward(loss)

    def on_after_backward(self, trainer, pl_module) -> None:
        self.noise.after_backward(1.0 / trainer.accumulate_grad_batches, self._n)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        measured = self.noise.measuring
        self.noise.step()
        self.reading = self.noise.read()
        if measured:
            metrics = reading_metrics(self.reading, self.prefix)
            if self.per_layer:
                for layer, r in self.noise.read_layers().items():
                    if r.b_simple is not None:
                        metrics[f"{self.prefix}b_simple/{layer or 'model'}"] = float(r.b_simple)
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.noise is not None:
            self.noise.close()

    def state_dict(self) -> dict:
        return {} if self.noise is None else {"noise": self.noise.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "noise" in state_dict:
            self._state = state_dict["noise"]


class AdaptiveBatchSize(NoiseScaleMonitor):
    """Grows the batch toward the critical batch by changing
    `accumulate_grad_batches`, and scales the learning rate to match.

    Batch = micro-batch × accumulation × processes; the initial batch B0 is
    the Trainer's (its accumulate_grad_batches), the one the learning rate is
    tuned for. policy, lr_rule, warmup_steps, critical_factor, hysteresis,
    confidence and schedule are AdaptiveBatch's (gradnoise.adaptive). The
    batch only grows: a trainer's epoch is counted in micro-batches, and a
    smaller accumulation would not change what it samples.

    schedule_by: "samples" (default) steps the "step"-interval LambdaLR
        schedulers by samples_seen / B0, so that a schedule laid out for N
        steps at B0 ends after N·B0 samples, as planned; "steps" leaves them
        in optimizer steps (fewer of them as the batch grows).
    max_samples: stop training once this many samples were seen
        (Trainer(max_steps) is refused: it counts optimizer steps, which
        grow with the batch).
    """

    def __init__(self, max_batch: int, policy="critical", lr_rule="linear",
                 warmup_steps: int = 20, critical_factor: float = 1.0, hysteresis: float = 0.25,
                 confidence: float = CONFIDENCE_Z, schedule=None, schedule_by: str = "samples",
                 max_samples: int | None = None, **monitor):
        super().__init__(**monitor)
        if schedule_by not in ("samples", "steps"):
            raise ValueError(f"AdaptiveBatchSize: `schedule_by` must be 'samples' or 'steps', "
                             f"got {schedule_by!r}")
        self.settings = dict(max_batch=max_batch, policy=policy, lr_rule=lr_rule,
                             warmup_steps=warmup_steps, critical_factor=critical_factor,
                             hysteresis=hysteresis, confidence=confidence, schedule=schedule)
        self.schedule_by, self.max_samples = schedule_by, max_samples
        self.plan: AccumulationPlan | None = None
        self.history: list[dict] = []    # one record per optimizer step of this process
        self._plan_state = None
        self._factor = None
        self._stepped = False
        self._lr = self._schedules = self._hook = None
        self._local_samples = 0      # this process's samples in the step so far
        self._step_samples: int | None = None   # every process's, once counted

    def on_fit_start(self, trainer, pl_module) -> None:
        accumulate = trainer.accumulate_grad_batches
        if not isinstance(accumulate, int):
            raise ValueError("AdaptiveBatchSize: Trainer(accumulate_grad_batches=...) must be an "
                             "integer; the callback changes it itself")
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(f"AdaptiveBatchSize: the {type(trainer.strategy).__name__} strategy "
                             "accumulates gradients itself; its accumulation cannot change")
        if trainer.max_steps not in (-1, None):
            raise ValueError(
                f"AdaptiveBatchSize: Trainer(max_steps={trainer.max_steps}) counts optimizer "
                "steps, which hold more samples as the batch grows; set max_epochs, or "
                "AdaptiveBatchSize(max_samples=...)")
        super().on_fit_start(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        self._lr = LRInsideStep(optimizer)
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
        self._schedules = []
        if self.schedule_by == "samples":
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step":
                    self._schedules.append(config.scheduler)
        self._accumulate0 = accumulate

    def _build_plan(self, trainer, micro_batch: int) -> None:
        self.plan = AccumulationPlan(micro_batch=micro_batch, world_size=trainer.world_size,
                                     accumulation=self._accumulate0, who="AdaptiveBatchSize",
                                     **self.settings)
        try:
            self._schedules = [SampleSchedule(s, self.plan.decisions.initial_batch)
                               for s in self._schedules]
        except TypeError as e:
            raise TypeError(f"AdaptiveBatchSize: {e}") from None
        if self._plan_state is not None:
            self.plan.load_state_dict(self._plan_state, "AdaptiveBatchSize")
            self._plan_state = None
        trainer.accumulate_grad_batches = self.plan.accumulation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.plan is None:
            self._build_plan(trainer, self._n)

    def on_after_backward(self, trainer, pl_module) -> None:
        super().on_after_backward(trainer, pl_module)
        self._local_samples += self._n

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._factor = self.plan.lr_for_step(self.reading)
        self._lr.set(self._factor)
        self._stepped = False

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True
        self._step_samples = self._global_samples()
        for schedule in self._schedules:
            schedule.before_scheduler_step(self.plan.samples_seen + self._step_samples)

    def _global_samples(self) -> int:
        """The step's samples over every process (the last step of an epoch
        may hold fewer, and DistributedSampler may give ranks unequal shares)."""
        n = self._local_samples
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([n], dtype=torch.int64)
            dist.all_reduce(t)
            n = int(t)
        return n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._factor is None:
            return
        samples = self._step_samples if self._stepped else self._global_samples()
        self._local_samples, self._step_samples = 0, None
        skipped = not self._stepped
        factor, self._factor = self._factor, None
        accumulation = trainer.accumulate_grad_batches
        progress = trainer.fit_loop.epoch_loop.batch_progress
        ends_epoch = (progress.is_last_batch
                      or progress.current.ready == trainer.num_training_batches)
        trainer.accumulate_grad_batches = self.plan.after_step(
            factor, samples, self.reading, skipped,
            0 if ends_epoch else progress.current.ready)
        record = self.plan.record(samples, accumulation, self.reading, skipped)
        self.history.append(record)
        pl_module.log_dict({f"{self.prefix}{k}": float(record[k])
                            for k in ("batch_size", "next_batch_size", "accumulation",
                                      "lr_factor", "samples")}, on_step=True, on_epoch=False)
        if self.max_samples is not None and self.plan.samples_seen >= self.max_samples:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        if self._lr is not None:
            self._lr.close()
            self._hook.remove()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.plan is not None:
            state["plan"] = self.plan.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plan_state = state_dict.get("plan")
