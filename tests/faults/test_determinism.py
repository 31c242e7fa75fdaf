"""A config run twice gives the same model, bit for bit on CPU, and so does a run whose worker
process was SIGKILLed and restored from its last checkpoint: the data order is Ray Data's order-preserving
one (data.deterministic) and every random draw of a step is seeded by (seed, rank, step)."""

from pathlib import Path

import pytest
import torch

from mdt_ray.config import load_config
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.train.launch import distill
from mdt_ray.train.state import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sharded_corpus(tmp_path_factory):
    """Eight shards of four rows: with two workers, which worker gets which rows depends on the
    order blocks are handed out, so a non-deterministic order would show."""
    root = tmp_path_factory.mktemp("sharded")
    build_synthetic(str(root / "train"), 32, seed=0, rows_per_shard=4, progress=False)
    return root / "train"


def _run(tmp_path, corpus, name, *sets):
    cfg = load_config(REPO / "jobs/configs/demo.yaml", [
        f"data.uri={corpus}", "data.eval_uri=null", "model.teacher=ss-tiny", "scale.num_workers=2",
        "scale.cpus_per_worker=0.5", "train.steps=6", "train.batch_size=4", "train.checkpoint_every=3",
        "train.log_every=3", f"run.storage_path={tmp_path}/runs", f"run.name={name}", "tracking.enabled=false",
        *sets])
    out = distill(cfg)
    assert out.metrics["step"] == 6
    return load_checkpoint(out.checkpoint)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_restored_after_a_worker_failure_ends_with_identical_weights(ray_local, sharded_corpus,
                                                                                  tmp_path):
    # The first run uploads its checkpoints inline, the second in Ray's background thread
    # (train.async_upload, the default): where an upload runs changes nothing of the training.
    first = _run(tmp_path, sharded_corpus, "first", "train.async_upload=false")
    # The second run of the config has a worker process SIGKILLed at step 5; it restores from step 3 and
    # replays steps 4-6 on the same batches with the same draws: the final weights are those of
    # the first run, which never failed (so two runs agree, and a restore replays exactly).
    restored = _run(tmp_path, sharded_corpus, "restored", "run.inject_failure_at_step=5", "run.max_failures=1")
    steps = [float(v) for k, v in restored["optimizer"].items() if k.endswith(".step")]
    assert steps and all(s == 6 for s in steps)  # steps 4-6 ran once after the restore
    assert first["meta"]["metrics"]["loss"] == restored["meta"]["metrics"]["loss"]
    assert _same(first["student"], restored["student"]) and _same(first["ema"], restored["ema"])
