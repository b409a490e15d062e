#!/usr/bin/env bash
# Set up (once) and train: `bash scripts/train.sh [hydra overrides]`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py "$@"
