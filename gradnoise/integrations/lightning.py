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

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone pytorch_lightning package
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("gradnoise.integrations.lightning needs PyTorch Lightning: pip install "
                          "'gradnoise[lightning]' (or lightning)") from None

from ..adaptive.arguments import check_optimizer_lr
from ..adaptive.policies import CONFIDENCE_Z
from .stepping import (AccumulationPlan, AdaptiveCallback, NoiseMonitorSettings, TrainerSteps,
                       noise_metrics, step_noise)


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


class NoiseScaleMonitor(NoiseMonitorSettings, Callback):
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
        self._init_monitor(source, per_layer, beta, interval, prefix)
        self.batch_size_fn = batch_size_fn or samples_in
        self._state = None
        self._n = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(f"{self._who}: the LightningModule uses manual optimization; the "
                             "callback measures the steps of automatic optimization only")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{self._who}: the LightningModule has {len(trainer.optimizers)} "
                             "optimizers; the noise scale is measured for one")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._release()              # a callback used for a second fit starts afresh
        self.source, self._backwards = self._requested, 0
        if self.source == "micro_batch" and trainer.accumulate_grad_batches < 2:
            raise ValueError(f"{self._who}(source='micro_batch') needs Trainer("
                             f"accumulate_grad_batches ≥ 2), got {trainer.accumulate_grad_batches}")
        self._start_noise(pl_module, trainer.optimizers[0], scaler=scaler,
                          world_size=trainer.world_size,
                          accumulation=trainer.accumulate_grad_batches,
                          setting="Trainer(accumulate_grad_batches")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._n = int(self.batch_size_fn(batch))
        if self.noise.tracker is not None:
            # Lightning calls training_step, not the module's forward
            self.noise.tracker.begin_forward(self._n)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.noise.tracker is not None:
            self.noise.tracker.end_forward(loss)

    def on_after_backward(self, trainer, pl_module) -> None:
        self._backwards += 1
        self.noise.after_backward(1.0 / trainer.accumulate_grad_batches, self._n)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        measured = step_noise(self.noise, self._backwards)
        self._backwards = 0
        self.reading = self.noise.read()
        if measured:
            metrics = noise_metrics(self.noise, self.prefix, self.per_layer)
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _release(self) -> None:
        """Remove the hooks this callback installed (its readings stay readable)."""
        if self.noise is not None:
            self.noise.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()

    def state_dict(self) -> dict:
        return {} if self.noise is None else {"noise": self.noise.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "noise" in state_dict:
            self._state = state_dict["noise"]


class AdaptiveBatchSize(AdaptiveCallback, NoiseScaleMonitor):
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
        self._configure(schedule_by, max_batch=max_batch, policy=policy, lr_rule=lr_rule,
                        warmup_steps=warmup_steps, critical_factor=critical_factor,
                        hysteresis=hysteresis, confidence=confidence, schedule=schedule)
        self.max_samples = max_samples

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
        check_optimizer_lr(trainer.optimizers[0], self.settings["lr_rule"], "AdaptiveBatchSize")
        self.steps, self._accumulate0 = None, accumulate

    def _start(self, trainer, micro_batch: int) -> None:
        """At the first batch, whose size is the micro-batch."""
        plan = AccumulationPlan(micro_batch=micro_batch, world_size=trainer.world_size,
                                accumulation=trainer.accumulate_grad_batches,
                                who="AdaptiveBatchSize", **self.settings)
        self._restore_plan(plan, "AdaptiveBatchSize")
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step"]
        self.steps = TrainerSteps(plan, trainer.optimizers[0], schedulers, self.schedule_by,
                                  "AdaptiveBatchSize")
        trainer.accumulate_grad_batches = plan.accumulation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.steps is None:
            self._start(trainer, self._n)

    def on_after_backward(self, trainer, pl_module) -> None:
        super().on_after_backward(trainer, pl_module)
        self.steps.count(self._n)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.steps.before_step(self.reading)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        ends_epoch = (progress.is_last_batch
                      or progress.current.ready == trainer.num_training_batches)
        new = self.steps.end_step(self.reading, 0 if ends_epoch else progress.current.ready,
                                  trainer.accumulate_grad_batches)
        if new is None:
            return
        trainer.accumulate_grad_batches = new
        pl_module.log_dict(self.steps.metrics(self.prefix), on_step=True, on_epoch=False)
        if self.max_samples is not None and self.plan.samples_seen >= self.max_samples:
            trainer.should_stop = True

    def _release(self) -> None:
        super()._release()
        if self.steps is not None:
            self.steps.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        trainer.accumulate_grad_batches = self._accumulate0   # the Trainer as it was given

    def state_dict(self) -> dict:
        return self._with_plan(super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plan_state = state_dict.get("plan")
