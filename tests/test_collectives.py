"""Where the collectives put their scalars: NCCL takes no CPU tensor. (The
reductions themselves run in every multi-process test: DDP, FSDP2, the
trainers' callbacks.)"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gradnoise import collectives


def test_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, device in (("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                            ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collectives.collective_device() == device


def test_one_process_returns_the_values_unreduced():
    assert not dist.is_initialized()
    assert collectives.world_size() == 1
    assert collectives.all_reduce([1.5, 2], "max") == [1.5, 2]
