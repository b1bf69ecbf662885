"""What a critical-batch measurement shows: one JSON with every run and fit,
a table, and PNG plots (matplotlib, no display needed): the steps–examples
front of each target with its fitted hyperbola and every run marked, the
best learning rate against the batch, and the critical batch against the
loss by each method on one plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .fit import FrontFit
from .sweep import SweepResult


def readings(sweep: SweepResult, kind: str) -> list[dict]:
    """Method 3's readings along the best run of the smallest batch that has
    any: kind "noise" (B_simple: [{step, loss, b_simple, stderr}]) or
    "hessian" (B_noise: [{step, loss, b_noise}])."""
    for batch in sorted(sweep.best_lr):
        lr = sweep.best_lr[batch]
        for r in sweep.records:
            if r.spec["batch"] == batch and r.spec["lr"] == lr and getattr(r, kind):
                return getattr(r, kind)
    return []


def write_json(path: Path, sweep: SweepResult | None, branches: dict | None) -> Path:
    data = {"sweep": sweep.to_dict() if sweep else None, "branches": branches,
            "noise_scale": readings(sweep, "noise") if sweep else [],
            "b_noise": readings(sweep, "hessian") if sweep else []}
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def table_rows(sweep: SweepResult) -> list[list[str]]:
    """One row per target: S_min, E_min, B_crit with intervals, Zhang's B,
    the fit's RMS log residual, the batches that reached it."""
    def fmt(x, interval=None):
        text = f"{x:.4g}"
        return text + (f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "")

    rows = []
    for t, fit in sweep.fits.items():
        if not isinstance(fit, FrontFit):
            rows.append([f"{t:g}", "—", "—", "—", "—", "—", fit])
            continue
        rms = math.sqrt(sum(r * r for r in fit.residuals) / len(fit.residuals))
        rows.append([f"{t:g}", fmt(fit.s_min, fit.s_min_interval),
                     fmt(fit.e_min, fit.e_min_interval), fmt(fit.b_crit, fit.b_crit_interval),
                     "—" if fit.b_crit_zhang is None else f"{fit.b_crit_zhang:.3g}",
                     f"{rms:.3f}", ", ".join(str(b) for b in fit.batches)])
    return rows


TABLE_HEADER = ["target loss", "S_min", "E_min", "B_crit (95%)", "B_crit (Zhang)",
                "RMS residual", "batches"]


def draw_fronts(ax, fits: list[FrontFit]) -> dict:
    """Each target's fitted hyperbola and its best run per batch (outlined) on
    log steps–examples axes; returns the colour of each target."""
    import matplotlib.pyplot as plt
    colors = dict(zip([f.target for f in fits], plt.cm.viridis(np.linspace(0, 0.9, len(fits)))))
    for fit in fits:
        grid = np.geomspace(min(fit.batches) / 4, max(fit.batches) * 4, 100)
        s_fit = fit.s_min * (1 + fit.b_crit / grid)
        ax.plot(s_fit, s_fit * grid, color=colors[fit.target],
                label=f"loss {fit.target:g}: B_crit {fit.b_crit:.3g}")
        ax.scatter(fit.steps, [s * b for s, b in zip(fit.steps, fit.batches)], s=30,
                   color=colors[fit.target], edgecolor="k")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps S")
    ax.set_ylabel("examples E")
    ax.grid(alpha=0.3, which="both")
    return colors


def write_plots(out: Path, sweep: SweepResult | None, branches: list | None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if sweep is not None:
        fits = [f for f in sweep.fits.values() if isinstance(f, FrontFit)]
        if fits:
            fig, ax = plt.subplots(figsize=(6.5, 5))
            colors = draw_fronts(ax, fits)
            for fit in fits:
                runs = [(r.steps_to(fit.target), r.spec["batch"]) for r in sweep.records]
                runs = [(s, b) for s, b in runs if s < math.inf]
                ax.scatter([s for s, _ in runs], [s * b for s, b in runs], s=10,
                           color=colors[fit.target], alpha=0.35)
            ax.set_title("fixed-batch runs and the fitted front (best run per batch outlined)")
            ax.legend(fontsize=8)
            paths.append(_save(fig, out / "front.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        pairs = sorted((b, lr) for b, lr in sweep.best_lr.items() if lr is not None)
        ax.plot([b for b, _ in pairs], [lr for _, lr in pairs], "o-", label="best rate")
        tried = [(r.spec["batch"], r.spec["lr"]) for r in sweep.records]
        ax.scatter([b for b, _ in tried], [lr for _, lr in tried], marker="x", color="gray",
                   label="rates tried")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("learning rate")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(fig, out / "best_lr.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if sweep is not None:
        fits = [f for f in sweep.fits.values() if isinstance(f, FrontFit)]
        if fits:
            lo = [f.b_crit - f.b_crit_interval[0] if f.b_crit_interval else 0 for f in fits]
            hi = [f.b_crit_interval[1] - f.b_crit if f.b_crit_interval else 0 for f in fits]
            ax.errorbar([f.target for f in fits], [f.b_crit for f in fits], yerr=[lo, hi],
                        fmt="o-", capsize=3, label="sweep: B_crit = E_min/S_min")
            zhang = [(f.target, f.b_crit_zhang) for f in fits if f.b_crit_zhang is not None]
            if zhang:
                ax.plot(*zip(*zhang), "s--", label="sweep: 20% above linear scaling")
        series = readings(sweep, "noise")
        if series:
            loss = np.array([r["loss"] for r in series])
            b = np.array([r["b_simple"] for r in series])
            err = np.array([r["stderr"] if r["stderr"] is not None else np.nan
                            for r in series])
            ax.plot(loss, b, color="tab:green", alpha=0.8, label="B_simple along the run")
            ax.fill_between(loss, b - 1.96 * err, b + 1.96 * err, color="tab:green", alpha=0.15)
        hessian = [h for h in readings(sweep, "hessian") if h["b_noise"] is not None]
        if hessian:
            ax.plot([h["loss"] for h in hessian], [h["b_noise"] for h in hessian], ".",
                    color="tab:purple", label="B_noise (Hessian) along the run")
    if branches:
        pts = [(p["trunk_loss"], p["critical_batch"], p["bounded"]) for p in branches]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "^-", color="tab:red",
                label="branching: largest k·B within ε")
        unbounded = [p for p in pts if not p[2]]
        if unbounded:
            ax.scatter([p[0] for p in unbounded], [p[1] for p in unbounded], marker="^",
                       s=120, facecolor="none", edgecolor="tab:red",
                       label="branching: at the largest k tried (a lower bound)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training loss (training goes right)")
    ax.set_ylabel("batch size")
    ax.set_title("critical batch against the loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, out / "critical_batch.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
