"""What the tracker, the noise-scale estimator and the controller read from a
model's structure: the modules that own each parameter, and the BatchNorm
layers that mix the samples of a batch."""
from __future__ import annotations

from torch import nn

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def parameter_owners(model: nn.Module, trainable_only: bool = True) -> dict[int, list[str]]:
    """id(parameter) -> qualified names of the modules that hold it directly,
    in `named_modules()` order (several for a tied parameter)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad or not trainable_only:
                owners.setdefault(id(p), []).append(name)
    return owners


def mixes_samples(batchnorm: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the batch's statistics (in train
    mode, or in eval mode without running statistics): then the samples of a
    batch are mixed, and per-sample gradients do not exist."""
    return (batchnorm.training or not batchnorm.track_running_stats
            or batchnorm.running_mean is None)


def batchnorm_mixing(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm of `model` that mixes samples."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, BATCHNORM_TYPES) and mixes_samples(m)]
