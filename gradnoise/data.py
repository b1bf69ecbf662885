"""Exact data accounting for a batch size that changes while an epoch runs.

The adaptive-batch controller (gradnoise.adaptive) owns sampling: each epoch
is one seeded permutation of the dataset's indices, and every optimizer step
takes the next contiguous run of that permutation, whatever the batch size is
at that moment. Hence, when the batch grows in the middle of an epoch, no
sample is dropped and none is seen twice: the next step continues from the
sampler's position.

    sampler = EpochSampler(len(dataset), seed=0)
    plan = plan_step(sampler, global_batch=64, micro_batch=8, world_size=2, rank=0)
    plan.parts     # this rank's micro-batches: lists of dataset indices

Rules (the controller's docstring repeats them for users):
  * The last step of an epoch holds what remains of the permutation, so it
    may be smaller than the batch. If fewer than ``min_step`` samples would
    remain after a step, they join that step instead (it grows by less than
    ``min_step``), so that no step is too small to measure a noise scale on
    and, under data parallelism, every rank gets at least one sample per
    micro-batch.
  * Under data parallelism every rank draws the same permutation (same seed)
    and takes its own contiguous share of each global batch; shares differ by
    at most one sample (the first ``size % world`` ranks get one more).
  * Every rank splits its share into the same number of micro-batches (a
    DistributedDataParallel step needs the same number of backward passes on
    every rank), each of at most ``micro_batch`` samples, except in a short
    last step where that is impossible (see `plan_step`).

State: (epoch, position, RNG state at the start of the epoch), from which the
permutation is redrawn exactly on resumption.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["EpochSampler", "StepPlan", "plan_step", "shard_sizes", "split_sizes"]


class EpochSampler:
    """A seeded permutation of range(n) per epoch, consumed step by step.

    The permutation of epoch e is `torch.randperm(n)` drawn from a
    `torch.Generator` seeded once with `seed`; the generator's state at the
    start of the current epoch is kept so that `load_state_dict` can redraw
    the same permutation and leave the generator where the uninterrupted run
    has it.

    Attributes:
        epoch: index of the epoch whose permutation is being consumed (0-based).
        position: how many indices of that permutation have been taken.
    """

    def __init__(self, n: int, seed: int = 0):
        if n <= 0:
            raise ValueError(f"EpochSampler: the dataset is empty (n={n})")
        self.n = int(n)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.position = 0
        self._epoch_rng_state = self._gen.get_state()
        self._perm = torch.randperm(self.n, generator=self._gen)

    @property
    def remaining(self) -> int:
        """Indices of the current permutation not yet taken."""
        return self.n - self.position

    @property
    def epochs_completed(self) -> int:
        """Epochs whose every index has been taken."""
        return self.epoch + (1 if self.position >= self.n else 0)

    def _new_epoch(self) -> None:
        self._epoch_rng_state = self._gen.get_state()
        self._perm = torch.randperm(self.n, generator=self._gen)
        self.epoch += 1
        self.position = 0

    def step_size(self, size: int, min_step: int = 1) -> int:
        """How many indices the next `take(size, min_step)` returns: `size`,
        or what remains of the epoch, or that plus a tail shorter than
        `min_step` (see the module docstring)."""
        remaining = self.remaining if self.remaining > 0 else self.n
        take = min(int(size), remaining)
        if 0 < remaining - take < min_step:
            take = remaining
        return take

    def take(self, size: int, min_step: int = 1) -> tuple[int, list[int]]:
        """Consume the next step's global indices: (epoch, indices)."""
        if size < 1:
            raise ValueError(f"EpochSampler.take: size must be positive, got {size}")
        if self.remaining == 0:
            self._new_epoch()
        count = self.step_size(size, min_step)
        out = self._perm[self.position:self.position + count].tolist()
        self.position += count
        return self.epoch, out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "rng_state": self._epoch_rng_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"EpochSampler.load_state_dict: the state is for a dataset of "
                             f"{state['n']} samples, this one has {self.n}")
        self.seed = state["seed"]
        self._gen.set_state(state["rng_state"])
        self._epoch_rng_state = state["rng_state"].clone()
        self._perm = torch.randperm(self.n, generator=self._gen)
        self.epoch, self.position = state["epoch"], state["position"]


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Contiguous shares of `total` samples over `world_size` ranks, differing
    by at most one (the first `total % world_size` ranks get one more)."""
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` nearly equal sizes, larger ones first."""
    return shard_sizes(total, parts)


@dataclass
class StepPlan:
    """The samples of one optimizer step.

    Attributes:
        epoch: the epoch the samples come from.
        global_indices: every rank's samples, in rank order.
        parts: this rank's micro-batches (lists of dataset indices).
        shares: number of samples per rank.
        rank: this rank.
    """
    epoch: int
    global_indices: list[int]
    parts: list[list[int]]
    shares: list[int]
    rank: int = 0
    yielded: int = 0          # micro-batches handed out so far
    backwards: int = 0        # backward passes done so far
    loss_sum: torch.Tensor | None = None   # Σ_j loss_j · n_j over this rank's micro-batches
    started: float = 0.0      # time.perf_counter() when the step began

    @property
    def global_size(self) -> int:
        return len(self.global_indices)

    @property
    def local_size(self) -> int:
        return self.shares[self.rank]

    @property
    def accumulation(self) -> int:
        return len(self.parts)

    @property
    def local_indices(self) -> list[int]:
        return [i for p in self.parts for i in p]


def plan_step(sampler: EpochSampler, global_batch: int, micro_batch: int, world_size: int = 1,
              rank: int = 0, min_step: int = 1, min_micro_batches: int = 1) -> StepPlan:
    """Take the next step's samples from `sampler` and split them.

    The step's global indices (``global_batch`` of them, fewer at the end of
    an epoch) are cut into `world_size` contiguous shares (`shard_sizes`);
    this rank's share is cut into k contiguous micro-batches with

        k = max(ceil(max_share / micro_batch), min_micro_batches),

    the same k on every rank, capped at the smallest share so that no rank
    gets an empty micro-batch. The cap only binds in a short last step of an
    epoch, where a micro-batch may then exceed `micro_batch` by one sample.
    """
    epoch, indices = sampler.take(global_batch, min_step)
    shares = shard_sizes(len(indices), world_size)
    if min(shares) < 1:
        raise RuntimeError(f"plan_step: {len(indices)} samples cannot be shared by "
                           f"{world_size} ranks (min_step must be at least world_size)")
    k = max(math.ceil(max(shares) / micro_batch), min_micro_batches)
    k = min(k, min(shares))
    start = sum(shares[:rank])
    mine = indices[start:start + shares[rank]]
    parts, pos = [], 0
    for size in split_sizes(len(mine), k):
        parts.append(mine[pos:pos + size])
        pos += size
    return StepPlan(epoch=epoch, global_indices=indices, parts=parts, shares=shares, rank=rank)
