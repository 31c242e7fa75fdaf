"""`mdt-ray eval` on a stage-2 (SLAT) checkpoint end to end, its latency/speed-up bookkeeping,
the missing-teacher error, and a few steps of stage-2 teacher pre-training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mdt_ray.eval.latency as latency_module
from mdt_ray.cli import main as cli_main
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.eval import flat_metrics, measure_latency, speedups
from mdt_ray.eval.command import checkpoint_stage
from mdt_ray.flow import num_function_evals
from mdt_ray.models import build_model, export_trellis
from mdt_ray.stages import STUDENT_SAMPLER, get_stage

REPO = Path(__file__).resolve().parents[1]
KEYS = {"feat_mse", "fd", "nfe", "latency_s", "speedup"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-asset held-out corpus and an exported slat-tiny whose zero-initialised layers are
    perturbed (a freshly built model predicts a zero velocity, so every sampler would agree)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_slat")
    build_synthetic(str(root / "held"), 6, seed=1, progress=False, use_ray=False)
    torch.manual_seed(0)
    model = build_model("slat-tiny", resolution=32)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    json_path, _ = export_trellis(model, root / "ckpt", "slat")
    return root, json_path


def test_slat_eval_end_to_end(tiny, tmp_path, capsys):
    root, json_path = tiny
    report = tmp_path / "report.json"
    rc = cli_main(["eval", str(json_path), "--teacher", str(json_path), "--data", str(root / "held"),
                   "--assets", "6", "--steps", "1", "2", "--teacher-steps", "8", "--latency-batch", "3",
                   "--latency-repeats", "1",
                   "--threads", "1", "--out", str(tmp_path / "out"), "--json", str(report),
                   "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert rc == 0
    result = json.loads(report.read_text())
    assert set(result["steps"]) == {"1", "2"} and "render" not in result
    entries = [*result["steps"].values(), result["teacher"]]
    for entry in entries:
        assert KEYS <= set(entry), entry
        assert all(np.isfinite(entry[k]) for k in KEYS) and entry["latency_s"] > 0 and entry["feat_mse"] > 0
    assert result["steps"]["1"]["nfe"] == 1 and result["steps"]["2"]["nfe"] == 2
    # 8 of TRELLIS's stage-2 steps (guidance on [0.5, 1], rescale_t 3) keep the test short; the
    # 25-step count (44 NFE) is checked on the fake clock below.
    assert result["teacher"]["nfe"] == num_function_evals(8, 1.0, (0.5, 1.0), 3.0) > 8
    assert result["teacher"]["steps"] == 8
    teacher_latency = result["teacher"]["latency_s"]
    for entry in entries:
        assert entry["speedup"] == pytest.approx(teacher_latency / entry["latency_s"])
    s = result["settings"]
    assert s["stage"] == "slat" and s["assets"] == 6 and s["latency_batch"] == 3 and s["teacher_sampler"]["steps"] == 8
    assert s["voxels"] > s["assets"]
    # The table on stdout; what the command says about its run (no renders here) is logged on stderr.
    captured = capsys.readouterr()
    assert "feat MSE" in captured.out and "no renders" in captured.err
    assert "feat MSE" in (tmp_path / "out" / "table.txt").read_text()
    flat = flat_metrics(result)
    assert flat["eval_feat_mse_1step"] == result["steps"]["1"]["feat_mse"] and flat["eval_teacher_speedup"] == 1.0

    from mlflow.tracking import MlflowClient

    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["mlflow_run_id"]).data.metrics
    # MLflow names carry the held-out count (6 assets here).
    assert logged["eval_feat_mse_2step_6assets"] == pytest.approx(result["steps"]["2"]["feat_mse"])
    assert logged["eval_fd_1step_6assets"] == pytest.approx(result["steps"]["1"]["fd"])
    assert not any(k.startswith("eval_iou") for k in logged)


def test_slat_eval_needs_a_stage2_teacher(tiny, tmp_path, monkeypatch, capsys):
    root, json_path = tiny
    base = ["eval", str(json_path), "--data", str(root / "held"), "--assets", "2", "--steps", "1",
            "--set", "tracking.enabled=false"]
    assert cli_main([*base, "--out", str(tmp_path / "out")]) == 2
    assert "pass --teacher" in capsys.readouterr().err
    # Without --out the report would go to runs/eval/<checkpoint>-<time> under the working folder;
    # a run that fails after loading its models (here: a stage-1 teacher) leaves no folder there.
    monkeypatch.chdir(tmp_path)
    assert cli_main([*base, "--teacher", str(REPO / "mdt_ray/assets/teacher_ss_demo.json")]) == 2
    assert "not a stage-2 SLatFlowModel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert checkpoint_stage(json_path).name == "slat"


class _Clocked(torch.nn.Module):
    """A network costing a fixed time per sample on a fake clock, so the timing is exact."""

    def __init__(self, clock: list):
        super().__init__()
        self.clock = clock

    def forward(self, x, t, cond):
        self.clock[0] += 1e-3 * x.batch_size
        return x.replace(torch.zeros_like(x.feats))


def test_sparse_latency_bookkeeping(monkeypatch):
    from mdt_ray.models.sparse import SparseBatch

    clock = [0.0]
    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock[0])
    model = _Clocked(clock)
    x = SparseBatch.from_list([torch.zeros(3, 3, dtype=torch.int32), torch.ones(5, 3, dtype=torch.int32)],
                              [torch.zeros(3, 8), torch.zeros(5, 8)])
    entries = {"teacher": (model, 25, get_stage("slat").teacher_sampler), "1": (model, 1, STUDENT_SAMPLER)}
    lat = measure_latency(entries, x, torch.zeros(2, 4, 64), repeats=2)
    assert lat == pytest.approx({"teacher": 44e-3, "1": 1e-3})
    assert speedups(lat, "teacher") == pytest.approx({"teacher": 1.0, "1": 44.0})
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_latency(entries, x, torch.zeros(2, 4, 64), repeats=0)


def test_pretrain_slat_smoke(tiny, tmp_path):
    from mdt_ray import pretrain
    from mdt_ray.config import ConfigError
    from mdt_ray.models import load_trellis
    from mdt_ray.models.slat_flow import SLatFlowModel

    root, _ = tiny
    held = str(root / "held")
    cfg = pretrain.load_pretrain_config(None, [
        "train.steps=3", "train.batch_size=2", "train.log_every=1", "train.eval_assets=2",
        f"data.uri={held}", f"data.eval_uri={held}", "tracking.enabled=false"], stage="slat")
    lines = []
    summary = pretrain.pretrain(cfg, str(tmp_path), "t", eval_steps=2, log=lines.append)
    model = load_trellis(summary["json"])
    assert isinstance(model, SLatFlowModel) and model.resolution == 32
    assert sum(p.numel() for p in model.parameters()) == summary["params"] and np.isfinite(summary["final_loss"])
    assert {"guided_feat_mse", "guided_fd", "unguided_feat_mse"} <= set(summary["eval"])
    assert any("step 3/3" in line for line in lines)
    with pytest.raises(ConfigError, match="model.stage"):
        pretrain.load_pretrain_config(None, ["model.stage=ss"], stage="slat")
