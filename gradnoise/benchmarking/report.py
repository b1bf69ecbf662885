"""The training-step benchmark's rows, targets and report (a rich table,
footnotes and the verdict against the targets)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

# Targets of gradnoise's step time as a multiple of the plain step, and of its
# step peak memory.
TIME_TARGETS = {("gradnoise all", "mlp"): 1.03, ("gradnoise all", "lm"): 1.08,
                ("gradnoise all", "cnn"): 1.15, ("gradnoise norm", "mlp"): 1.02,
                ("gradnoise norm", "lm"): 1.02, ("gradnoise norm", "cnn"): 1.02,
                ("gradnoise all", "gpt2"): 1.08, ("gradnoise norm", "gpt2"): 1.02,
                ("gradnoise all", "llama"): 1.08, ("gradnoise norm", "llama"): 1.02}
PEAK_TARGET = 1.10
# The noise-scale estimator's own time per step (its reductions and
# communication), as a share of the plain step.
ESTIMATOR_TARGET = 0.01


@dataclass
class TrackerRow:
    model: str
    candidate: str
    available: bool
    reason: str = ""
    short_reason: str = ""
    threads: int = 0
    median_ms: float | None = None
    ratio: float | None = None                 # median of per-repetition time / plain
    repeats: int = 0
    peak_mb: float | None = None               # VmHWM − VmRSS around one step
    peak_ratio: float | None = None            # / the plain step's
    err_vs_gradnoise: float | None = None      # max_i |n_i − gn_i| / gn_i
    err_vs_truth: float | None = None          # ... against float64 torch.func, covered params
    coverage: str = "all"
    note: str = ""
    detail: str = ""
    target: float | None = None
    estimator_share: float | None = None       # median estimator time / plain step time
    baseline: str = "plain"                    # the step `ratio` and `peak_ratio` divide by
    graph_breaks: int | None = None            # of the forward under torch.compile

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(v, spec, suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def render_table(rows: list[TrackerRow], title: str | None = None):
    """A rich Table: one line per (model, candidate), a section per model.
    Fits 120 columns; the long texts are in `footnotes(rows)`."""
    from rich import box
    from rich.table import Table
    threads = max((r.threads for r in rows), default=0) or torch.get_num_threads()
    reps = max((r.repeats for r in rows), default=0)
    table = Table(title=title or (f"Training step with per-sample gradient norms vs the plain step "
                                  f"({threads} thread{'s' if threads != 1 else ''}, median of up to {reps} interleaved "
                                  f"repetitions)"), box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col, just in (("model", "left"), ("candidate", "left"), ("ms/step", "right"),
                      ("reps", "right"), ("×plain", "right"), ("target", "right"),
                      ("peak MB", "right"), ("×plain", "right"), ("Δ gn", "right"),
                      ("Δ fp64", "right"), ("covers", "left"), ("notes", "left")):
        table.add_column(col, justify=just, no_wrap=col != "notes")
    last = None
    for r in rows:
        if last is not None and r.model != last:
            table.add_section()
        model_cell = r.model if r.model != last else ""
        last = r.model
        if not r.available:
            table.add_row(model_cell, r.candidate, "n/a", "", "", "", "", "", "", "", "",
                          f"[yellow]{r.short_reason or _short(r.reason)}")
            continue
        ratio = _fmt(r.ratio, ".3f" if r.ratio is None or r.ratio < 10 else ".1f", "×")
        if r.target is not None and r.ratio is not None:
            ratio = f"[{'green' if r.ratio <= r.target else 'red'}]{ratio}"
        peak_ratio = _fmt(r.peak_ratio, ".2f" if r.peak_ratio is None or r.peak_ratio < 10 else ".0f", "×")
        if r.candidate.startswith("gradnoise") and r.peak_ratio is not None:
            peak_ratio = f"[{'green' if r.peak_ratio <= PEAK_TARGET else 'red'}]{peak_ratio}"
        plain = r.candidate == "plain"
        table.add_row(model_cell, r.candidate, _fmt(r.median_ms, ".1f"), str(r.repeats),
                      "1" if plain else ratio, _fmt(r.target, ".2f", "×"),
                      _fmt(r.peak_mb, ".0f"), "1" if plain else peak_ratio,
                      _fmt(r.err_vs_gradnoise, ".0e"), _fmt(r.err_vs_truth, ".0e"),
                      "" if plain else r.coverage, r.note)
    return table


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def footnotes(rows: list[TrackerRow]) -> list[str]:
    """The long texts: the columns, why a candidate is n/a, what a peer leaves out."""
    out = ["Δ gn: max over samples of |norm − gradnoise layers='all'| / gradnoise; Δ fp64: the same "
           "against torch.func in float64, over the parameters the candidate covers; covers: parameter "
           "tensors measured (share of all parameters); peak MB: resident-memory peak of one step "
           "above what the process held before it, in a fresh process"]
    for r in rows:
        if not r.available:
            out.append(f"{r.model} / {r.candidate}: n/a: {r.reason}")
        elif r.detail:
            out.append(f"{r.model} / {r.candidate}: {r.detail}")
    return out


def verdict(rows: list[TrackerRow]) -> tuple[int, list[str]]:
    """(number of gradnoise targets missed, one line per miss)."""
    missed = []
    for r in rows:
        if not (r.available and r.candidate.startswith("gradnoise")):
            continue
        if r.target is not None and r.ratio is not None and r.ratio > r.target:
            missed.append(f"{r.model} / {r.candidate}: {r.ratio:.3f}× > {r.target:.2f}×")
        if r.peak_ratio is not None and r.peak_ratio > PEAK_TARGET:
            missed.append(f"{r.model} / {r.candidate}: peak {r.peak_ratio:.2f}× > {PEAK_TARGET:.2f}×")
        if r.estimator_share is not None and r.estimator_share > ESTIMATOR_TARGET:
            missed.append(f"{r.model} / {r.candidate}: estimator {r.estimator_share:.2%} of the "
                          f"plain step > {ESTIMATOR_TARGET:.0%}")
    return len(missed), missed


def print_report(rows: list[TrackerRow], console) -> int:
    """Print the table, its footnotes and the targets; return the number missed."""
    console.print(render_table(rows))
    for line in footnotes(rows):
        console.print(f"  {line}", highlight=False)
    n, missed = verdict(rows)
    targets = ("targets for gradnoise: layers='all' ≤ 1.03× (mlp), ≤ 1.08× (lm), ≤ 1.15× (cnn); "
               f"layers='norm' ≤ 1.02×; step peak memory ≤ {PEAK_TARGET:.2f}× the plain step's; "
               f"noise-scale estimator ≤ {ESTIMATOR_TARGET:.0%} of the plain step.")
    console.print(targets + (" all met." if not n else f" {n} missed: " + "; ".join(missed)),
                  highlight=False)
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        console.print(f"load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs",
                      highlight=False)
    return n
