"""`python -m gradnoise gpu-check` where it can be checked without a GPU: it
refuses to run without CUDA, saying why, and its report renders what the GPU
stages return."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from gradnoise import gpu_check
from gradnoise.benchmarking import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu-check would run")
def test_without_cuda_it_exits_2_and_says_why(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gradnoise", "gpu-check", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no CUDA device is visible" in done.stdout
    assert not (tmp_path / "gpu-check.json").exists()


def test_the_report_renders_the_stages_results():
    row = gpu.KernelRow((8, 2048, 4096, 4096), "bfloat16", 1.5, 730.0,
                        {"fused[triton]": 1.04, "norms[triton]": 0.3, "tracker op": 1.04},
                        "fused")
    step = gpu.StepRow("gpt2", "transformers GPT-2 d=1024", 80.0,
                       {"gradnoise all": 1.07, "gradnoise norm": 1.01, "plain, again": 1.0})
    result = {"env": {"gpu": "NVIDIA H200"}, "kernels": [row.to_dict()], "steps": [step.to_dict()]}
    out = io.StringIO()
    gpu_check._tables(result, Console(file=out, width=200))
    text = out.getvalue()
    assert "NVIDIA H200" in text and "1.04×" in text and "fused" in text
    assert "1.070×" in text and "1.010×" in text
    assert row.target == gpu.KERNEL_TARGET  # bf16 at T ≥ 512 carries the target
    assert gpu.KernelRow((8, 128, 64, 64), "bfloat16", 1.0, 1.0).target is None


def test_the_kernel_cases_cover_both_dtypes_and_the_llm_layers():
    cases = gpu.kernel_cases()
    assert {dt for _, dt in cases} == {torch.bfloat16, torch.float32}
    assert all(shape in {s for s, _ in cases} for shape in gpu.LLM_SHAPES)
    assert len(gpu.kernel_cases(quick=True)) < len(cases)


def test_a_kernel_that_disagrees_with_cublas_fails_loudly():
    with pytest.raises(gpu.KernelMismatch, match="max error"):
        gpu._check("fused[triton]", torch.ones(4), torch.zeros(4) + 2, 1e-3)
    with pytest.raises(gpu.KernelMismatch):
        gpu._check("nan", torch.full((4,), float("nan")), torch.ones(4), 1e-3)
    gpu._check("close", torch.ones(4), torch.ones(4) * (1 + 1e-5), 1e-4)
