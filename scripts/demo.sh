#!/usr/bin/env bash
# The embedded default, end to end on a fresh machine: install, build the synthetic corpus (train
# and held-out), distil on a local Ray cluster with two CPU workers, track in ./mlflow.db.
# Extra arguments go to jobs/distill.py (e.g. --set train.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0} MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
[ -f data/demo-corpus/_common_metadata ] || .venv/bin/mdt-ray corpus build --kind synthetic --num-assets 512 --seed 0 --out data/demo-corpus
[ -f data/demo-eval/_common_metadata ] || .venv/bin/mdt-ray corpus build --kind synthetic --num-assets 64 --seed 1 --out data/demo-eval
.venv/bin/python jobs/distill.py --config jobs/configs/demo.yaml --set run.name="demo-$(date +%Y%m%d-%H%M%S)" "$@"
echo "[demo] browse the run: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
