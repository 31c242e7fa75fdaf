"""The benchmark's --quick comparison end to end: corpora, Ray Tune sweep, seeds, figures, MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
def test_quick_benchmark_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/methods.py"), "run", "--quick", "--root", str(tmp_path),
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"mdt", "vm", "cm", "pcm", "scm"}
    for seeds in results["runs"].values():
        assert len(seeds) == 3 and all(set(s["scores"]) == {"1", "2", "4"} for s in seeds)
    assert set(results["teachers"]) == {"exact teacher", "learned teacher"}
    exact = results["teachers"]["exact teacher"]
    assert exact["25"]["precision"] == 1.0 and exact["1"]["precision"] == 0.0
    # The MDT-dist sweep ran through Ray Tune and chose one of its grid's learning rates.
    selected = json.loads((out / "selected.json").read_text())
    assert selected["sweeps"]["mdt"]["best"]["params"]["train.lr"] in (1e-4, 3e-4)
    # ...on the exact 2-step precision that its trials' in-training eval reported on validation.
    assert "eval_precision_2step" in selected["sweeps"]["mdt"]["table"]
    assert 0.0 <= selected["sweeps"]["mdt"]["best"]["metric"] <= 1.0
    # The ablation's Δt that the sweep kept is the final runs themselves, not a second training.
    assert results["dt_ablation"]["runs"]["dt=0.05"][0]["scores"] == results["runs"]["mdt"][0]["scores"]
    assert len(results["dt_ablation"]["runs"]["dt=0.1"]) == 1
    for name in ("quality_vs_steps.png", "training_curves.png", "render_grid.png", "truth_modes.png", "tables.md"):
        assert (out / name).stat().st_size > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mdt-ray-benchmark")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "benchmark"]
    assert len(runs) == 1 and "mdt_precision_1step" in runs[0].data.metrics
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id, "benchmark")}
    assert "benchmark/render_grid.png" in names
