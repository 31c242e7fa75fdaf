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
    # What two runs of the command must share to agree: the software, the machine, the shard layout.
    machine = results["provenance"]
    assert machine["torch_threads"] >= 1 and machine["torch"] and machine["ray"] and machine["cpu"]
    train_shards = sorted(p.name for p in (tmp_path / "data/multimodal-train").glob("*.parquet"))
    assert [s[0] for s in machine["corpora"]["train"]["shards"]] == train_shards
    assert machine["corpora"]["train"]["rows"] == sum(s[1] for s in machine["corpora"]["train"]["shards"]) == 4096
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


def test_runs_in_a_process_pool_match_runs_in_this_process(tmp_path):
    """budget.jobs changes the wall time only: two runs trained in spawned processes give the
    curves, scores and weights that the same runs give one after the other in this process."""
    import torch

    from mdt_ray.benchmark import compare
    from mdt_ray.cli import main

    uris = {}
    for split, n, seed in (("train", 32, 0), ("val", 8, 1), ("test", 16, 2)):
        uris[split] = str(tmp_path / split)
        assert main(["corpus", "build", "--kind", "multimodal", "--num-assets", str(n), "--seed", str(seed),
                     "--out", uris[split], "--no-ray", "--workers", "1", "--quiet"]) == 0
    teacher = str(ROOT / "mdt_ray/assets/teacher_ss_multimodal.json")
    budget = compare.Budget(steps=3, batch_size=2, seeds=1, test_assets=16, val_assets=8)
    tasks = [compare.RunTask("final", "vm", 1, compare.DEFAULTS["vm"]),
             compare.RunTask("final", "mdt", 0, compare.DEFAULTS["mdt"], keep=True)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench = compare.load_bench(uris["train"], uris["val"], uris["test"], teacher, budget)
        lines: list[str] = []
        budget.jobs = 1
        alone = compare.run_tasks(tasks, bench, uris, teacher, budget, lines.append)
        budget.jobs = 2
        pooled = compare.run_tasks(tasks, bench, uris, teacher, budget, lines.append)
    finally:
        torch.set_num_threads(threads)
    assert [line for line in lines if "2 at a time" in line]
    for a, b in zip(alone, pooled):
        assert a["seed"] == b["seed"] and a["curve"] == b["curve"] and a["scores"] == b["scores"]
    assert alone[0]["state"] is None and pooled[0]["state"] is None
    assert alone[1]["state"].keys() == pooled[1]["state"].keys()
    assert all(torch.equal(alone[1]["state"][k], pooled[1]["state"][k]) for k in alone[1]["state"])
    # The runs trained: the student moved off the teacher.
    assert any(not torch.equal(v, bench.teacher.state_dict()[k]) for k, v in pooled[1]["state"].items())
