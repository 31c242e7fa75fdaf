"""`mdt-ray eval` end to end on a tiny stage-1 checkpoint, the latency/speed-up bookkeeping of
mdt_ray.eval, and the checkpoint resolution of the command (hand-made metric cases live in
tests/test_metrics.py; stage 2 in tests/test_eval_slat.py)."""

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mdt_ray.eval.latency as latency_module
from mdt_ray.cli.eval import add_arguments as add_eval_arguments
from mdt_ray.cli.eval import main as eval_main
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.eval import flat_metrics, format_table, grid_size, measure_latency, nfe_ratios, sampler_nfe, speedups
from mdt_ray.models import build_model, export_trellis
from mdt_ray.models.teachers import PACKAGED_TEACHER, build_teacher, resolve_model_path, run_teacher_of
from mdt_ray.stages import STUDENT_SAMPLER, get_stage

TEACHER_SAMPLER = get_stage("ss").teacher_sampler

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"fd", "iou", "cov", "mmd", "nna", "latency_s", "speedup", "nfe"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16-asset held-out corpus and an exported ss-tiny model whose zero-initialised layers are
    perturbed, so that it predicts a non-zero velocity field (a freshly built model predicts 0)."""
    root = tmp_path_factory.mktemp("eval")
    build_synthetic(str(root / "held"), 16, seed=1, progress=False)
    json_path, _ = export_trellis(build_teacher("ss-tiny", seed=0), root / "ckpt", "tiny")
    return root, json_path


def _args(root, json_path, *extra):
    return [str(json_path), "--teacher", str(json_path), "--data", str(root / "held"), "--assets", "16",
            "--latency-batch", "4", "--latency-repeats", "1", "--threads", "1",
            "--set", f"tracking.uri=sqlite:///{root}/mlflow.db", *extra]


def test_eval_end_to_end_writes_json_png_and_mlflow(tiny, tmp_path):
    root, json_path = tiny
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = eval_main(_args(root, json_path, "--steps", "1", "2", "--out", str(out), "--json", str(report)))
    assert rc == 0
    result = json.loads(report.read_text())
    assert set(result["steps"]) == {"1", "2"}
    for entry in [*result["steps"].values(), result["teacher"]]:
        assert METRIC_KEYS <= set(entry), entry
        assert all(np.isfinite(entry[k]) for k in METRIC_KEYS)
        assert 0.0 <= entry["iou"] <= 1.0 and 0.0 <= entry["nna"] <= 1.0 and entry["latency_s"] > 0
    assert result["steps"]["1"]["nfe"] == 1 and result["steps"]["2"]["nfe"] == 2
    # TRELLIS's stage-1 sampler: 25 steps, guidance on [0.5, 1] with rescale_t 3 -> 19 guided steps.
    assert result["teacher"]["nfe"] == 44 and result["teacher"]["speedup"] == pytest.approx(1.0)
    assert result["settings"]["assets"] == 16 and result["settings"]["stage"] == "ss"

    from PIL import Image

    png = out / "renders.png"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        # rows: ground truth, teacher, 1 step, 2 steps; columns: the first 8 assets
        assert img.format == "PNG" and img.size == grid_size(4, 8)
    assert (out / "eval.json").is_file() and "teacher 25" in (out / "table.txt").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(result["mlflow_run_id"])
    # Named with the held-out count: the in-training eval's eval_fd_1step is of train.eval_assets.
    assert run.data.metrics["eval_fd_1step_16assets"] == pytest.approx(result["steps"]["1"]["fd"])
    assert run.data.metrics["eval_teacher_speedup_16assets"] == pytest.approx(1.0)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {
        "eval/eval.json", "eval/renders.png", "eval/table.txt"}


def test_evaluate_without_teacher_reports_progress_and_checks_stages(tiny, monkeypatch):
    from mdt_ray.eval import evaluate, format_table
    from mdt_ray.eval import report as report_module
    from mdt_ray.models import load_trellis

    root, json_path = tiny
    split = get_stage("ss").load(str(root / "held"), limit=6)
    model = load_trellis(json_path)
    monkeypatch.setattr(report_module, "PROGRESS_EVERY_S", 0.0)
    lines = []
    # A budget of 0 s stops the latency timing after its one obligatory round, of the 3 allowed.
    result = evaluate(model, split, steps=(2,), batch_size=2, latency_batch=2, latency_repeats=3,
                      latency_budget_s=0.0, log=lines.append)
    # Without a terminal: the share of the sampler's network evaluations done with the elapsed
    # time and an ETA, after every call but the last (3 batches of 2 steps), then its scores.
    progress = [re.sub(r"\(\d+s, ETA \d+:\d\d:\d\d\)", "(Ts, ETA h:mm:ss)", line) for line in lines if "%" in line]
    assert progress == [f"[eval] 2 step(s): {p} % (Ts, ETA h:mm:ss)" for p in (17, 33, 50, 67, 83)]
    scores = lines.index(next(line for line in lines if line.startswith("[eval] 2 step(s): fd=")))
    assert scores == len(progress)
    # The latency timing states its budget, then gives a line per sampler with its rounds.
    assert lines[scores + 1:] == ["[eval] latency: timing 1 sampler(s) on a batch of 2, up to 3 round(s), budget 0 s",
                                  lines[-1]]
    assert re.fullmatch(r"\[eval\] latency: 2 step\(s\): [\d.]+ ms/sample, median of 1 round\(s\) of 1 call\(s\)",
                        lines[-1])
    assert result["steps"]["2"]["latency_rounds"] == result["settings"]["latency_rounds"] == 1
    assert result["settings"]["latency_budget_s"] == 0.0
    assert "ms/sample: the median of 1 timed round(s) per sampler, batch 2" in format_table(result)
    assert result["teacher"] is None and "speedup" not in result["steps"]["2"] and "render" not in result
    assert result["settings"]["stage"] == "ss" and "voxels" not in result["settings"]
    assert result["settings"]["teacher_sampler"] is None and result["steps"]["2"]["nfe"] == 2
    assert "checkpoint 2 steps" in format_table(result)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    # On a terminal: a tqdm bar over the sampler's Euler steps of every batch, no progress lines.
    monkeypatch.setattr(sys, "stderr", Terminal())
    lines.clear()
    evaluate(model, split, steps=(2,), batch_size=2, latency_batch=2, latency_repeats=1, log=lines.append)
    assert "[eval] 2 step(s)" in sys.stderr.getvalue() and "/6 " in sys.stderr.getvalue()
    assert not any("%" in line for line in lines) and lines[0].startswith("[eval] 2 step(s): fd=")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="the teacher is a SLatFlowModel, not a stage-1 SparseStructureFlowModel"):
        evaluate(model, split, teacher=build_model("slat-tiny"), steps=(1,))
    with pytest.raises(ValueError, match="at least 2 assets"):
        evaluate(model, split.head(1), steps=(1,))


class _Clocked(torch.nn.Module):
    """A network whose cost is a fixed time per input row, paid on a fake clock: the bookkeeping
    is checked exactly, whatever else the machine is doing."""

    def __init__(self, clock: list, per_row_s: float):
        super().__init__()
        self.clock, self.per_row_s, self.rows = clock, per_row_s, 0

    def forward(self, x, t, cond):
        self.rows += x.shape[0]
        self.clock[0] += self.per_row_s * x.shape[0]
        return torch.zeros_like(x)


def test_latency_and_speedup_bookkeeping(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock[0])
    model = _Clocked(clock, 1e-3)
    cond, noise = torch.zeros(2, 4, 8), torch.randn(2, 1, 4, 4, 4)
    entries = {"teacher": (model, 25, TEACHER_SAMPLER), "1": (model, 1, STUDENT_SAMPLER),
               "2": (model, 2, STUDENT_SAMPLER)}
    lat = measure_latency(entries, noise, cond, repeats=2)
    # Per sample: the teacher runs 44 rows for each of its inputs (19 guided steps twice, 6 once).
    assert lat == pytest.approx({"teacher": 44e-3, "1": 1e-3, "2": 2e-3})
    # A warm-up call each, then two rounds in which every entry samples (a batch of 2) as often as it
    # takes to last as long as the teacher's one call: 44 one-step and 22 two-step calls.
    assert model.rows == 2 * (44 + 1 + 2) + 2 * 2 * (44 + 44 * 1 + 22 * 2)
    assert nfe_ratios(entries, "teacher") == pytest.approx({"teacher": 1.0, "1": 44.0, "2": 22.0})
    ups = speedups(lat, "teacher")
    assert ups == pytest.approx({"teacher": 1.0, "1": 44.0, "2": 22.0})
    assert sampler_nfe(25, TEACHER_SAMPLER) == 44
    with pytest.raises(KeyError, match="reference 'nope'"):
        speedups(lat, "nope")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_latency(entries, noise, cond, repeats=0)

    # The median round counts: a round slowed by other work does not inflate the estimate.
    slow_once = {"n": 0}

    def jittery(x, t, c):
        slow_once["n"] += 1
        clock[0] += 1e-3 * x.shape[0] + (0.5 if slow_once["n"] == 2 else 0.0)
        return torch.zeros_like(x)

    lat2 = measure_latency({"1": (jittery, 1, STUDENT_SAMPLER)}, noise, cond, repeats=3)
    assert lat2["1"] == pytest.approx(1e-3)

    flat = flat_metrics({"steps": {"1": {"fd": 2.0, "speedup": 40.0}}, "teacher": {"fd": 1.0, "steps": 25},
                         "settings": {"stage": "ss"}})
    assert flat == {"eval_fd_1step": 2.0, "eval_speedup_1step": 40.0, "eval_teacher_fd": 1.0}
    with pytest.raises(ValueError, match="settings.stage"):
        flat_metrics({"steps": {}, "teacher": None})


def test_a_latency_budget_bounds_the_rounds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock[0])
    model = _Clocked(clock, 1e-3)
    cond, noise = torch.zeros(2, 4, 8), torch.randn(2, 1, 4, 4, 4)
    entries = {"teacher": (model, 25, TEACHER_SAMPLER), "1": (model, 1, STUDENT_SAMPLER)}
    # On the fake clock the warm-up takes 0.09 s (88 + 2 ms) and a round 0.176 s (88 ms for the
    # teacher's call, 44 one-step calls of 2 ms): a budget of 0.5 s fits two rounds of the five.
    lines = []
    lat = measure_latency(entries, noise, cond, repeats=5, budget_s=0.5, log=lines.append)
    assert lat.rounds == 2 and lat.calls == {"teacher": 1, "1": 44}
    assert model.rows == 2 * (44 + 1) + 2 * 2 * (44 + 44)
    assert lat == pytest.approx({"teacher": 44e-3, "1": 1e-3})
    assert lines == ["latency: round 1 of 2 (0s, ETA 0:00:00)"]
    # However small the budget, one round after the warm-up is timed; without one, every repeat.
    model.rows = 0
    assert measure_latency(entries, noise, cond, repeats=5, budget_s=0.0).rounds == 1
    assert model.rows == 2 * (44 + 1) + 2 * (44 + 44)
    assert measure_latency(entries, noise, cond, repeats=5).rounds == 5
    with pytest.raises(ValueError, match="budget must be >= 0"):
        measure_latency(entries, noise, cond, budget_s=-1.0)


def test_eval_cli_states_the_latency_budget(capsys):
    from mdt_ray.eval.report import LATENCY_BUDGET_S

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    # The parser writes the default out (its module loads no torch): it must be the library's.
    assert parser.parse_args(["ckpt.json"]).latency_budget == LATENCY_BUDGET_S
    parser.print_help()
    assert "--latency-budget SECONDS" in capsys.readouterr().out


def test_cli_resolves_run_checkpoints_and_reports_errors(tiny, tmp_path, capsys):
    from mdt_ray.cli import main as cli_main

    root, json_path = tiny
    # A run dir as the distillation job leaves it: checkpoint_*/trellis/<name>.json + state.json
    # naming the teacher; the latest checkpoint is picked and its teacher used.
    run = tmp_path / "runs" / "r1"
    for step in (2, 4):
        ck = run / f"checkpoint_{step:08d}"
        export_trellis(build_model("ss-tiny"), ck / "trellis", f"r1_student_{step}")
        (ck / "state.json").write_text(json.dumps({"config": {"model": {"teacher": str(json_path)}}}))
    resolved = resolve_model_path(run)
    assert resolved.name == "r1_student_4.json"
    assert run_teacher_of(resolved) == str(json_path)

    report = tmp_path / "r.json"
    rc = cli_main(["eval", str(run), "--data", str(root / "held"), "--assets", "8", "--steps", "1",
                   "--teacher-steps", "2", "--latency-repeats", "1", "--threads", "1", "--json", str(report),
                   "--out", str(tmp_path / "out"), "--set", "tracking.enabled=false"])
    assert rc == 0
    result = json.loads(report.read_text())
    assert result["checkpoint"].endswith("r1_student_4.json") and result["teacher_checkpoint"] == str(json_path)
    assert "checkpoint 1 step" in capsys.readouterr().out

    # What the user must fix is one line and exit status 2 (mdt_ray/cli/_common.py).
    assert cli_main(["eval", str(tmp_path / "missing"), "--data", str(root / "held")]) == 2
    assert "mdt-ray eval: error: checkpoint not found" in capsys.readouterr().err
    assert cli_main(["eval", str(json_path), "--data", str(root / "held"), "--teacher", "ss-demo"]) == 2
    assert "without trained weights" in capsys.readouterr().err
    assert cli_main(["eval", str(json_path), "--set", "tracking.enabled=false"]) == 2
    assert "no held-out corpus" in capsys.readouterr().err


def test_packaged_teacher_resolves_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_model_path(PACKAGED_TEACHER)
    assert path.is_file() and path.with_suffix(".safetensors").is_file()


def test_job_entry_point_runs():
    out = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--teacher" in out.stdout


def test_pretrain_teacher_trains_exports_and_scores(tiny, tmp_path):
    from mdt_ray import pretrain
    from mdt_ray.config import ConfigError
    from mdt_ray.models import load_trellis

    root, _ = tiny
    cfg = pretrain.load_pretrain_config(None, [
        "model.teacher=ss-tiny", "train.steps=6", "train.batch_size=4", "train.log_every=3", "train.eval_assets=8",
        f"data.uri={root / 'held'}", f"data.eval_uri={root / 'held'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    lines = []
    summary = pretrain.pretrain(cfg, str(tmp_path / "out"), "t", eval_steps=2, log=lines.append)
    model = load_trellis(summary["json"])
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    assert np.isfinite(summary["final_loss"]) and summary["eval"]["assets"] == 8
    assert {"guided_fd", "unguided_iou", "guided_nna"} <= set(summary["eval"])
    assert any("step 6/6" in line for line in lines)
    # The learning rate warms up from near 0 and ends at FINAL_LR_FRAC of the base.
    assert pretrain.lr_at(0, 100, 1.0) < 0.5 and pretrain.lr_at(99, 100, 1.0) == pytest.approx(
        pretrain.FINAL_LR_FRAC, abs=1e-3)
    with pytest.raises(ConfigError, match="distill.method"):
        pretrain.load_pretrain_config(None, ["distill.method=mdt"])


def test_bench_command_lists_runs_and_rejects(capsys):
    from mdt_ray.cli import main as cli_main

    assert cli_main(["bench", "--list"]) == 0
    assert "quality" in capsys.readouterr().out
    assert cli_main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark 'no_such_bench'" in capsys.readouterr().err
    # Arguments after the name reach the script itself.
    assert cli_main(["bench", "quality", "--no-such-flag"]) == 2


def test_a_speedup_above_the_nfe_ratio_is_flagged_in_the_table():
    result = {"settings": {"stage": "ss", "teacher_sampler": {"cfg_strength": 3.0}},
              "teacher": {"nfe": 44, "steps": 25, "latency_s": 0.44, "speedup": 1.0},
              "steps": {"1": {"nfe": 1, "latency_s": 0.008, "speedup": 55.0, "speedup_suspect": True},
                        "2": {"nfe": 2, "latency_s": 0.021, "speedup": 21.0, "speedup_suspect": False}}}
    table = format_table(result)
    assert "55.0?" in table and "21.0x" in table
    assert table.splitlines()[-1].startswith("? a speed-up above the ratio of network evaluations")
    del result["steps"]["1"]
    assert "?" not in format_table(result)
