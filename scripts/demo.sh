#!/usr/bin/env bash
# The embedded default, end to end on a fresh machine: install, build the synthetic corpus (train
# and held-out), distil on a local Ray cluster with two CPU workers, evaluate the student against
# the teacher, track in ./mlflow.db. Extra arguments go to jobs/distill.py (e.g. --set
# train.steps=200); DEMO_EVAL=0 skips the evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0} MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
[ -f data/demo-corpus/_common_metadata ] || .venv/bin/mdt-ray corpus build --kind synthetic --num-assets 512 --seed 0 --out data/demo-corpus
[ -f data/demo-eval/_common_metadata ] || .venv/bin/mdt-ray corpus build --kind synthetic --num-assets 64 --seed 1 --out data/demo-eval
name="demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python jobs/distill.py --config jobs/configs/demo.yaml --set run.name="$name" "$@"
# The student at 1 and 2 steps against the teacher's 25 guided steps on the held-out corpus:
# table, renders.png and eval.json under runs/<name>/eval, metrics in the same MLflow store.
if [ "${DEMO_EVAL:-1}" != 0 ] && [ -d "runs/$name" ]; then
  .venv/bin/python jobs/evaluate.py "runs/$name" --config jobs/configs/demo.yaml --steps 1 2 --assets 64 \
    --out "runs/$name/eval"
fi
echo "[demo] browse the run: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
