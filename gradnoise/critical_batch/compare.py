"""The adaptive batch judged by the fixed-batch front of the same task: each
adaptive configuration (policy × LR rule × seed) trains the built-in task
until it reaches the lowest target, and its steps and examples to each
target are placed on the front the sweep measured (judge.py). A Pareto
product ≤ 1 means no fixed batch, at its best learning rate, reached that
target in both fewer steps and fewer examples."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from .fit import FrontFit
from .judge import Placement, place_history
from .sweep import SweepResult


@dataclass(frozen=True)
class Variant:
    policy: str = "critical"
    lr_rule: str = "sqrt"
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.policy}/{self.lr_rule}/seed {self.seed}"


def run_variant(variant: Variant, base_config, front: SweepResult, on_step=None
                ) -> tuple[list[dict], list[Placement]]:
    """Train one adaptive configuration until the front's lowest target (or
    the config's sample and time budget) and place it on the front."""
    from ..demo import run_training

    config = replace(base_config, policy=variant.policy, lr_rule=variant.lr_rule,
                     seed=variant.seed)
    result = run_training(config, variant.name, on_step=on_step,
                          until_loss=min(front.config.targets), smoothing=front.config.window)
    return result.history, place_history(result.history, front.fits, front.config.window)


def summary_rows(results: dict[Variant, list[Placement]]) -> list[list[str]]:
    rows = []
    for variant, placements in results.items():
        for p in placements:
            rows.append([variant.name, f"{p.target:g}",
                         "not reached" if p.steps is None else f"{p.steps:,.0f}",
                         "—" if p.examples is None else f"{p.examples:,.0f}",
                         "—" if p.pareto_product is None else f"{p.pareto_product:.2f}"])
    return rows


def write_plot(out: Path, front: SweepResult, results: dict[Variant, list[Placement]]) -> Path:
    """A PNG at `out`: the fitted fronts with the fixed-batch bests, and each
    adaptive run's (S, E) at each target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import draw_fronts

    fits = [f for f in front.fits.values() if isinstance(f, FrontFit)]
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = draw_fronts(ax, fits)
    markers = "ovsD^<>phx"
    for k, (variant, placements) in enumerate(results.items()):
        pts = [p for p in placements if p.steps is not None and p.target in colors]
        ax.scatter([p.steps for p in pts], [p.examples for p in pts], marker=markers[k % 10],
                   facecolor="none", edgecolor=[colors[p.target] for p in pts], s=70,
                   label=f"adaptive {variant.name}")
    ax.set_title("adaptive runs on the fixed-batch front (inside the curve: better than every "
                 "fixed batch)", fontsize=9)
    ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def verdict(results: dict[Variant, list[Placement]]) -> dict[tuple[str, str], dict]:
    """Per configuration (policy, LR rule): over its seeds, the targets at
    which every seed's product is ≤ 1, and the worst product per target."""
    out: dict = {}
    for variant, placements in results.items():
        entry = out.setdefault((variant.policy, variant.lr_rule), {})
        for p in placements:
            worst = entry.get(p.target, -math.inf)
            value = math.inf if p.pareto_product is None else p.pareto_product
            entry[p.target] = max(worst, value)
    return {k: {"worst_product": v, "targets_met": sorted(t for t, x in v.items() if x <= 1)}
            for k, v in out.items()}
