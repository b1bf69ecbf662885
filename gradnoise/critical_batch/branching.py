"""Method 2 of the critical-batch measurement: branching (Merrill et al.
2025, "Critical batch size revisited").

One trunk run trains at batch B and keeps checkpoints (model and optimizer
state) at chosen steps. From each checkpoint, short branches train at k·B
for each factor k, each on the same number of examples, with the learning
rate the rule gives k·B, the rate a sweep found best at k·B (`rates`), or
the best of multipliers around either (`tune`).
The branches' losses are compared as each run reads its own, smoothed: the
local critical batch at the checkpoint is the largest k·B such that the
branches at every factor up to k end within ε (relative) of the branch at B. It follows the critical batch along
training at a fraction of a full sweep's cost.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from .runs import RunSpec, Task, draw_batches, lag, tail_mean, train_run


@dataclass
class BranchConfig:
    batch: int                        # trunk batch B
    lr: float                         # trunk rate at B
    checkpoints: list[int]            # trunk steps to branch from
    factors: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    branch_examples: int = 0          # examples per branch (default: 64 steps of the largest)
    lr_rule: str = "sqrt"             # rate at k·B: lr · k^½ ("sqrt"), · k ("linear"), · 1
    rates: dict = field(default_factory=dict)   # factor -> rate, instead of the rule (tuned)
    tune: tuple[float, ...] = ()      # extra rate multipliers tried per branch (best kept)
    epsilon: float = 0.01             # relative loss gap still called equal
    window: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.lr_rule not in ("none", "sqrt", "linear"):
            raise ValueError(f"BranchConfig: `lr_rule` must be 'none', 'sqrt' or 'linear', got "
                             f"{self.lr_rule!r}")
        if 1 not in self.factors:
            raise ValueError(f"BranchConfig: `factors` must include 1 (the branch at B that the "
                             f"others are compared with), got {self.factors}")
        self.factors = sorted(set(int(k) for k in self.factors))
        self.checkpoints = sorted(set(int(c) for c in self.checkpoints))
        if not self.checkpoints or self.checkpoints[0] < 1 or self.window < 1:
            raise ValueError(f"BranchConfig: need checkpoints at steps >= 1 (at least one) and "
                             f"window >= 1, got {self.checkpoints}, {self.window}")
        if not self.branch_examples:
            self.branch_examples = 64 * self.batch * max(self.factors)

    def branch_lr(self, factor: int) -> float:
        """The rate given for this factor in `rates`, else the rule's."""
        if factor in self.rates:
            return self.rates[factor]
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(factor), "linear": factor}[self.lr_rule]


@dataclass
class BranchPoint:
    """What the branches from one checkpoint found."""
    step: int                         # trunk step of the checkpoint
    examples: int                     # trunk examples at the checkpoint
    trunk_loss: float                 # trunk's smoothed loss there
    losses: dict = field(default_factory=dict)     # factor -> smoothed loss at the end
    lrs: dict = field(default_factory=dict)        # factor -> rate used
    critical_batch: int | None = None             # largest k·B within ε of k = 1
    bounded: bool = True             # False: the largest factor tried was within ε


def _trunk(task: Task, config: BranchConfig, on_checkpoint) -> list[float]:
    """Train the trunk to the last checkpoint, handing each checkpoint's
    state to on_checkpoint(step, state, losses so far)."""
    torch.manual_seed(config.seed)
    model = task.model()
    optimizer = task.optimizer(model.parameters(), config.lr)
    draw = draw_batches(task, config.seed)
    losses, pending = [], list(config.checkpoints)
    for step in range(1, config.checkpoints[-1] + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, draw(config.batch))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if pending and step == pending[0]:
            pending.pop(0)
            on_checkpoint(step, {"model": copy.deepcopy(model.state_dict()),
                                 "optimizer": copy.deepcopy(optimizer.state_dict())}, losses)
    return losses


def run_branches(task: Task, config: BranchConfig, progress: bool = True) -> list[BranchPoint]:
    """Train the trunk and every branch; one BranchPoint per checkpoint."""
    from rich.progress import Progress
    multipliers = (1.0,) + tuple(config.tune)
    points: list[BranchPoint] = []
    with Progress(disable=not progress) as bar:
        total = len(config.checkpoints) * len(config.factors) * len(multipliers)
        bar_id = bar.add_task("branches", total=total)

        def branch_all(step: int, state: dict, losses: list[float]) -> None:
            point = BranchPoint(step=step, examples=step * config.batch,
                                trunk_loss=tail_mean(losses, config.window))
            for k in config.factors:
                batch = k * config.batch
                # every branch's trailing mean covers about window·B examples, and
                # reads the loss 1 + lag steps back: run that much longer, so that
                # every branch is read after the same examples
                window = max(1, round(config.window / k))
                steps = math.ceil(config.branch_examples / batch + 1 + lag(window))
                best = None
                for m in multipliers:
                    spec = RunSpec(batch=batch, lr=config.branch_lr(k) * m,
                                   seed=config.seed + 1000 * step + k, targets=(-math.inf,),
                                   max_steps=steps, window=window, diverge_factor=math.inf)
                    record = train_run(task, spec, model_state=state)
                    end = tail_mean(record.losses, window) \
                        if record.status != "diverged" else math.inf
                    if best is None or end < best[0]:
                        best = (end, spec.lr)
                    bar.advance(bar_id)
                point.losses[k], point.lrs[k] = best
            base = point.losses[1]
            if not math.isfinite(base):
                raise RuntimeError(f"branching: the branch at B={config.batch} from step {step} "
                                   f"diverged (lr {point.lrs[1]:g}); the others have nothing to "
                                   "be compared with. Lower the rate")
            # the largest k with every factor up to it within ε of k = 1
            largest = 1
            for k in config.factors[1:]:
                if point.losses[k] - base > config.epsilon * abs(base):
                    break
                largest = k
            point.critical_batch = largest * config.batch
            point.bounded = largest < max(config.factors)
            points.append(point)

        _trunk(task, config, branch_all)
    return points


def branch_result(config: BranchConfig, points: list[BranchPoint]) -> dict:
    return {"config": asdict(config), "points": [asdict(replace(p)) for p in points]}
