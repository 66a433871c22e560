"""The images install what the tests run with: pins that satisfy pyproject.toml, torch at setup.sh's version."""

from __future__ import annotations

import json
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


def test_setup_sh_installs_alignlm_again_only_when_pyproject_changes(tmp_path):
    """A second `scripts/setup.sh` (scripts/test.sh and demo.sh run it) installs nothing, so it works offline, as in
    the CPU image; a changed pyproject.toml is installed again. pip here is a stand-in that records its calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # torch and alignlm importable
    (venv_bin / "pip").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip_calls\n')
    for tool in ("python", "pip"):
        (venv_bin / tool).chmod(0o755)
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')

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
