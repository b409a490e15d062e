#!/usr/bin/env bash
# Set up (once, with the Qwen2.5-Coder-0.5B weights) and run the reward-accuracy study:
# `bash scripts/study.sh model=qwen_coder_05b threads=1 [hydra overrides]`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh qwen
exec .venv/bin/python -m covo.study "$@"
