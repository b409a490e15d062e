#!/usr/bin/env bash
# Set up (once) and run the tests: `bash scripts/test.sh [pytest args]` (`-m slow` for the long ones)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
