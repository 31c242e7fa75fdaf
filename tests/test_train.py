"""The distillation job on a real local Ray cluster: S3 corpus and checkpoints (moto on loopback),
resume (also past a damaged latest checkpoint), the non-finite loss and weight
guards, a deterministic worker error ending the run without a retry, the batch watchdog, MLflow,
and the demo config end to end."""

import json
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
    # What MLflow users expect of a run: context tags, the resolved config, system metrics per
    # node, and the student in the model registry (its safetensors export, no pickle).
    client = _mlflow(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"]
    assert load_config(client.download_artifacts(out.mlflow_run_id, "config.yaml")).run.name == "s3run"
    assert any(k.startswith("system/") and "node0" in k for k in run.data.metrics), sorted(run.data.metrics)
    versions = client.search_model_versions(f"run_id = '{out.mlflow_run_id}'")
    assert len(versions) == 1 and versions[0].name.endswith("-ss-student")  # <experiment>-<stage>-student
    assert versions[0].source.endswith("/student")
    exported = Path(client.download_artifacts(out.mlflow_run_id, "student"))
    assert sorted(p.suffix for p in exported.iterdir()) == [".json", ".safetensors"]


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

    # Ray's latest checkpoint cut short (as by a kill during its upload): the resume takes the
    # newest complete one instead, never step 0, and writes step 6 again under a new name.
    runs = Path(cfg.run.storage_path) / "resumable"
    student = runs / "checkpoint_00000006" / "student.safetensors"
    student.write_bytes(student.read_bytes()[:1000])
    third = distill(longer.model_copy(update={"train": cfg.train.model_copy(update={"steps": 8})}), resume=True)
    assert third.metrics["step"] == 8
    steps = [float(v) for k, v in load_checkpoint(third.checkpoint)["optimizer"].items() if k.endswith(".step")]
    assert all(s == 8 for s in steps)
    names = {p.name for p in runs.glob("checkpoint_*")}
    assert "checkpoint_00000006.1" in names and not names & {"checkpoint_00000002.1", "checkpoint_00000004.1"}
    assert load_checkpoint(runs / "checkpoint_00000006.1")["meta"]["step"] == 6


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


def _finite_outputs(checkpoint: Path) -> bool:
    from mdt_ray.models import build_model

    state = load_checkpoint(checkpoint)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 8, 16, 16, 16, generator=g), torch.randn(2, 64, 64, generator=g)
    ok = True
    for weights in (state["student"], state["ema"]):
        net = build_model("ss-tiny")
        assert not net.load_state_dict(weights, strict=False).unexpected_keys  # the EMA holds no buffers
        with torch.no_grad():
            ok &= bool(torch.isfinite(net(x, torch.full((2,), 500.0), cond)).all())
    return ok


@pytest.mark.parametrize("sets, what", [
    # Adam moves every weight by ~lr: finite weights whose outputs overflow (the case).
    (["train.lr=10", "train.grad_clip=null"], r"non-finite (outputs|weights|loss)"),
    # AdamW's decoupled decay multiplies the weights by (1 - lr·weight_decay) ≈ -3e41: inf and NaN.
    # Slow: tests/test_engine.py checks the detection itself; this adds the path through Ray.
    pytest.param(["train.weight_decay=1e45"],
                 r"non-finite weights after the update at step 0.*lower train.weight_decay", marks=pytest.mark.slow),
], ids=["huge-lr", "overflowing-decay"])
def test_nonfinite_weights_stop_before_any_checkpoint_holds_them(ray_local, local_corpus, tmp_path, sets, what):
    cfg = _cfg(tmp_path, local_corpus, "scale.num_workers=1", "train.steps=6", "train.checkpoint_every=1",
               "train.log_every=1", "data.eval_uri=null", "run.name=blowup", *sets)
    with pytest.raises(RunError, match=what):
        distill(cfg)
    ckpts = sorted((Path(cfg.run.storage_path) / "blowup").glob("checkpoint_0*"))
    assert len(ckpts) < 6
    assert all(_finite_outputs(c) for c in ckpts), [c.name for c in ckpts]


def _poison_one_row(shard: Path) -> str:
    """A NaN in one stored latent, footer and row count intact: found only when its batch decodes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(shard)
    idx = table.schema.get_field_index("ss_latent")
    col = table.column(idx).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).copy()
    values[col.type.list_size * 3] = np.nan
    poisoned = pa.FixedSizeListArray.from_arrays(pa.array(values, type=col.type.value_type), col.type.list_size)
    pq.write_table(table.set_column(idx, table.schema.field(idx), poisoned), shard)
    return table.column("asset_id")[3].as_py()


def test_a_deterministic_worker_error_is_not_retried(ray_local, tmp_path):
    from mdt_ray.train.launch import Tracking, launch
    from mdt_ray.train.loop import DeterministicFailure, StopOnDeterministicError

    build_synthetic(str(tmp_path / "corpus"), 16, seed=0, progress=False)
    shard = sorted((tmp_path / "corpus").glob("*.parquet"))[0]
    bad_id = _poison_one_row(shard)
    cfg = _cfg(tmp_path, tmp_path, f"data.uri={tmp_path}/corpus", "data.eval_uri=null", "scale.num_workers=1",
               "train.steps=8", "train.checkpoint_every=100", "run.max_failures=2", "run.name=poisoned")
    with pytest.raises(RunError, match=rf"asset '{bad_id}'.*NaN or inf.*not retried") as info:
        launch(cfg, resume=False, tracking=Tracking.of(cfg), callbacks=[StopOnDeterministicError()])
    # Raised by the controller at the first failure, before its failure policy could retry.
    assert isinstance(getattr(info.value.__cause__, "controller_failure", None), DeterministicFailure)


def test_a_worker_that_waits_too_long_for_a_batch_says_where(ray_local, local_corpus, tmp_path):
    # No first batch of a Ray Data pipeline arrives within 10 ms: the watchdog fires in Ray's worker.
    cfg = _cfg(tmp_path, local_corpus, "scale.num_workers=1", "train.steps=2", "train.batch_timeout_s=0.01",
               "data.eval_uri=null", "run.max_failures=0", "run.name=stalled")
    with pytest.raises(RunError, match=r"BatchTimeoutError: .*no batch of 4 arrived for 0.01 s "
                                       r"\(train.batch_timeout_s\).*the first batch of epoch 0.*rank 0 of 1; "
                                       r"[\d.]+ of the cluster's [\d.]+ CPUs are free"):
        distill(cfg)


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
