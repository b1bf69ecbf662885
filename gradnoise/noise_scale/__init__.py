"""GradientNoiseScale: the gradient noise scale of a model, measured step after
step from whichever small batch is at hand (estimators.py has the maths).

Sources (all give the same estimate on the same data):
  "per_sample"   b = 1, B = batch: per-sample norms from a GradNoiseTracker.
  "micro_batch"  b = micro-batch, B = accumulated batch: the gradient of
                 each backward of a gradient-accumulation step. Works for any
                 model (BatchNorm included) and needs no per-sample kernel.
  "distributed"  b = local batch, B = global batch, under
                 DistributedDataParallel: each rank's gradient before the
                 all-reduce against the all-reduced one. Only a few scalars
                 per layer and step cross the network.

    gns = GradientNoiseScale(model, source="micro_batch")
    for x, y in step_batches:                       # k micro-batches
        (loss_fn(model(x), y) / k).backward()
    gns.step(batch_size)            # after the last backward, before zero_grad
    optimizer.step(); optimizer.zero_grad()
    gns.read().b_simple, gns.read().interval()

Micro-batches (and DDP shards) of unequal sizes, or losses weighted by
anything but 1/k, are declared with `after_backward(loss_scale, batch_size)`
after each backward; the estimates then use each backward's own batch size
and weight (estimators.effective_batch_size), so they stay unbiased.
B_simple does not depend on a loss scale common to every backward (mean or
sum, a constant factor, a GradScaler), since 𝒢 and 𝒮 scale alike; ‖G‖² and
tr(Σ) are reported for the mean loss over samples, the GradScaler's scale
undone.
"""
from .scale import SOURCES, GradientNoiseScale

__all__ = ["GradientNoiseScale", "SOURCES"]
