"""How a tracked call's input lays out the batch (docs/design.md §6).

The batch is dim 0 of the model's input; B is read there, at every forward
(`model_batch_size`). A tracked module usually sees the same dim 0, but
models also call modules

- on a tensor shared by every sample, with dim 0 of size 1, broadcast over
  the batch afterwards (a position embedding called with a [1, T] index, as
  GPT-2, BERT and DistilBERT do): sample i's gradient is the part of the
  gradient that flows into sample i's rows of the broadcast, so the output
  is expanded to [B, …] at once (a view: the values are unchanged) and the
  call is measured as if every sample had passed the same input;
- on the batch reshaped into rows, [B·k, …] (OPT's decoder layers flatten
  [B, T, d] into [B·T, d]): when the input is a contiguous view of a
  contiguous tensor whose dim 0 is B, rows r·k … r·k + k − 1 belong to sample
  r, and a rule whose module works row by row measures the call as
  [B, k, …].

Anything else whose dim 0 is not B cannot be told apart from a batch; the
tracker then names the modules whose batch sizes differ.
"""
from __future__ import annotations

import torch

BATCH, BROADCAST, ROWS = "batch", "broadcast", "rows"


def model_batch_size(args: tuple, kwargs: dict) -> int | None:
    """B: dim 0 of the model's first tensor input (positional, else keyword:
    `input_ids`, `pixel_values`, `x`); None if it has none."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a.shape[0]
    return None


def layout(x: torch.Tensor, B: int | None) -> str | None:
    """BATCH, BROADCAST or ROWS for a call's input `x` in a step of B samples
    (see the module docstring); None if it is none of them."""
    if B is None or x.dim() == 0 or x.shape[0] == B:
        return BATCH
    if x.shape[0] == 1:
        return BROADCAST
    if x.shape[0] % B == 0 and _rows_of_batch(x, B):
        return ROWS
    return None


def _rows_of_batch(x: torch.Tensor, B: int) -> bool:
    """Whether contiguous `x` views the memory of a tensor of B samples that
    holds each sample in a block of its own (dense, dim 0 outermost): then
    every run of numel/B elements of x, and so every row, is one sample's."""
    base = x._base
    return (base is not None and base.dim() > 0 and base.shape[0] == B
            and base.numel() == x.numel() and base.data_ptr() == x.data_ptr()
            and x.is_contiguous() and _dense_batch_major(base))


def _dense_batch_major(t: torch.Tensor) -> bool:
    dims = sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=t.stride)
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return not dims or dims[-1] == 0 or t.shape[0] == 1


def expand_to(t, B: int):
    """`t` with its dim 0 of size 1 expanded to B (a view); other values as they are."""
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
        return t.expand(B, *t.shape[1:])
    return t


def split_rows(t, B: int):
    """A [B·k, …] tensor as [B, k, …]; other values as they are."""
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] % B == 0 and t.shape[0] != B:
        return t.reshape(B, t.shape[0] // B, *t.shape[1:])
    return t


def reduce_per_sample(g: torch.Tensor, shape: torch.Size, B: int) -> torch.Tensor:
    """The gradient of a tensor of `shape` broadcast to g's shape [B, …], per
    sample: [B, *shape], summed over the broadcast dims other than the batch."""
    # (torch.sum over an empty list of dims would sum them all)
    lead = g.dim() - len(shape)
    if lead == 0:        # shape [1, …]: its dim 0 became the batch
        dims = [d for d in range(1, g.dim()) if shape[d] == 1 and g.shape[d] != 1]
        return (g.sum(dims, keepdim=True) if dims else g).reshape(B, *shape)
    if lead > 1:
        g = g.sum(list(range(1, lead)))
    dims = [d + 1 for d, s in enumerate(shape) if s == 1 and g.shape[d + 1] != 1]
    return (g.sum(dims, keepdim=True) if dims else g).reshape(B, *shape)
