"""The micro-batch memory probe: the largest micro-batch whose training step
fits the memory budget (docs/design.md §8)."""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..layers.calls import output_tensors


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """Bytes the controller may plan for: on CUDA 90% of (free memory + what
    this process's tensors already hold, torch.cuda.mem_get_info and
    memory_allocated); elsewhere half of MemAvailable from /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * (free + torch.cuda.memory_allocated(device)))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _default_probe_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    floats = [t for t in output_tensors(out) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise ValueError("probe_micro_batch: the model's output holds no floating-point tensor "
                         "that requires grad; pass loss_fn=(model, batch) -> scalar loss")
    return sum(t.sum() for t in floats)


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):   # sparse, nested, ...
        return None, 0
    return (st.device, st.data_ptr()), st.nbytes()


def _optimizer_state_bytes(optimizer, module: nn.Module, probe_copy: nn.Module) -> int:
    """Bytes of optimizer state for `module`'s parameters, measured after one
    step of a fresh optimizer of the same type and settings on the probe's
    copy (which holds the probe's gradients); estimated as 2× the trainable
    parameters for Adam-like optimizers (those with `betas`), 1× for
    momentum SGD, 0 otherwise when the optimizer cannot be rebuilt."""
    if optimizer is None:
        return 0
    trainable = sum(p.nelement() * p.element_size() for p in module.parameters() if p.requires_grad)
    try:
        mapping = {id(p): q for p, q in zip(module.parameters(), probe_copy.parameters())}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [mapping[id(p)] for p in g["params"]]}
                  for g in optimizer.param_groups]
        clone = type(optimizer)(groups, **optimizer.defaults)
        clone.step()
        seen, total = set(), 0
        for state in clone.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    key, nbytes = _storage_key(v)
                    if key not in seen:
                        seen.add(key)
                        total += nbytes
        return total
    except Exception:
        defaults = getattr(optimizer, "defaults", {})
        if "betas" in defaults:
            return 2 * trainable
        if defaults.get("momentum", 0):
            return trainable
        return 0


def probe_micro_batch(model: nn.Module, sample_batch_fn: Callable[[int], Any], optimizer=None,
                      memory_budget: int | None = None, *,
                      loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                      samples: int = 2) -> tuple[int, int, int]:
    """The largest micro-batch whose training step fits in `memory_budget` bytes.

        micro_batch = ⌊(memory_budget − static_bytes) / bytes_per_sample⌋

    bytes_per_sample: one forward+backward of `samples` (2) samples from
    `sample_batch_fn(n)` on a deep copy of the model, under
    torch.autograd.graph.saved_tensors_hooks, counting the bytes of every
    storage saved for backward once (by data_ptr) and leaving out the
    parameters' and buffers' own storages; divided by the number of samples.
    static_bytes: parameters + buffers + gradients of the trainable
    parameters + optimizer state (measured after one step of a copy of the
    optimizer, see `_optimizer_state_bytes`). Transient memory (the
    activation gradients of backward, allocator slack) is not counted: the
    default budget (`default_memory_budget`) leaves room for it.

    The model and optimizer are left untouched. `loss_fn(model, batch)` gives
    the scalar to differentiate; by default the sum of the model's outputs
    for `batch[0]` (or `**batch` for a mapping, or `batch` itself).

    Returns (micro_batch, bytes_per_sample, static_bytes).
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    probe = copy.deepcopy(module)
    own = {_storage_key(t)[0] for t in list(probe.parameters()) + list(probe.buffers())}
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key is not None and key[1] != 0 and key not in own:
            saved.setdefault(key, nbytes)
        return t

    batch = sample_batch_fn(samples)
    with torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (loss_fn or _default_probe_loss)(probe, batch)
        loss.backward()
    bytes_per_sample = max(1, math.ceil(sum(saved.values()) / samples))
    unique = {id(p): p for p in module.parameters()}.values()
    param_bytes = sum(p.nelement() * p.element_size() for p in unique)
    grad_bytes = sum(p.nelement() * p.element_size() for p in unique if p.requires_grad)
    buffer_bytes = sum(b.nelement() * b.element_size() for b in module.buffers())
    static = (param_bytes + buffer_bytes + grad_bytes
              + _optimizer_state_bytes(optimizer, module, probe))
    micro = (int(memory_budget) - static) // bytes_per_sample
    if micro < 1:
        raise ValueError(
            f"probe_micro_batch: memory_budget={int(memory_budget)} bytes cannot hold the model "
            f"({static} bytes of parameters, gradients, buffers and optimizer state) plus one "
            f"sample ({bytes_per_sample} bytes saved for backward)")
    return int(micro), int(bytes_per_sample), int(static)


