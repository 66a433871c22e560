"""The images install what the tests run with: pins that satisfy pyproject.toml, torch at setup.sh's version."""

from __future__ import annotations

import re
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
