#!/usr/bin/env bash
# The README's first command: set up, then pretrain -> finetune -> evaluate the offline demo
# (EfficientNet-Lite0 + SmolLM2-135M on the digits and shapes sets). Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec alignlm train +exp=demo "$@"
