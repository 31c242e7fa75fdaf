"""Checkpoints uploaded in Ray Train's background thread (train.async_upload, Ray 2.60's
CheckpointUploadMode.ASYNC) on a real local Ray cluster: a run to the loopback S3 server ends
with every checkpoint complete, every report delivered in order, no scratch copy left, and
resumes from its last one; an upload that fails keeps the last good checkpoint, and the run
restarts from it."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mdt_ray.config import load_config
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.train.launch import distill
from mdt_ray.train.state import STATE_FILE, RunDir, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    build_synthetic(str(root / "train"), 32, seed=0, progress=False)
    return root / "train"


def _cfg(tmp_path, corpus, name, *sets):
    return load_config(REPO / "jobs/configs/demo.yaml", [
        f"data.uri={corpus}", "data.eval_uri=null", "model.teacher=ss-tiny", "scale.num_workers=1",
        "train.batch_size=4", "train.log_every=1", f"run.name={name}", f"run.storage_path={tmp_path}/runs",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *sets])


def _steps_of(state: dict) -> set[float]:
    return {float(v) for k, v in state["optimizer"].items() if k.endswith(".step")}


def _scratch_copies_of(run_name: str) -> list[Path]:
    """Scratch checkpoint directories (this machine's temp dir) that hold a checkpoint of `run_name`."""
    found = []
    for d in Path(tempfile.gettempdir()).glob("mdt-ckpt-*"):
        try:
            meta = json.loads((d / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if meta.get("config", {}).get("run", {}).get("name") == run_name:
            found.append(d)
    return found


# Two runs (~80 s at load 7-10). In the default suite, async uploads (the default) run in
# test_train.py's S3 and resume tests and in faults/test_determinism.py (async vs inline, bit-identical).
@pytest.mark.slow
def test_async_checkpoints_to_s3_are_complete_reported_in_order_and_resume(ray_local, s3_server, s3_bucket,
                                                                           corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    from mdt_ray.data.storage import StorageTarget

    cfg = _cfg(tmp_path, corpus, "async-s3", "train.steps=6", "train.checkpoint_every=2",
               f"run.storage_path=s3://{s3_bucket}/runs")
    assert cfg.train.async_upload  # the default
    first = distill(cfg)
    assert first.metrics["step"] == 6 and first.checkpoint.endswith("/runs/async-s3/checkpoint_00000006")
    fs, path = StorageTarget(f"s3://{s3_bucket}/runs/async-s3").pyarrow_fs()
    run_dir = RunDir(fs, path)
    # Steps 2 and 4 went up in the background, 6 (the final one) inline: all whole, each of its step.
    assert run_dir.checkpoint_names() == ["checkpoint_00000006", "checkpoint_00000004", "checkpoint_00000002"]
    for name in run_dir.checkpoint_names():
        state = run_dir.load_checkpoint(name)
        assert _steps_of(state) == {float(state["meta"]["step"])} and name.endswith(f"{state['meta']['step']:08d}")
    # The metrics-only reports between the background uploads (log_every 1) all arrived.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert sorted(m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
    # The final checkpoint stays local until its TRELLIS export is in MLflow.
    exported = Path(client.download_artifacts(first.mlflow_run_id, "student"))
    assert sorted(p.suffix for p in exported.iterdir()) == [".json", ".safetensors"]
    assert not _scratch_copies_of("async-s3")

    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 8})})
    second = distill(longer, resume=True)
    assert second.metrics["step"] == 8 and second.mlflow_run_id == first.mlflow_run_id
    assert _steps_of(run_dir.load_checkpoint("checkpoint_00000008")) == {8.0}
    assert sorted(m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")) == list(range(1, 9))
    assert not _scratch_copies_of("async-s3")


def _block_upload_of(run_dir: Path, after: str, blocked: str, stop: threading.Event) -> None:
    """Once the checkpoint `after` is being uploaded, put a directory where `blocked`'s student
    file must go, so that its upload (a later one) fails with a real OSError from the copy."""
    while not stop.is_set():
        if (run_dir / after / STATE_FILE).exists():
            (run_dir / blocked / "student.safetensors").mkdir(parents=True)
            return
        time.sleep(0.02)


@pytest.mark.slow  # a run, a worker restart and the rest of the run: ~75 s at load 7-10
def test_a_failed_async_upload_keeps_the_last_good_checkpoint_and_the_run_restarts_from_it(ray_local, corpus,
                                                                                          tmp_path, capfd):
    cfg = _cfg(tmp_path, corpus, "async-fail", "train.steps=9", "train.checkpoint_every=3", "run.max_failures=1")
    runs = Path(cfg.run.storage_path) / "async-fail"
    stop = threading.Event()
    blocker = threading.Thread(target=_block_upload_of, daemon=True,
                               args=(runs, "checkpoint_00000003", "checkpoint_00000006", stop))
    blocker.start()
    try:
        out = distill(cfg)
    finally:
        stop.set()
        blocker.join()
    assert (runs / "checkpoint_00000006" / "student.safetensors").is_dir(), "the upload was not blocked"
    assert out.metrics["step"] == 9
    final = load_checkpoint(out.checkpoint)
    assert _steps_of(final) == {9.0}
    # The restart resumed from step 3, the last good checkpoint, and wrote step 6 again beside the
    # failed one; steps 4-9 ran once after it.
    log = capfd.readouterr().out
    assert "resumed from checkpoint at step 3" in log
    assert "skipping a damaged checkpoint: checkpoint" in log and "checkpoint_00000006" in log
    assert _steps_of(load_checkpoint(runs / "checkpoint_00000006.1")) == {6.0}
    assert load_checkpoint(runs / "checkpoint_00000003")["meta"]["step"] == 3
    # The failed upload's scratch copy went with the worker that made it.
    assert not _scratch_copies_of("async-fail")
