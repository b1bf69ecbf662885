"""The set-up itself: the README's two commands, the pinned constraints they
install from, CI's brand-new environment, and gradnoise working with its
runtime dependencies alone."""
from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CI_RUN = (ROOT / ".ci" / "run").read_text()

RUNTIME = {"torch", "numpy", "rich", "matplotlib"}
BUILD_TOOLS = {"setuptools", "wheel", "ninja"}
PEERS = {"opacus", "backpack-for-pytorch", "einops", "unfoldnd"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_commands() -> list[str]:
    """The README's two set-up commands: the main job's, then the tests'."""
    block = re.search(r"## Set up\n.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of each `python3 -m pip install` in a shell command line."""
    steps = [shlex.split(step) for step in command.split("&&")]
    return [step[4:] for step in steps if step[:4] == ["python3", "-m", "pip", "install"]]


def requested(args: list[str]) -> set[str]:
    """The packages one pip install asks for by name: the project's own
    dependencies and chosen extras for `.` or `.[extras]`, other names as given."""
    names, skip_next = set(), False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in ("-c", "--constraint", "-r", "--requirement")
            continue
        project = re.fullmatch(r"\.(?:\[(.*)\])?", arg)
        if project is None:
            names.add(canonical(Requirement(arg).name))
            continue
        extras = [e for e in (project.group(1) or "").split(",") if e]
        deps = PYPROJECT["project"]["dependencies"] + [
            r for e in extras for r in PYPROJECT["project"]["optional-dependencies"][e]]
        names |= {canonical(Requirement(r).name) for r in deps}
    return names


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a `name==version` pin"
            pins[canonical(name)] = Version(version)
    return pins


def test_readme_has_two_set_up_commands_that_parse():
    main, tests = setup_commands()
    assert main.endswith("&& python3 -m gradnoise demo"), main
    assert tests.endswith("&& python3 -m pytest"), tests
    for command in (main, tests):
        installs = pip_installs(command)
        assert len(installs) == 2, command
        assert any(re.fullmatch(r"\.(\[.*\])?", a) for a in installs[1]), command


def test_every_install_uses_the_constraints():
    bench = re.findall(r"^python3 -m pip install .*$", README.split("## Set up")[1], re.M)
    for command in setup_commands() + bench:
        for args in pip_installs(command):
            i = args.index("-c") if "-c" in args else None
            assert i is not None and args[i + 1] == "constraints.txt", command


def test_main_command_installs_only_what_the_demo_needs():
    main = setup_commands()[0]
    wanted = set().union(*(requested(args) for args in pip_installs(main)))
    assert wanted - BUILD_TOOLS == RUNTIME, wanted
    assert {canonical(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]} \
        == RUNTIME


def test_peers_have_their_own_install_line():
    bench_section = README.split("## Measured performance")[1]
    lines = re.findall(r"^python3 -m pip install .*$", bench_section, re.M)
    installed = set().union(*(requested(a) for line in lines for a in pip_installs(line)))
    assert PEERS <= installed, lines
    assert not PEERS & requested(pip_installs(setup_commands()[1])[1]), \
        "the test command must not need the benchmark peers"


def test_constraints_pin_every_requirement_within_its_declared_bounds():
    pins = constraints()
    assert str(pins["torch"]) == "2.13.0", "the CPU build of torch on this project's machines"
    declared = (PYPROJECT["build-system"]["requires"] + PYPROJECT["project"]["dependencies"]
                + [r for rs in PYPROJECT["project"]["optional-dependencies"].values() for r in rs])
    for text in declared:
        req = Requirement(text)
        name = canonical(req.name)
        assert name in pins, f"{name} is required in pyproject.toml but not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"pyproject.toml says {text!r}, constraints.txt pins {pins[name]}"


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    command = setup_commands()[1]
    assert command in CI_RUN
    lines = CI_RUN.splitlines()
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in ("mktemp -d", "python3 -m venv", "bin/activate", command)}
    assert at["mktemp -d"] < at["python3 -m venv"] < at["bin/activate"] < at[command], at
    assert "--system-site-packages" not in CI_RUN


@pytest.mark.skipif("GRADNOISE_CI_VENV" not in os.environ, reason="checks CI's environment")
def test_ci_environment_is_the_brand_new_one():
    venv = Path(os.environ["GRADNOISE_CI_VENV"]).resolve()
    assert Path(sys.prefix).resolve() == venv
    cfg = (venv / "pyvenv.cfg").read_text()
    assert re.search(r"include-system-site-packages\s*=\s*false", cfg), cfg
    base_site = Path(sys.base_prefix).resolve() / "lib"
    leaked = [p for p in sys.path if p and Path(p).resolve().is_relative_to(base_site)
              and "site-packages" in p]
    assert not leaked, f"the machine's site-packages is on sys.path: {leaked}"
    pins = constraints()
    # (this folder alone: setuptools puts its vendored copies of packages on sys.path)
    for dist in metadata.distributions(path=[sysconfig.get_paths()["purelib"]]):
        name = canonical(dist.metadata["Name"])
        if name in pins:
            assert Version(Version(dist.version).base_version) == pins[name] \
                or Version(dist.version) == pins[name], (name, dist.version)


def runtime_distributions() -> set[str]:
    """gradnoise's runtime dependencies and theirs, extras left out."""
    todo, seen = [canonical(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def test_works_with_its_runtime_dependencies_alone(tmp_path):
    """A site folder holding only the runtime dependencies (linked from this
    environment), Python started without its own site-packages: import every
    module but the Triton kernels (the `triton` extra), the trainers' callbacks (their
    extras: importing one says which) and `__main__`, run an op, track a
    step, and run `gradnoise info`, which must say that triton is missing."""
    site = tmp_path / "site"
    site.mkdir()
    for name in runtime_distributions():
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    code = f"""
import sys
sys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]
import importlib, pkgutil
import torch
import gradnoise
assert importlib.util.find_spec("pytest") is None and importlib.util.find_spec("triton") is None
frameworks = {{"gradnoise.integrations.lightning": "lightning",
              "gradnoise.integrations.transformers": "transformers"}}
for m in pkgutil.walk_packages(gradnoise.__path__, "gradnoise."):
    if m.name in frameworks:        # each needs its extra, and says so
        try:
            importlib.import_module(m.name)
        except ImportError as e:
            assert f"gradnoise[{{frameworks[m.name]}}]" in str(e), e
        else:
            raise AssertionError(m.name + " imported without its framework")
    elif not m.name.startswith("gradnoise.ops.triton.") and m.name != "gradnoise.__main__":
        importlib.import_module(m.name)
from gradnoise import ops, cli
x, g = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
torch.testing.assert_close(ops.linear_sq_norms(x, g), ops.linear_sq_norms_ref(x, g))
model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
with gradnoise.GradNoiseTracker(model, loss_reduction="sum") as tracker:
    model(torch.randn(4, 5)).square().sum().backward()
    assert tracker.per_sample_sq_norms().shape == (4,)
sys.exit(cli.main(["info"]))
"""
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"triton.*not installed", proc.stdout), proc.stdout
