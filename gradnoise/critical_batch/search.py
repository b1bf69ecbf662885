"""The learning-rate search at one batch size of a fixed-batch sweep
(McCandlish et al. 2018, appendix D: the steps at a batch size are those of
its best learning rate).

The search tries a geometric grid around a starting rate, the start first,
and extends the grid by one rate at a time while the best sits on its edge.
Every run after the first gets a step budget: the best run so far at this
batch reached the last target in S steps, so a run that has not reached it
after S steps (plus the smoothing lag) cannot do better and stops there.
Runs are scored by the targets they reached (more is better), then by the
steps to the lowest one reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .runs import RunRecord, RunSpec, lag


@dataclass
class BatchSearch:
    template: RunSpec                 # batch, seed, targets, ...; lr and max_steps are set here
    start_lr: float
    factor: float = 2.0
    points: int = 3                   # grid rates before any extension
    max_extensions: int = 4
    records: dict = field(default_factory=dict)     # lr -> RunRecord
    in_flight: set = field(default_factory=set)
    queue: list = field(default_factory=list)
    extensions: int = 0

    def __post_init__(self):
        half = (self.points - 1) // 2
        offsets = sorted(range(-half, self.points - half), key=lambda k: (abs(k), -k))
        self.queue = [self.start_lr * self.factor ** k for k in offsets]

    @property
    def batch(self) -> int:
        return self.template.batch

    def score(self, record: RunRecord) -> tuple:
        """Lower is better: (−targets reached, steps to the lowest reached)."""
        reached = [t for t in self.template.targets if record.steps_to(t) < math.inf]
        if not reached:
            return (0, math.inf)
        return (-len(reached), record.steps_to(min(reached)))

    def best(self) -> tuple[float, RunRecord] | None:
        """(learning rate, record) of the best finished run."""
        if not self.records:
            return None
        lr = min(self.records, key=lambda k: (self.score(self.records[k]), k))
        return lr, self.records[lr]

    def budget(self) -> int:
        """max_steps for the next run: the best run's steps to the last
        target, plus the lag, or the template's budget."""
        best = self.best()
        final = min(self.template.targets)
        if best is None or best[1].steps_to(final) == math.inf:
            return self.template.max_steps
        # reaching S updates shows in the mean at step S + 1 + lag
        return min(self.template.max_steps,
                   math.ceil(best[1].steps_to(final) + 1 + lag(self.template.window)))

    def _extend(self) -> None:
        """Queue one rate beyond the edge the best run sits on, if it does."""
        best = self.best()
        if best is None or self.extensions >= self.max_extensions:
            return
        if best[1].status == "budget" and self.score(best[1])[0] == 0:
            return                                  # nothing reached anything: no direction
        tried = sorted(self.records)
        if best[0] == tried[-1]:
            self.queue.append(tried[-1] * self.factor)
        elif best[0] == tried[0]:
            self.queue.append(tried[0] / self.factor)
        else:
            return
        self.extensions += 1

    def next_spec(self, allow_parallel: bool = False) -> RunSpec | None:
        """The next run to start, or None (wait for a run in flight, or done).
        With `allow_parallel`, a grid rate starts even while another runs (its
        budget is then the one known now)."""
        if self.in_flight and not (allow_parallel and self.queue):
            return None
        if not self.queue and not self.in_flight:
            self._extend()
        if not self.queue:
            return None
        lr = self.queue.pop(0)
        self.in_flight.add(lr)
        return replace(self.template, lr=lr, max_steps=self.budget())

    def finish(self, spec: RunSpec, record: RunRecord) -> None:
        self.in_flight.discard(spec.lr)
        self.records[spec.lr] = record

    def finished(self) -> bool:
        """True once no run is queued or in flight and the best is off the
        grid's edges (or the extensions are spent); may queue an extension."""
        if self.queue or self.in_flight:
            return False
        self._extend()
        return not self.queue

    def best_steps(self, target: float) -> tuple[float, float | None]:
        """(fewest steps to `target` over every run, its rate); (inf, None)."""
        found = [(r.steps_to(target), lr) for lr, r in self.records.items()]
        found = [f for f in found if f[0] < math.inf]
        return min(found) if found else (math.inf, None)
