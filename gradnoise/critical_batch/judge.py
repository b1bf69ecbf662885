"""Any training run placed on the fixed-batch front: the steps and examples
it took to each target, read as the sweep reads its own runs (trailing mean,
lag corrected), and its Pareto product (S/S_min − 1)(E/E_min − 1) against
the front's fit (McCandlish et al. 2018): ≤ 1 means on or inside the front
of every fixed batch, i.e. no fixed batch reached the target in both fewer
steps and fewer examples."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .fit import FrontFit
from .runs import first_crossing


@dataclass
class Placement:
    target: float
    steps: float | None           # lag-corrected; None: target not reached
    examples: float | None
    pareto_product: float | None  # None: not reached, or no front at this target


def steps_and_examples(losses: list[float], samples: list[int], target: float,
                       window: int = 20) -> tuple[float, float] | None:
    """(S, E): the updates S after which the trailing mean of `losses` first
    falls below `target`, lag corrected (runs.first_crossing), and the
    examples E those S updates took (`samples[i]`: examples after update
    i + 1; linear between updates, 0 before the first). None if the mean
    never falls below it."""
    s = first_crossing(losses, target, window)
    if s == math.inf:
        return None
    seen = [0, *samples]
    lo = min(int(math.floor(s)), len(seen) - 1)
    hi = min(lo + 1, len(seen) - 1)
    return s, seen[lo] + (s - lo) * (seen[hi] - seen[lo])


def place(losses: list[float], samples: list[int], fits: dict, window: int = 20
          ) -> list[Placement]:
    """The run's placement at each target of `fits` ({target: FrontFit or a
    reason the front could not be fitted})."""
    out = []
    for target, fit in sorted(fits.items(), reverse=True):
        hit = steps_and_examples(losses, samples, target, window)
        if hit is None:
            out.append(Placement(target, None, None, None))
            continue
        product = fit.pareto_product(*hit) if isinstance(fit, FrontFit) else None
        out.append(Placement(target, hit[0], hit[1], product))
    return out


def place_history(history: list[dict], fits: dict, window: int = 20) -> list[Placement]:
    """`place` for an AdaptiveBatch history (its records' loss and samples),
    one entry per update: a step the GradScaler skipped is none (its samples
    still count, in the next record's cumulative total)."""
    steps = [h for h in history if not h.get("skipped")]
    return place([h["loss"] for h in steps], [h["samples"] for h in steps], fits, window)
