"""The built-in task as a sweep's `Task`: the demo's byte-level language
model on the standard library's source, trained by Adam."""
from __future__ import annotations

import functools
import platform

import torch

from ..byte_lm import ByteLM, lm_loss
from ..demo import DemoConfig, byte_windows, init_small
from .runs import Task


def _model(config: DemoConfig) -> torch.nn.Module:
    model = ByteLM(vocab=256, d=config.width, heads=config.heads, blocks=config.blocks,
                   context=config.context)
    init_small(model)
    return model


def _adam(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return lm_loss(model(x), y)


def byte_lm_task(config: DemoConfig | None = None) -> Task:
    """The demo's model, data and optimizer (DemoConfig's sizes)."""
    config = config or DemoConfig()
    # everything the runs depend on, so that a resumed sweep refuses another's runs;
    # the data is the standard library of this Python version
    return Task(name=f"byte-lm(d={config.width}, heads={config.heads}, blocks={config.blocks}, "
                     f"context={config.context}, bytes={config.data_bytes}, "
                     f"python={platform.python_version()})",
                model=functools.partial(_model, config), optimizer=_adam, loss=_loss,
                data=functools.partial(byte_windows, config))
