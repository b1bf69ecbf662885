"""Hugging Face Trainer callbacks (docs/design.md §11).

    from gradnoise.integrations.transformers import NoiseScaleCallback, AdaptiveBatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=data)
    NoiseScaleCallback().attach(trainer)                    # measure only, or
    AdaptiveBatchCallback(max_batch=1024).attach(trainer)   # measure and adapt
    trainer.train()

`attach` adds the callback and three small hooks on this Trainer object: its
`training_step` (each training micro-batch's samples and the factor the Trainer puts
on its loss), its `_get_grad_norm` (‖G_B‖ before clipping, which the Trainer
computes at every step, so the gradients are not read again), and its `log`
(the noise scale joins the Trainer's own logs, at its logging_steps, in every
reporter it has).

NoiseScaleCallback measures B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018)
with its interval, ‖G‖² and tr(Σ). AdaptiveBatchCallback also grows the batch
through `gradient_accumulation_steps`, by AdaptiveBatch's policies and LR
rules, the LR factor applied inside optimizer.step() on top of the Trainer's
schedule. What the Trainer allows, and how its step counts and schedule see a
growing batch, is in the README ("Hugging Face Trainer").
"""
from __future__ import annotations

import math
import os

import torch
try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import has_length
except ImportError:
    raise ImportError("gradnoise.integrations.transformers needs transformers and accelerate: "
                      "pip install 'gradnoise[transformers]'") from None

from ..adaptive.arguments import check_optimizer_lr
from ..adaptive.policies import CONFIDENCE_Z
from ..layers.batching import model_batch_size
from .stepping import (AccumulationPlan, AdaptiveCallback, NoiseMonitorSettings, TrainerSteps,
                       noise_metrics, step_noise)

STATE_FILE = "gradnoise_state.pt"


class NoiseScaleCallback(NoiseMonitorSettings, TrainerCallback):
    """Measures the gradient noise scale at every (or every `interval`-th)
    optimizer step of a Trainer; the readings join the Trainer's logs.

    source: "auto", "per_sample", "micro_batch" or "distributed"
    (gradnoise.noise_scale); per_layer: also log each layer's B_simple;
    beta: EMA factor; prefix: of the logged names.

    The factor on each micro-batch's loss is the Trainer's own: 1/k for a
    loss averaged over its samples (k micro-batches in the step), or
    1/num_items_in_batch for a loss summed over tokens and divided by the
    step's tokens (transformers' models given num_items_in_batch).
    """

    def __init__(self, source: str = "auto", per_layer: bool = False, beta: float = 0.95,
                 interval: int = 1, prefix: str = "noise/"):
        self._init_monitor(source, per_layer, beta, interval, prefix)
        self.trainer = None
        self._grad_norm = None
        self._metrics: dict[str, float] = {}

    # ------------------------------------------------------------- attach
    def attach(self, trainer):
        """Add this callback to `trainer` and hook the Trainer's loss, norm
        and log methods (on this object only); returns self."""
        for name in ("training_step", "_get_grad_norm", "log"):
            if not callable(getattr(trainer, name, None)):
                raise TypeError(f"{self._who}.attach: the Trainer has no method {name}(); this "
                                "version of transformers is not supported")
        self.trainer = trainer
        training_step, grad_norm, log = trainer.training_step, trainer._get_grad_norm, trainer.log

        def counted_training_step(model, inputs, *args, **kwargs):
            # forward and backward of one training micro-batch (evaluation never comes here)
            declared = self._before_micro_batch(
                model, inputs, kwargs.get("num_items_in_batch", args[0] if args else None))
            out = training_step(model, inputs, *args, **kwargs)
            self._after_micro_batch(*declared)
            return out

        def kept_grad_norm(*args, **kwargs):
            self._grad_norm = grad_norm(*args, **kwargs)
            return self._grad_norm

        def log_with_noise(logs, *args, **kwargs):
            if "loss" in logs and self._metrics:
                logs = {**logs, **self._metrics}
            return log(logs, *args, **kwargs)

        trainer.training_step = counted_training_step
        trainer._get_grad_norm = kept_grad_norm
        trainer.log = log_with_noise
        trainer.add_callback(self)
        return self

    def _require_attached(self) -> None:
        if self.trainer is None:
            raise RuntimeError(f"{self._who}: call {self._who}(...).attach(trainer) instead of "
                               "passing it in callbacks=[...]; it needs the Trainer's loss "
                               "factors and gradient norm")

    # ------------------------------------------------------------ measure
    def _token_scaled(self, num_items) -> bool:
        """The Trainer's own rule: whether it divided the loss by the step's
        items rather than by the number of micro-batches."""
        t = self.trainer
        scaled = getattr(t, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((getattr(t, "model_accepts_loss_kwargs", False) and num_items is not None)
                      or getattr(t, "compute_loss_func", None) is not None)
        if scaled and num_items is None:
            raise ValueError(
                f"{self._who}: the Trainer takes its loss as already scaled for gradient "
                "accumulation but counted no items (num_items_in_batch is None: no 'labels' in "
                "the batch?), so the factor on each micro-batch's loss is unknown")
        return bool(scaled)

    def _build_noise(self, model, token_scaled: bool) -> None:
        t = self.trainer
        optimizer = getattr(t.optimizer, "optimizer", t.optimizer)
        self._start_noise(model, optimizer, scaler=getattr(t.accelerator, "scaler", None),
                          world_size=t.args.world_size,
                          accumulation=t.args.gradient_accumulation_steps,
                          setting="TrainingArguments(gradient_accumulation_steps",
                          loss_reduction="sum" if token_scaled else "mean")

    def _before_micro_batch(self, model, inputs, num_items) -> tuple[float, int]:
        """(factor on the loss, samples) of the training micro-batch about to run."""
        token_scaled = self._token_scaled(num_items)
        if self.noise is None:
            self._build_noise(getattr(model, "module", model), token_scaled)
        t = self.trainer
        n = model_batch_size((), dict(inputs)) if isinstance(inputs, dict) else \
            model_batch_size(tuple(inputs), {})
        if token_scaled:
            # loss = Σ tokens / num_items, times the processes when tokens are averaged across them
            per = t.args.world_size if getattr(t.args, "average_tokens_across_devices",
                                               False) and t.args.world_size > 1 else 1
            scale = per / float(num_items)
        else:
            scale = 1.0 / t.current_gradient_accumulation_steps
        return scale, n

    def _after_micro_batch(self, scale: float, samples: int) -> None:
        """Its backward is done: declare it."""
        self._backwards += 1
        self.noise.after_backward(scale, samples)

    def on_train_begin(self, args, state, control, **kwargs):
        self._require_attached()
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            raise ValueError(f"{self._who}: DeepSpeed keeps the gradients and their accumulation "
                             "in its own buffers, which the noise scale cannot read")
        if self.noise is not None:       # a second train() starts afresh
            self.noise.close()
        self.noise, self.source, self._backwards, self._metrics = None, self._requested, 0, {}
        self._resume(args, state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        norm, self._grad_norm = self._grad_norm, None
        measured = step_noise(self.noise, self._backwards, grad_norm=norm)
        self._backwards = 0
        self.reading = self.noise.read()
        if measured:
            self._metrics = noise_metrics(self.noise, self.prefix, self.per_layer)

    def on_train_end(self, args, state, control, **kwargs):
        if self.noise is not None:
            self.noise.close()           # the readings stay readable

    # ------------------------------------------------------------- state
    def _state_dict(self) -> dict:
        return {} if self.noise is None else {"noise": self.noise.state_dict()}

    def _load_state_dict(self, state: dict) -> None:
        self._state = state.get("noise")

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save({type(self).__name__: self._state_dict()}, os.path.join(folder, STATE_FILE))

    def _resume(self, args, state) -> None:
        """A run resumed from checkpoint-N (global_step N at the start):
        the state saved beside the Trainer's."""
        if state.global_step == 0:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{self._who}: training resumes at step {state.global_step} but {path} is "
                "missing; the callback's state is saved with each checkpoint from the start "
                "of a run")
        self._load_state_dict(torch.load(path)[type(self).__name__])


class AdaptiveBatchCallback(AdaptiveCallback, NoiseScaleCallback):
    """Grows the batch toward the critical batch through
    `gradient_accumulation_steps` and scales the learning rate to match.

    Batch = per_device_train_batch_size × accumulation × processes; the
    initial batch B0 is the TrainingArguments' (its gradient_accumulation_steps).
    policy, lr_rule, warmup_steps, critical_factor, hysteresis, confidence and
    schedule are AdaptiveBatch's. The batch only grows: the Trainer lays out
    each epoch's optimizer steps at its start, and a smaller accumulation
    would leave data unread.

    schedule_by: "samples" (default) drives the Trainer's LambdaLR schedule
    by samples_seen / B0, so a schedule of max_steps steps ends after
    max_steps × B0 samples; "steps" leaves it in optimizer steps. Training
    stops once max_steps × B0 samples were seen (the Trainer's max_steps,
    read as steps at the initial batch).
    """

    def __init__(self, max_batch: int, policy="critical", lr_rule="linear",
                 warmup_steps: int = 20, critical_factor: float = 1.0, hysteresis: float = 0.25,
                 confidence: float = CONFIDENCE_Z, schedule=None, schedule_by: str = "samples",
                 **monitor):
        super().__init__(**monitor)
        self._configure(schedule_by, max_batch=max_batch, policy=policy, lr_rule=lr_rule,
                        warmup_steps=warmup_steps, critical_factor=critical_factor,
                        hysteresis=hysteresis, confidence=confidence, schedule=schedule)
        self._epoch_length = None
        self._accumulate0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)      # (reads a checkpoint's state)
        loader = kwargs.get("train_dataloader")
        if loader is None or not has_length(loader):
            raise ValueError("AdaptiveBatchCallback: the training dataset has no length (an "
                             "IterableDataset?); the Trainer then ends each epoch by a step count "
                             "of its initial accumulation, which a growing batch cannot follow")
        self._epoch_length = len(loader)
        optimizer = kwargs["optimizer"]
        optimizer = getattr(optimizer, "optimizer", optimizer)
        check_optimizer_lr(optimizer, self.settings["lr_rule"], "AdaptiveBatchCallback")
        if args.auto_find_batch_size:
            raise ValueError("AdaptiveBatchCallback: auto_find_batch_size changes the micro-batch "
                             "behind the callback's back; give per_device_train_batch_size")
        self._accumulate0 = args.gradient_accumulation_steps
        plan = AccumulationPlan(micro_batch=args.train_batch_size,   # per process (× its GPUs)
                                world_size=args.world_size,
                                accumulation=args.gradient_accumulation_steps,
                                who="AdaptiveBatchCallback", **self.settings)
        if self._restore_plan(plan, "AdaptiveBatchCallback"):
            if plan.accumulation != args.gradient_accumulation_steps:
                raise ValueError(
                    f"AdaptiveBatchCallback: the checkpoint at step {state.global_step} was "
                    f"saved with gradient_accumulation_steps={plan.accumulation}, grown from "
                    f"{args.gradient_accumulation_steps}; the Trainer finds where to resume by "
                    "counting optimizer steps of its initial accumulation, so it would re-read or "
                    "skip data. Resume runs whose batch has not grown yet, or start a new run "
                    "from the saved model with the grown batch as its initial one")
        scheduler = kwargs.get("lr_scheduler")
        self.steps = TrainerSteps(plan, optimizer, [] if scheduler is None else [scheduler],
                                  self.schedule_by, "AdaptiveBatchCallback")

    def _after_micro_batch(self, scale: float, samples: int) -> None:
        super()._after_micro_batch(scale, samples)
        self.steps.count(samples)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        super().on_pre_optimizer_step(args, state, control, **kwargs)
        self.steps.before_step(self.reading)

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer's own count (it skips a resumed epoch's first batches unseen):
        # state.epoch = epoch + micro-batches done / micro-batches in the epoch
        done = round((state.epoch - math.floor(state.epoch)) * self._epoch_length)
        new = self.steps.end_step(self.reading, done, args.gradient_accumulation_steps)
        if new is None:
            return control
        args.gradient_accumulation_steps = new
        self._metrics.update(self.steps.metrics(self.prefix))
        if state.max_steps > 0 and (self.plan.samples_seen
                                    >= state.max_steps * self.plan.decisions.initial_batch):
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.steps is not None:
            self.steps.close()
            args.gradient_accumulation_steps = self._accumulate0   # the arguments as given

    def _state_dict(self) -> dict:
        return self._with_plan(super()._state_dict())

    def _load_state_dict(self, state: dict) -> None:
        super()._load_state_dict(state)
        self._plan_state = state.get("plan")
