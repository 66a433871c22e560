#!/usr/bin/env bash
# The README's second command: set up, then run the test suite (CPU, offline). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# one pytest-xdist worker per core, at most 8; tests that launch ranks share one worker (tests/conftest.py: RANKS)
workers=$(nproc)
((workers > 8)) && workers=8
exec python -m pytest -q -n "$workers" --dist loadgroup "$@"
