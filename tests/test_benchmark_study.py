"""The students study (benchmarks/students.py): one run's budget curve, diagnostics and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TEACHER = str(ROOT / "mdt_ray/assets/teacher_ss_multimodal.json")
# Each study run scores its student on the exact metrics at every eval step: 14 min for the three
# tests on a loaded 2-core machine, so under `slow`; the objective (`traj`) and the diagnostics
# are tested in the default suite (test_objectives.py, test_engine.py).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from mdt_ray.benchmark import compare
    from mdt_ray.cli import main

    root = tmp_path_factory.mktemp("study")
    uris = {}
    for split, n, seed in (("train", 16, 0), ("val", 4, 1), ("test", 8, 2)):
        uris[split] = str(root / split)
        assert main(["corpus", "build", "--kind", "multimodal", "--num-assets", str(n), "--seed", str(seed),
                     "--out", uris[split], "--no-ray", "--workers", "1", "--quiet"]) == 0
    return compare.load_bench(uris["train"], uris["val"], uris["test"], TEACHER,
                              compare.Budget(test_assets=8, val_assets=4))


def test_a_study_run_scores_every_eval_step_and_logs_what_the_loss_sees(bench):
    from mdt_ray.benchmark.study import study_run

    lines: list[str] = []
    kept: list[dict] = []
    a = study_run(bench, "mdt", teacher="exact", steps=4, seed=0, eval_at=[2, 99], batch_size=2, log_every=2,
                  log=lines.append, on_eval=kept.append)
    # Scored at 2 and at the end (99 is past the run), at 1, 2 and 4 sampler steps each.
    assert set(a["evals"]) == {"2", "4"} and all(set(e) == {"1", "2", "4"} for e in a["evals"].values())
    # What was measured is handed out after each score: the first time marked partial.
    assert [set(k["evals"]) for k in kept] == [{"2"}, {"2", "4"}]
    assert kept[0]["partial"] == "stopped at step 2 of 4" and "partial" not in kept[1] and "partial" not in a
    assert len(lines) == 2 and "ETA" in lines[0]
    row = a["curve"][-1]
    assert row["step"] == 4
    for key in ("diag_grad_vm", "diag_grad_vd", "diag_resid_vm", "diag_resid_vd", "diag_correction_vm"):
        assert row[key] > 0, key
    # With d_norm on (COMMON), the correction t·D̂ is below 1/√elements per sample per element.
    assert row["diag_correction_vm"] < 1 / (8 * 16 ** 3) ** 0.5
    assert a["settings"]["distill.d_norm"] is True and a["weights"] == "the trained weights (no EMA)"
    # One seed, one result; the exact and the learned teacher are different targets.
    again = study_run(bench, "mdt", teacher="exact", steps=4, seed=0, eval_at=[2], batch_size=2, log_every=2,
                      log=lines.append)
    assert again["curve"] == a["curve"] and again["evals"] == a["evals"]
    learned = study_run(bench, "mdt", teacher="learned", steps=4, seed=0, eval_at=[], batch_size=2, log_every=2,
                        log=lines.append)
    assert learned["curve"][-1]["loss"] != a["curve"][-1]["loss"]
    with pytest.raises(ValueError, match="unknown recipe"):
        study_run(bench, "mdt-typo", teacher="exact", steps=1, seed=0)
    with pytest.raises(ValueError, match="teacher must be"):
        study_run(bench, "mdt", teacher="oracle", steps=1, seed=0)


def test_the_ceiling_recipe_trains_by_trajectory_regression(bench):
    """The ceiling recipe is the `traj` objective (its target is tested in test_objectives.py)."""
    from mdt_ray.benchmark.study import study_run

    out = study_run(bench, "ceiling", teacher="exact", steps=6, seed=0, eval_at=[], batch_size=2, log_every=1,
                    log=lambda _line: None)
    assert [c["loss_traj"] for c in out["curve"]] and all(torch.isfinite(torch.tensor(c["loss"])) for c in out["curve"])
    assert out["settings"]["distill.method"] == "traj"


def test_the_report_writes_tables_and_figures_from_the_run_files(bench, tmp_path):
    from mdt_ray.benchmark.study import run_file, study_run

    for seed in (0, 1):
        result = study_run(bench, "vm", teacher="exact", steps=2, seed=seed, eval_at=[1], batch_size=2, log_every=1,
                           log=lambda _line: None)
        run_file(tmp_path, "vm", "exact", seed).write_text(json.dumps(result))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/students.py"), "report", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tables = (tmp_path / "tables.md").read_text()
    assert "| vm | exact | 2 | 2 |" in tables and "| vm | exact | 1 | 2 |" in tables
    assert (tmp_path / "budget.png").stat().st_size > 0 and (tmp_path / "diagnostics.png").stat().st_size > 0
    empty = subprocess.run([sys.executable, str(ROOT / "benchmarks/students.py"), "report", "--out",
                            str(tmp_path / "none")], capture_output=True, text=True, timeout=600)
    assert empty.returncode == 2 and "no run files" in empty.stderr
