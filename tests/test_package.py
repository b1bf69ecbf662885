"""Installation-level behaviour: the fallback when the compiled kernels are
missing, backend selection and the CLI (the set-up itself: test_install.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradnoise
from gradnoise import ops

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def test_missing_compiled_library_falls_back_with_one_warning():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['gradnoise._C'] = None  # as if the build had failed\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import gradnoise\n"
        "    from gradnoise import ops\n"
        "    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 6)\n"
        "    a = ops.linear_sq_norms(x, g)\n"
        "    b = ops.linear_sq_norms(x, g)\n"
        "    ref = ops.linear_sq_norms_ref(x, g)\n"
        "assert torch.equal(a, ref) and torch.equal(b, ref)\n"
        "msgs = [str(m.message) for m in w if 'compiled CPU kernels' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "pip install --no-build-isolation -e ." in proc.stdout
    assert "falling back" in proc.stdout


def test_backend_environment_variable(monkeypatch):
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    monkeypatch.setenv("GRADNOISE_BACKEND", "reference")
    assert torch.equal(ops.linear_sq_norms(x, g), ops.linear_sq_norms_ref(x, g))
    monkeypatch.setenv("GRADNOISE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*GRADNOISE_BACKEND"):
        ops.linear_sq_norms(x, g)


def test_unusable_backend_says_why():
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        ops.linear_sq_norms(x, g, backend="cuda")


def test_info_command_lists_backends():
    proc = subprocess.run([sys.executable, "-m", "gradnoise", "info"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == (0 if gradnoise._extension.compiled_status("cpu") is None else 1)
    for name in ("cpu", "cuda", "triton", "reference"):
        assert re.search(rf"\b{name}\b", proc.stdout), proc.stdout



def test_code_cites_sections_of_the_design_document():
    design = (ROOT / "docs/design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, re.M))
    files = [p for d in ("gradnoise", "csrc", "tests", "benchmarks") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".cpp", ".cu", ".cuh", ".h")]
    cited = []
    for path in files:
        text = path.read_text()
        stray = re.findall(r"[\w/]*design\.md", text, re.I)
        assert set(stray) <= {"docs/design.md"}, f"{path} cites {stray}, not docs/design.md"
        cited += [(path.name, n) for n in re.findall(r"docs/design\.md §(\d+)", text)]
    assert cited, "the code cites docs/design.md"
    assert all(n in sections for _, n in cited), (sorted(sections), cited)
    assert "(docs/design.md)" in (ROOT / "README.md").read_text()
