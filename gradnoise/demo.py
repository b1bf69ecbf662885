"""The main job: train a byte-level language model on the Python standard
library's own source files (every machine with Python has them: no download)
with the adaptive batch, and show what the controller did.

`run_training` trains one configuration (adaptive or a fixed batch);
`python -m gradnoise demo` runs the adaptive one with a live progress line,
then prints a summary and writes PNG plots and the per-step log;
`python -m gradnoise compare` (gradnoise.critical_batch.compare) places
adaptive runs on the fixed-batch front of the same task.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import TensorDataset

from .adaptive import AdaptiveBatch
from .byte_lm import ByteLM, lm_loss, stdlib_bytes


@dataclass
class DemoConfig:
    context: int = 64            # bytes per sample
    width: int = 128             # model width d
    heads: int = 4
    blocks: int = 2
    data_bytes: int = 3 << 20    # bytes of stdlib source to train on
    initial_batch: int = 8
    max_batch: int = 512
    micro_batch: int = 8
    # Adam's rate at the initial batch: the best of the critical-batch sweep
    # at every batch from 8 to 256 (README, "Critical batch of the built-in task")
    lr: float = 1e-3
    lr_rule: str = "sqrt"        # Adam family: square-root scaling
    # goodput: on this task the only policy whose runs sit inside the fixed-batch
    # front at two targets in each of three seeds (README, "The adaptive batch on the front")
    policy: str = "goodput"
    confidence: float = 1.645    # z of the bound on B_simple the policy acts on
    max_samples: int = 60_000
    max_seconds: float = 240.0
    seed: int = 0
    threads: int = 0             # 0: torch's default


def byte_windows(config: DemoConfig) -> TensorDataset:
    """Non-overlapping windows of context + 1 bytes: inputs and next-byte targets."""
    data = stdlib_bytes(config.data_bytes)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = (raw.numel() - 1) // config.context
    x = raw[: n * config.context].view(n, config.context)
    y = raw[1: n * config.context + 1].view(n, config.context)
    return TensorDataset(x, y)


def init_small(model: torch.nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation (N(0, 0.02²) weights, zero biases): with the
    embedding tied to the output layer, unit-variance embeddings would start
    the logits, and the loss, far too large."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)


@dataclass
class RunResult:
    name: str
    history: list = field(default_factory=list)
    seconds: float = 0.0


def run_training(config: DemoConfig, name: str = "adaptive", fixed_batch: int | None = None,
                 log_path: Path | None = None,
                 on_step: Callable[[dict], None] | None = None,
                 until_loss: float | None = None, smoothing: int = 20) -> RunResult:
    """Train one run. `fixed_batch`: keep the batch at that size (the learning
    rate still follows config.lr_rule, as in the adaptive run). `until_loss`:
    stop once the mean loss of the last `smoothing` steps is below it."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    dataset = byte_windows(config)
    model = ByteLM(vocab=256, d=config.width, heads=config.heads, blocks=config.blocks,
                   context=config.context)
    init_small(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if fixed_batch is None:
        kwargs = dict(initial_batch=config.initial_batch, max_batch=config.max_batch,
                      policy=config.policy, lr_rule=config.lr_rule,
                      confidence=config.confidence)
    else:
        # A fixed batch: the schedule policy holding one size, with the
        # learning rate the rule gives that batch relative to initial_batch,
        # as the adaptive run would use at that size.
        scale = fixed_batch / config.initial_batch
        factor = {"none": 1.0, "linear": scale, "sqrt": math.sqrt(scale)}[config.lr_rule]
        kwargs = dict(initial_batch=fixed_batch, min_batch=fixed_batch, max_batch=fixed_batch,
                      policy="schedule", schedule=[(0, fixed_batch)], warmup_steps=0,
                      lr_rule=lambda batch, initial, reading: factor)
    controller = AdaptiveBatch(model, optimizer, dataset, micro_batch=config.micro_batch,
                               seed=config.seed, log_path=log_path,
                               max_samples=config.max_samples, **kwargs)
    result = RunResult(name)
    start = time.perf_counter()
    with controller:
        for x, y in controller:
            controller.backward(lm_loss(model(x), y))
            if controller.step():
                rec = controller.history[-1]
                if on_step is not None:
                    on_step(rec)
                if time.perf_counter() - start > config.max_seconds:
                    break
                if until_loss is not None and len(controller.history) >= smoothing:
                    recent = controller.history[-smoothing:]
                    if sum(h["loss"] for h in recent) / smoothing < until_loss:
                        break
    result.history = list(controller.history)
    result.seconds = time.perf_counter() - start
    return result


def write_plots(results: list[RunResult], out_dir: Path) -> list[Path]:
    """PNG plots of loss vs examples and vs steps, B_simple and batch size vs
    examples, and the learning rate (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def smooth(values, k=20):
        out, acc = [], []
        for v in values:
            acc = (acc + [v])[-k:]
            out.append(sum(acc) / len(acc))
        return out

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        samples = [h["samples"] for h in r.history]
        steps = [h["step"] for h in r.history]
        loss = smooth([h["loss"] for h in r.history])
        axes[0].plot(samples, loss, label=r.name)
        axes[1].plot(steps, loss, label=r.name)
    axes[0].set_xlabel("examples")
    axes[1].set_xlabel("optimizer steps")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("training loss (nats/byte, 20-step mean)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    adaptive = [r for r in results if r.name == "adaptive"] or results[:1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in adaptive:
        samples = [h["samples"] for h in r.history]
        bs = [h["b_simple"] if h["b_simple"] is not None else math.nan for h in r.history]
        err = [h["b_simple_stderr"] if h["b_simple_stderr"] is not None else math.nan
               for h in r.history]
        axes[0].plot(samples, bs, label="B_simple (smoothed)")
        axes[0].fill_between(samples, [b - 1.96 * e for b, e in zip(bs, err)],
                             [b + 1.96 * e for b, e in zip(bs, err)], alpha=0.2,
                             label="95% interval")
        axes[0].plot(samples, [h["batch_size"] for h in r.history], label="batch size")
        axes[1].plot(samples, [h["lr"] for h in r.history], label="learning rate")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("examples")
    axes[1].set_xlabel("examples")
    axes[0].legend()
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "batch_and_lr.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def config_dict(config: DemoConfig) -> dict:
    return asdict(config)
