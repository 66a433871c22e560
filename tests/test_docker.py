"""The images install what the tests run with: pins that satisfy pyproject.toml, torch at setup.sh's version."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_pin_satisfies_pyproject_and_every_range_is_pinned():
    pinned = pins()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        exact = any(s.operator == "==" for s in req.specifier)
        if name == "torch" or exact:  # torch: installed first by each Dockerfile; == pins: pyproject's own
            assert name not in pinned or req.specifier.contains(pinned[name]), req
            continue
        assert name in pinned, f"{req.name} is a range in pyproject.toml but not pinned in docker/constraints.txt"
        assert req.specifier.contains(pinned[name]), f"docker pins {req.name}=={pinned[name]}, pyproject wants {req}"


def test_both_images_use_the_pins_and_setup_shs_torch():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    torch_version = re.search(r"ALIGNLM_TORCH_VERSION:-([0-9.]+)", setup).group(1)
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f"ARG TORCH_VERSION={torch_version}" in text, dockerfile
        assert "PIP_CONSTRAINT=/app/docker/constraints.txt" in text, dockerfile
        assert "scripts/setup.sh" in text, dockerfile  # the same set-up as a fresh machine
    assert '".[deepspeed]"' in DOCKERFILES[0].read_text()


# The CUDA major of torch's default Linux wheel on PyPI (its cuda-toolkit requirement), by torch version: the CUDA
# image's toolkit must have it, or flash-attn's and DeepSpeed's op builds stop at torch's CUDA version check. Add the
# pair when the torch pin moves (`pip download torch==X --no-deps` and read the wheel's Requires-Dist).
TORCH_WHEEL_CUDA_MAJOR = {"2.13.0": 13}


def test_the_cuda_image_has_the_cuda_major_of_its_torch_wheel():
    text = DOCKERFILES[0].read_text()
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    cuda_major = int(re.search(r"^FROM nvidia/cuda:(\d+)\.", text, re.M).group(1))
    assert torch_version in TORCH_WHEEL_CUDA_MAJOR, f"torch {torch_version}: add its wheel's CUDA major here"
    assert cuda_major == TORCH_WHEEL_CUDA_MAJOR[torch_version], (
        f"docker/Dockerfile's base image has CUDA {cuda_major}, torch {torch_version}'s wheel is built for CUDA "
        f"{TORCH_WHEEL_CUDA_MAJOR[torch_version]}"
    )


def test_the_cpu_images_default_command_runs_the_installed_demo():
    """`docker run alignlm:cpu` must work without network: no set-up script (pip) at start, the venv's alignlm."""
    text = DOCKERFILES[1].read_text()
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert cmd == ["alignlm", "train", "+exp=demo"], cmd
    assert "PATH=/app/.venv/bin:$PATH" in text


def instructions(dockerfile: Path) -> list[str]:
    """A Dockerfile's instructions, each on one line (continuations joined, comments left out)."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines() if line[:1] != "#"))
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def test_both_images_install_the_dependencies_before_copying_the_sources():
    """`COPY . /app` came before the RUN that installs torch and every dependency: any edit in the repository
    installed them all again (GBs). They install from the files that name them alone (pyproject.toml, setup.sh, the
    pins), then the sources come, and alignlm installs over them without its dependencies."""
    for dockerfile in DOCKERFILES:
        steps = instructions(dockerfile)
        setup = next(i for i, step in enumerate(steps) if "scripts/setup.sh" in step and step.startswith("RUN "))
        sources = steps.index("COPY . /app")
        assert setup < sources, dockerfile
        copied = {path for step in steps[:setup] if step.startswith("COPY ") for path in step.split()[1:-1]}
        assert copied == {"pyproject.toml", "scripts/setup.sh", "docker/constraints.txt"}, dockerfile
        assert steps[sources + 1 :][:1] == ["RUN pip install --no-deps -e ."], dockerfile


def test_the_docker_context_leaves_out_what_runs_exports_and_reports_write():
    """README's export folder (exported/, ignored by git) was sent to `docker build` and baked into the image: every
    folder at the root that git ignores is left out of the context, and so are the reports and job logs."""
    left_out = set((ROOT / ".dockerignore").read_text().split())
    ignored = {line.strip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.startswith("/")}
    assert ignored | {"eval_report", "logs"} <= left_out, sorted(ignored | {"eval_report", "logs"} - left_out)


def test_the_documented_docker_run_quotes_its_volume():
    """`-v $PWD/outputs:/app/outputs` unquoted splits in a checkout under a folder with a space."""
    for doc in (ROOT / "docs" / "cluster.md", DOCKERFILES[0]):
        text = doc.read_text()
        assert "-v $PWD" not in text and '-v "$PWD/outputs:/app/outputs"' in text, doc


def setup_sh_checkout(root: Path) -> None:
    """scripts/setup.sh and pyproject.toml in ``root``, where the script makes its .venv."""
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")


def stand_in_venv(venv_bin: Path, pip_calls: Path) -> None:
    """A made virtualenv's bin/ at ``venv_bin`` (its files named for the folder they will be in): python is this
    test's (torch and alignlm importable, pip runs), pip a stand-in that records its calls in ``pip_calls``."""
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv_bin / "pip").write_text(f'#!/bin/sh\necho "$@" >> {pip_calls}\n')
    for tool in ("python", "pip"):
        (venv_bin / tool).chmod(0o755)
    (venv_bin / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')


def test_setup_sh_installs_alignlm_again_only_when_pyproject_changes(tmp_path):
    """A second `scripts/setup.sh` (scripts/test.sh and demo.sh run it) installs nothing, so it works offline, as in
    the CPU image; a changed pyproject.toml is installed again. pip here is a stand-in that records its calls."""
    setup_sh_checkout(tmp_path)
    stand_in_venv(tmp_path / ".venv" / "bin", tmp_path / "pip_calls")

    def setup_installs_alignlm() -> bool:
        calls = tmp_path / "pip_calls"
        calls.unlink(missing_ok=True)
        subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
        return calls.exists() and "-e .[dev]" in calls.read_text()

    assert setup_installs_alignlm()
    assert not setup_installs_alignlm()
    with (tmp_path / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert setup_installs_alignlm()


@pytest.mark.parametrize("venv_module", [True, False])
def test_setup_sh_makes_again_a_virtualenv_whose_making_was_interrupted(tmp_path, venv_module):
    """An interrupted `python3 -m venv` (or one without Debian's python3-venv, whose ensurepip fails) leaves
    .venv/bin/python with no bin/activate and no pip; setup.sh took it as made, and every later run failed at
    activating it. It makes the virtualenv again over it, or, where that fails, says what to install."""
    setup_sh_checkout(tmp_path)
    half = tmp_path / ".venv" / "bin"
    half.mkdir(parents=True)
    (half / "python").write_text("#!/bin/sh\nexit 1\n")  # `python -m pip`: No module named pip
    (half / "python").chmod(0o755)
    stand_in_venv(tmp_path / "made", tmp_path / "pip_calls")
    # PYTHON: `-m venv .venv` makes the stand-in virtualenv, or fails as without python3-venv
    make = f"cp {tmp_path / 'made'}/* .venv/bin/" if venv_module else "echo 'ensurepip is not available' >&2; exit 1"
    (tmp_path / "python3").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/venv_calls\n{make}\n')
    (tmp_path / "python3").chmod(0o755)
    env = {**os.environ, "PYTHON": str(tmp_path / "python3")}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (tmp_path / "venv_calls").read_text().split() == ["-m", "venv", ".venv"], proc.stderr
    if venv_module:
        assert proc.returncode == 0, proc.stderr
        assert "-e .[dev]" in (tmp_path / "pip_calls").read_text()
    else:
        assert proc.returncode == 1 and "apt install python3-venv" in proc.stderr, proc.stderr
