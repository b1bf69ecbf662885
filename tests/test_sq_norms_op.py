"""ops.sq_norms (the noise-scale estimator's read of every gradient) against
float64 sums of squares."""
from __future__ import annotations

import pytest
import torch

from gradnoise import ops

SHAPES = [(1,), (7,), (33, 17), (1024, 1000), (3, 5, 7, 9), (0,), (70001,)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def _truth(ts):
    return torch.tensor([t.double().square().sum().item() for t in ts], dtype=torch.float64)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matches_float64_sums_of_squares(dtype, backend):
    gen = torch.Generator().manual_seed(0)
    ts = [(torch.randn(s, generator=gen, dtype=torch.float64) * 3).to(dtype) for s in SHAPES]
    got = ops.sq_norms(ts, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (len(ts),)
    torch.testing.assert_close(got, _truth(ts), rtol=TOL[dtype], atol=0)


def test_strided_views_and_large_values():
    base = torch.randn(300, 500, dtype=torch.float32) * 1e18   # squares overflow float16 and
    ts = [base.T, base[::3, 1::2], base[5]]                     # come near float32's range
    torch.testing.assert_close(ops.sq_norms(ts), _truth(ts), rtol=1e-6, atol=0)


def test_same_result_for_any_number_of_threads():
    ts = [torch.randn(200_003), torch.randn(513, 77), torch.randn(3)]
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.sq_norms(ts))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_empty_list():
    assert ops.sq_norms([]).shape == (0,)


def test_bad_input_names_the_tensor():
    with pytest.raises(TypeError, match="tensor 1 has dtype torch.int64"):
        ops.sq_norms([torch.randn(3), torch.arange(3)])
    with pytest.raises(ValueError, match="tensor 0 is sparse"):
        ops.sq_norms([torch.randn(3, 3).to_sparse()])
    with pytest.raises(TypeError, match="item 1 is a list"):
        ops.sq_norms([torch.randn(3), [1.0]])


def test_opcheck():
    ts = [torch.randn(40, 3), torch.randn(5, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.gradnoise.sq_norms.default, (ts,))
