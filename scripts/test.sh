#!/usr/bin/env bash
# The test command: installs what the tests need into .venv, then runs the suite (slow benchmarks
# are skipped; run them with `scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest "$@"
