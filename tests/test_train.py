"""The distillation job on a real local Ray cluster: S3 corpus and checkpoints (moto on loopback),
fault recovery, resume, the non-finite guard, MLflow, and the demo config end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from mdt_ray.config import load_config
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.models import load_trellis
from mdt_ray.train.launch import RunError, distill
from mdt_ray.train.state import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _mlflow(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    build_synthetic(str(root / "train"), 48, seed=0, progress=False)
    build_synthetic(str(root / "eval"), 16, seed=1, progress=False)
    return root


def _cfg(tmp_path, corpus, *sets):
    return load_config(REPO / "jobs/configs/demo.yaml", [
        f"data.uri={corpus}/train", f"data.eval_uri={corpus}/eval", "model.teacher=ss-tiny",
        "train.batch_size=4", "train.log_every=2", "train.eval_assets=8", "train.eval_steps=[1]",
        f"run.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *sets])


def test_two_workers_s3_corpus_and_s3_checkpoints(ray_local, s3_server, s3_bucket, tmp_path):
    build_synthetic(f"s3://{s3_bucket}/corpus", 40, seed=0, progress=False)
    cfg = load_config(REPO / "jobs/configs/demo.yaml", [
        f"data.uri=s3://{s3_bucket}/corpus", "data.eval_uri=null", "model.teacher=ss-tiny",
        "scale.num_workers=2", "scale.cpus_per_worker=0.5", "train.steps=6", "train.batch_size=4",
        "train.checkpoint_every=3", "train.log_every=3", "run.name=s3run",
        f"run.storage_path=s3://{s3_bucket}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    out = distill(cfg)
    assert out.metrics["step"] == 6
    assert out.checkpoint.startswith(f"{s3_bucket}/runs/s3run/checkpoint_00000006")

    from mdt_ray.data.storage import StorageTarget

    fs, _ = StorageTarget(f"s3://{s3_bucket}").pyarrow_fs()
    local = tmp_path / "ckpt"
    pafs.copy_files(out.checkpoint, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    state = load_checkpoint(local)
    assert state["meta"]["step"] == 6 and state["meta"]["mlflow_run_id"] == out.mlflow_run_id
    assert state["meta"]["world_size"] == 2
    student = load_trellis(local / "trellis" / "s3run_student.json")
    assert torch.equal(student.state_dict()["out_layer.weight"], state["ema"]["out_layer.weight"])
    run = _mlflow(f"sqlite:///{tmp_path}/mlflow.db").get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.lambda_vd"] == "1.0" and run.data.params["scale.num_workers"] == "2"
    for key in ("loss", "loss_vm", "loss_vd", "lr", "grad_norm", "assets_per_s_per_worker"):
        assert key in run.data.metrics, key


def test_worker_failure_recovers_from_last_checkpoint(ray_local, local_corpus, tmp_path):
    cfg = _cfg(tmp_path, local_corpus, "scale.num_workers=2", "train.steps=8", "train.checkpoint_every=4",
               "run.inject_failure_at_step=6", "run.max_failures=1", "run.name=chaos")
    out = distill(cfg)
    assert out.metrics["step"] == 8
    state = load_checkpoint(out.checkpoint)
    assert state["meta"]["step"] == 8
    # The optimizer's step counter proves steps 5-8 ran once after the restore from step 4:
    # a restart from scratch, or a replay of steps, would leave a different count.
    steps = [float(v) for k, v in state["optimizer"].items() if k.endswith(".step")]
    assert steps and all(s == 8 for s in steps)


def test_resume_continues_run_and_refuses_accidental_reuse(ray_local, local_corpus, tmp_path):
    cfg = _cfg(tmp_path, local_corpus, "scale.num_workers=1", "train.steps=4", "train.checkpoint_every=2",
               "run.name=resumable")
    first = distill(cfg)
    assert first.metrics["step"] == 4
    with pytest.raises(RunError, match="--resume"):
        distill(cfg)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 6})})
    second = distill(longer, resume=True)
    assert second.metrics["step"] == 6 and second.mlflow_run_id == first.mlflow_run_id
    steps = [float(v) for k, v in load_checkpoint(second.checkpoint)["optimizer"].items() if k.endswith(".step")]
    assert all(s == 6 for s in steps)
    history = _mlflow(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(first.mlflow_run_id, "loss")
    assert sorted({m.step for m in history}) == [2, 4, 6]


def test_nonfinite_loss_stops_with_diagnostic_and_keeps_last_good_checkpoint(ray_local, local_corpus, tmp_path):
    cfg = _cfg(tmp_path, local_corpus, "scale.num_workers=1", "train.steps=2", "train.checkpoint_every=2",
               "run.name=nanrun")
    good = distill(cfg)
    # A guidance scale this large overflows the teacher's guided velocity to inf.
    bad = load_config(REPO / "jobs/configs/demo.yaml", [f"{k}={json.dumps(v)}" for k, v in cfg.flat().items()]
                      + ["train.steps=6", "distill.cfg_vm=1e38", "distill.cfg_vd=1e38"])
    with pytest.raises(RunError, match="non-finite loss at step 2"):
        distill(bad, resume=True)
    runs = Path(cfg.run.storage_path) / "nanrun"
    ckpts = sorted(p.name for p in runs.glob("checkpoint_0*"))
    assert ckpts == ["checkpoint_00000002"]
    assert load_checkpoint(good.checkpoint)["meta"]["step"] == 2


def test_demo_config_end_to_end_through_the_job_script(local_corpus, tmp_path):
    """`jobs/distill.py --config jobs/configs/demo.yaml` as a user runs it (its own local Ray)."""
    env_sets = [f"data.uri={local_corpus}/train", f"data.eval_uri={local_corpus}/eval", "train.steps=4",
                "train.checkpoint_every=2", "train.eval_assets=8", f"run.storage_path={tmp_path}/runs",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    cmd = [sys.executable, str(REPO / "jobs/distill.py"), "--config", str(REPO / "jobs/configs/demo.yaml")]
    for s in env_sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[mdt-ray] step 4/4" in proc.stdout + proc.stderr
    assert (tmp_path / "runs" / "mdt-demo" / "checkpoint_00000004" / "trellis" / "mdt-demo_student.safetensors").is_file()


def test_tiny_stage2_distillation_through_ray_train(ray_local, local_corpus, tmp_path):
    cfg = _cfg(tmp_path, local_corpus, "model.stage=slat", "model.teacher=slat-tiny", "scale.num_workers=2",
               "train.steps=4", "train.batch_size=4", "train.batch_split=2", "train.checkpoint_every=4",
               "train.eval_steps=[1, 2]", "run.name=slat")
    out = distill(cfg)
    assert out.metrics["step"] == 4
    assert {"loss_vm", "loss_vd", "eval_feat_mse_1step", "eval_feat_mse_2step", "eval_fd_1step"} <= set(out.metrics)
    assert out.metrics["eval_fd_1step"] >= 0
    student = load_trellis(Path(out.checkpoint) / "trellis" / "slat_student.json")
    assert type(student).__name__ == "SLatFlowModel"


def test_stage_and_teacher_mismatch_is_named(ray_local, local_corpus, tmp_path):
    cfg = _cfg(tmp_path, local_corpus, "model.stage=slat", "model.teacher=ss-tiny", "run.name=mismatch")
    with pytest.raises(RunError, match="model.stage"):
        distill(cfg)
