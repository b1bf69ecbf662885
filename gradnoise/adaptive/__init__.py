"""The adaptive-batch controller: chooses the batch size and scales the learning
rate while training runs, from the gradient noise scale measured on the way.

    controller = AdaptiveBatch(model, opt, dataset, initial_batch=32, max_batch=1024)
    for x, y in controller:                 # one epoch of micro-batches (already collated)
        loss = loss_fn(model(x), y)         # a mean over the micro-batch's samples
        controller.backward(loss)           # instead of loss.backward()
        if controller.step():               # instead of opt.step(); opt.zero_grad()
            scheduler.step()                # the user's own scheduler, untouched

Batch = micro_batch × accumulation steps × world size (global batch = per-replica
batch × replicas; gradient accumulation raises the batch beyond what fits in
memory). The controller owns sampling, so that a batch that grows in the
middle of an epoch drops no sample and repeats none (gradnoise.data).

Policies (the batch for the next steps):
  "critical"  follow the critical batch B_crit ≈ B_noise ≈ B_simple = tr Σ/‖G‖²
              (McCandlish et al. 2018, "An Empirical Model of Large-Batch
              Training"): training at B ≪ B_noise wastes optimizer steps,
              B ≫ B_noise wastes samples, since steps and samples to a target
              loss trade off as (S/S_min − 1)(E/E_min − 1) = 1. Target
              c·B_simple (c = critical_factor), with hysteresis, grow-only by
              default.
  "goodput"   maximise goodput(B) = throughput(B) × efficiency(B) (Pollux /
              AdaptDL, Qiao et al. 2021, OSDI). Under McCandlish's model a
              step of batch B makes as much progress as (1 + B_noise/B)⁻¹
              noiseless steps, so the progress *per sample*, relative to the
              initial batch B0, is
                  efficiency(B) = (φ + B0) / (φ + B),   φ = B_simple;
              throughput(B) = B / time(B) with time(B) = α + β·B fitted by
              least squares to the measured seconds per optimizer step. The
              optimum of B/(α+βB) · (φ+B0)/(φ+B) is B* = sqrt(α φ / β); the
              valid batch sizes on either side of it are compared.
  "schedule"  a given ramp: a callable samples_seen -> batch, or a list of
              (samples_seen threshold, batch) pairs (Megatron-LM's batch-size
              ramp-up; Smith et al. 2018, "Don't Decay the Learning Rate,
              Increase the Batch Size"). See `ramp_schedule`.

Learning-rate rules (a factor on the optimizer's current lr, s = B/B0):
  "none"        1
  "linear"      s (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
  "sqrt"        sqrt(s) (for the Adam family; Malladi et al. 2022, "On the
                SDEs and Scaling Rules for Adaptive Gradient Algorithms")
  "adascale"    r = (tr Σ + ‖G‖²) / (tr Σ/s + ‖G‖²) (Johnson et al. 2020,
                "AdaScale SGD"), from the smoothed estimates
  "mccandlish"  ε(B)/ε(B0) with ε(B) = ε_max / (1 + B_noise/B)
When the batch changes, the factor moves linearly from its old value to the
new one over `warmup_steps` optimizer steps. Goyal et al. 2017 pair the linear
rule with a warm-up, and practice explains why: the "double the
batch, double the learning rate" rule fails while the weights still change
fast and while the batch is small and its gradient variance large, and a
learning rate that jumps at once can throw the model far off before the
larger batch has steadied it.
"""
from __future__ import annotations

from .controller import AdaptiveBatch
from .lr_rules import LR_RULES, MIN_ESTIMATE_STEPS, lr_factor
from .memory_probe import default_memory_budget, probe_micro_batch
from .noise_source import NOISE_SOURCES
from .policies import (POLICIES, BatchLimits, CriticalBatchPolicy, GoodputPolicy, SchedulePolicy,
                       ramp_schedule)
from .records import RECORD_FIELDS

__all__ = ["AdaptiveBatch", "BatchLimits", "CriticalBatchPolicy", "GoodputPolicy",
           "SchedulePolicy", "probe_micro_batch", "ramp_schedule",
           "lr_factor", "default_memory_budget", "LR_RULES", "POLICIES", "NOISE_SOURCES",
           "RECORD_FIELDS", "MIN_ESTIMATE_STEPS"]
