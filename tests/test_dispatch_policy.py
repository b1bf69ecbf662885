"""The default backend of each op family on each device (docs/design.md §2),
checked by the policy function itself with the backends' availability
given, so that the CUDA choices are tested on a machine without a GPU."""
from __future__ import annotations

import pytest
import torch

from gradnoise.ops import backends
from gradnoise.ops.backends import OPS, default_backend
from gradnoise.ops.linear import op_family


def status_of(*usable):
    return lambda name: None if name in usable else f"{name} is not here"


@pytest.mark.parametrize("op", OPS)
def test_cuda_puts_matrix_work_on_tensor_cores_and_keeps_memory_bound_work_on_cuda(op):
    be, why = default_backend("cuda", op, status_of("cuda", "triton", "reference"))
    if op in ("linear_matrix", "conv"):  # conv: unfolded patches through the Linear op
        assert be == "triton" and "tensor cores" in why
    else:
        assert be == "cuda" and "memory-bound" in why


def test_cuda_without_triton_or_without_the_cuda_kernels():
    be, why = default_backend("cuda", "linear_matrix", status_of("cuda", "reference"))
    assert be == "cuda" and "triton is not here" in why
    for op, want in (("linear_matrix", "triton"), ("norm_layers", "triton"),
                     ("conv", "triton"), ("embedding", "reference")):
        assert default_backend("cuda", op, status_of("triton", "reference"))[0] == want
    assert default_backend("cuda", "reductions", status_of("reference"))[0] == "reference"


@pytest.mark.parametrize("op", OPS)
def test_cpu_takes_the_compiled_cpu_kernels(op):
    assert default_backend("cpu", op, status_of("cpu", "triton", "reference"))[0] == "cpu"
    be, why = default_backend("cpu", op, status_of("triton", "reference"))
    assert be == "reference" and "cpu is not here" in why


def test_unknown_op_family_is_refused():
    with pytest.raises(ValueError, match="unknown op family"):
        default_backend("cuda", "attention", status_of("cuda"))


def test_linear_ops_name_their_family_by_positions():
    assert op_family(torch.zeros(4, 8)) == "linear_rows"
    assert op_family(torch.zeros(4, 1, 8)) == "linear_rows"
    assert op_family(torch.zeros(4, 3, 8)) == "linear_matrix"
    assert op_family(torch.zeros(4, 2, 5, 8)) == "linear_matrix"


def test_resolution_is_remembered_per_op_family(monkeypatch):
    monkeypatch.setattr(backends, "_RESOLVED", {})
    calls = []
    monkeypatch.setattr(backends, "_resolve",
                        lambda device, requested, op: calls.append(op) or "reference")
    for op in ("conv", "conv", "linear_matrix"):
        backends.resolve_backend(torch.device("cpu"), None, op)
    assert calls == ["conv", "linear_matrix"]
