"""What the fault runs share: a job environment of their own (Ray and temp folders short enough
for Ray's socket paths, no RAY_ADDRESS, so a job starts its own local cluster), a small sharded
corpus, and `job_cmd`, the README's `python jobs/distill.py` with test-sized settings."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def fault_env():
    root = tempfile.mkdtemp(prefix="mdt-f-", dir="/tmp")
    for sub in ("ray", "tmp"):
        os.makedirs(os.path.join(root, sub))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=os.path.join(root, "ray"), TMPDIR=os.path.join(root, "tmp"), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    yield env
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory):
    from mdt_ray.data.corpus import build_synthetic

    root = tmp_path_factory.mktemp("fault-corpus")
    build_synthetic(str(root / "train"), 32, seed=0, rows_per_shard=4, progress=False)
    return root / "train"


def job_cmd(corpus, tmp_path, name: str, *sets: str, steps: int = 200) -> list[str]:
    """`python jobs/distill.py --config jobs/configs/demo.yaml` on the fault corpus, ss-tiny,
    a checkpoint every 2 steps, MLflow in tmp_path."""
    cmd = [sys.executable, "jobs/distill.py", "--config", "jobs/configs/demo.yaml"]
    for s in (f"data.uri={corpus}", "data.eval_uri=null", "model.teacher=ss-tiny", "scale.num_workers=1",
              "scale.cpus_per_worker=0.5", f"train.steps={steps}", "train.batch_size=4", "train.checkpoint_every=2",
              "train.log_every=2", f"run.storage_path={tmp_path}/runs", f"run.name={name}",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *sets):
        cmd += ["--set", s]
    return cmd
