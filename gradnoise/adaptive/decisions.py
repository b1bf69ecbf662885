"""The decisions of the adaptive batch, apart from any training loop: the
learning-rate factor of each optimizer step and the batch of the steps after
it (docs/design.md §8). AdaptiveBatch drives them in a plain loop; the
Lightning and Hugging Face callbacks (gradnoise.integrations) drive the same
object from their trainers' hooks, so that every integration takes the same
decisions from the same readings."""
from __future__ import annotations

from ..estimators import NoiseScale
from .lr_rules import LRRamp, lr_factor
from .policies import BatchLimits


class BatchDecisions:
    """Batch size and learning-rate factor, step after step.

    Per optimizer step, in this order:
        factor = decisions.lr_for_step(reading)    # before optimizer.step()
        decisions.after_step(samples, seconds, reading, samples_seen, skipped)

    `lr_for_step` applies the LR rule at the current batch (s = B/B0): the
    rules that need a noise estimate hold their last factor until it is usable,
    and a change of batch ramps the factor linearly over `warmup_steps`
    (Goyal et al. 2017). `after_step` feeds the policy the step's time and
    lets it choose the next batch within `limits`.
    """

    def __init__(self, policy, lr_rule, limits: BatchLimits, warmup_steps: int):
        self.policy, self.lr_rule, self.limits = policy, lr_rule, limits
        self.batch_size = limits.initial_batch
        self.lr_factor = 1.0          # factor of the last optimizer step
        self._lr_target = 1.0         # the rule's last value (kept while it is None)
        self._lr_estimated = False
        self._ramp = LRRamp(warmup_steps)
        self._timed_steps = 0         # in this process: the first step is not timed

    @property
    def initial_batch(self) -> int:
        return self.limits.initial_batch

    def lr_for_step(self, reading: NoiseScale | None) -> float:
        """The factor on the learning rate for the optimizer step about to run."""
        B, B0 = self.batch_size, self.initial_batch
        target = (self.lr_rule(B, B0, reading) if callable(self.lr_rule)
                  else lr_factor(self.lr_rule, B, B0, reading, self.limits.min_estimate_steps))
        if target is None:
            target = self._lr_target
        elif (not self._lr_estimated and self.lr_rule in ("adascale", "mccandlish")
              and B != B0):
            # the estimate just became usable: ramp from the held factor
            self._lr_estimated = True
            if target != self._lr_target:
                self._ramp.begin(self.lr_factor)
        self._lr_target = target
        return self._ramp.value(target)

    def after_step(self, factor: float, samples: int, seconds: float,
                   reading: NoiseScale | None, samples_seen: int, skipped: bool = False,
                   applicable=None) -> int:
        """Record the step just run (its LR factor, global samples and wall
        seconds) and return the batch for the next steps. A step the
        GradScaler skipped changes nothing. `applicable(batch)` says whether
        the loop can take a new batch at this boundary; when it cannot, the
        batch stays and the policy decides again after the next step."""
        if skipped:
            return self.batch_size
        self._ramp.advance()
        self.lr_factor = factor
        if self._timed_steps > 0:
            self.policy.observe(samples, seconds)
        self._timed_steps += 1
        new = self.policy.decide(self.batch_size, reading, samples_seen, self.limits)
        if new != self.batch_size and (applicable is None or applicable(new)):
            self._ramp.begin(factor)
            self.batch_size = int(new)
        return self.batch_size

    def state_dict(self) -> dict:
        return {"batch_size": self.batch_size, "policy": self.policy.state_dict(),
                "lr": {"factor": self.lr_factor, "target": self._lr_target,
                       "estimated": self._lr_estimated, "ramp": self._ramp.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        name = getattr(self.policy, "name", None)
        if state["policy"].get("name") != name:
            raise ValueError(f"the state is from policy {state['policy'].get('name')!r}, this "
                             f"run uses {name!r}")
        self.batch_size = state["batch_size"]
        self.policy.load_state_dict(state["policy"])
        lr = state["lr"]
        self.lr_factor, self._lr_target, self._lr_estimated = (lr["factor"], lr["target"],
                                                               lr["estimated"])
        self._ramp.load_state_dict(lr["ramp"])
