"""The benchmark scripts end to end, as `./scripts/test.sh -m slow` runs them (skipped by the default
test command). Each runs at a smoke size through `mdt-ray bench` and its JSON must hold sane
ratios: what it prints is what README and docs/benchmark.md quote."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def bench(tmp_path: Path, name: str, *args: str, timeout: int) -> dict:
    out_json = tmp_path / f"{name}.json"
    out = subprocess.run([sys.executable, "-m", "mdt_ray", "bench", name, *args, "--json", str(out_json)],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out_json.read_text())


def test_objective_cost_counts_the_passes_of_an_mdt_step(tmp_path):
    res = bench(tmp_path, "objective_cost", "--model", "ss-tiny", "--batch", "2", "--repeats", "5", timeout=900)
    # VM + VD runs ~7 forward passes without grad and 2 with grad (their backward ≈ 4 more): an
    # MDT-dist step is well above a plain flow-matching step and near the ~13-pass floor. The
    # bounds are loose because a tiny model on a shared machine times noisily.
    assert 3.0 < res["mdt_over_forward"] < 100.0, res
    assert res["mdt_over_fm_step"] > 1.5, res
    assert res["fm_step_s"] > res["forward_s"] > 0, res


def test_quality_quick_scores_the_student_and_the_teacher(tmp_path):
    res = bench(tmp_path, "quality", "--quick", "--methods", "mdt", timeout=3600)
    assert set(res["methods"]) == {"mdt"}
    for k in ("25", "2", "1"):
        assert math.isfinite(res["teacher"][k]["fd"]) and res["teacher"][k]["fd"] > 0, res["teacher"][k]
    for k in ("1", "2"):
        entry = res["methods"]["mdt"][k]
        assert math.isfinite(entry["fd"]) and entry["fd"] > 0, entry
        assert 0.0 <= entry["iou"] <= 1.0, entry
        # One or two student steps against the teacher's 25 guided ones: a large speed-up.
        assert entry["speedup"] > 3.0, entry
    assert res["methods"]["mdt"]["1"]["speedup"] > res["methods"]["mdt"]["2"]["speedup"]
