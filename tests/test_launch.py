"""The one launch path: the data position of a worker, the checks every run passes before it
starts, and a sweep trial launched exactly as `distill` launches a run."""

import json
from pathlib import Path

import pytest
import yaml

from mdt_ray.config import load_config
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.data.schema import read_manifest
from mdt_ray.train.launch import RunError, check_compatible
from mdt_ray.train.position import Batches, Position
from mdt_ray.train.state import RUN_META

REPO = Path(__file__).resolve().parents[1]


# -- data position ------------------------------------------------------------------------------
def _epochs_of(per_epoch: int, calls: list[int]):
    def batches_of(epoch: int):
        calls.append(epoch)
        return [f"e{epoch}b{i}" for i in range(per_epoch)]

    return batches_of


def test_batches_roll_over_epochs_and_track_the_position():
    calls: list[int] = []
    batches = Batches(_epochs_of(3, calls), batch_size=4)
    assert batches.position == Position(0, -1)
    assert [next(batches) for _ in range(4)] == ["e0b0", "e0b1", "e0b2", "e1b0"]
    assert batches.position == Position(1, 0) and calls == [0, 1]


def test_resume_skips_the_batches_taken_in_the_epoch():
    batches = Batches(_epochs_of(3, []), batch_size=4, start=Position(1, 0))
    assert [next(batches) for _ in range(3)] == ["e1b1", "e1b2", "e2b0"]
    assert batches.position == Position(2, 0)


def test_resume_at_the_end_of_an_epoch_starts_the_next():
    calls: list[int] = []
    batches = Batches(_epochs_of(3, calls), batch_size=4, start=Position(0, 2))
    assert next(batches) == "e1b0" and calls == [0, 1]


def test_a_shard_without_a_full_batch_is_an_error():
    batches = Batches(_epochs_of(0, []), batch_size=4)
    with pytest.raises(RuntimeError, match="no full batch of 4.*train.batch_size × scale.num_workers"):
        next(batches)


def test_position_round_trips_through_checkpoint_meta():
    meta = Position(2, 4).meta(world=3)
    assert meta == {"epoch": 2, "batches_in_epoch": [5, 5, 5]}
    assert Position.from_meta(meta, rank=1) == Position(2, 4)
    assert Position.from_meta(meta, rank=7) == Position(2, 4)  # more workers than when saved


# -- compatibility ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch-corpus") / "train"
    build_synthetic(str(root), 4, seed=0, progress=False, use_ray=False)
    return root


def _cfg(corpus, *sets):
    return load_config(REPO / "jobs/configs/demo.yaml", [f"data.uri={corpus}", *sets])


def test_a_fitting_teacher_passes(small_corpus):
    check_compatible(_cfg(small_corpus, "model.teacher=ss-tiny"), read_manifest(small_corpus))
    check_compatible(_cfg(small_corpus, "model.teacher=slat-tiny", "model.stage=slat"), read_manifest(small_corpus))


@pytest.mark.parametrize("sets, problem", [
    (["model.teacher=slat-tiny", "model.stage=ss"],
     "the teacher is a SLatFlowModel (stage 'slat') but model.stage is 'ss'"),
    (["model.teacher=ss-tiny", "model.stage=slat"], "stage 'ss') but model.stage is 'slat'"),
    (["model.teacher=ss-B"], "vs model cond_channels=1024"),
    (["model.teacher=nowhere/teacher.json"], "no TRELLIS checkpoint config"),
])
def test_an_unfitting_teacher_is_named(small_corpus, sets, problem):
    with pytest.raises(RunError) as e:
        check_compatible(_cfg(small_corpus, *sets), read_manifest(small_corpus))
    assert problem in str(e.value)
    assert "model.teacher" in str(e.value)


def test_the_message_names_teacher_stage_and_corpus(small_corpus):
    with pytest.raises(RunError) as e:
        check_compatible(_cfg(small_corpus, "model.teacher=ss-B"), read_manifest(small_corpus))
    assert f"model.teacher 'ss-B' (model.stage 'ss') does not fit the corpus data.uri '{small_corpus}'" in str(e.value)


# -- a sweep's trials go through the same launch ---------------------------------------------------
@pytest.fixture(scope="module")
def teacher_sweep(ray_local, tmp_path_factory):
    """Two trials over model.teacher on a stage-1 run: ss-tiny fits, slat-tiny (stage 2) does not."""
    from mdt_ray.tune import load_sweep, run_sweep

    root = tmp_path_factory.mktemp("launch-sweep")
    build_synthetic(str(root / "train"), 16, seed=0, progress=False)
    doc = {
        "base": str(REPO / "jobs/configs/demo.yaml"),
        "overrides": {
            "data.uri": f"{root}/train", "data.eval_uri": None, "model.stage": "ss", "train.steps": 2,
            "train.batch_size": 4, "train.log_every": 2, "train.checkpoint_every": 2, "scale.num_workers": 1,
            "scale.cpus_per_worker": 0.5, "tracking.uri": f"sqlite:///{root}/mlflow.db",
            "tracking.experiment": "launch",
        },
        "sweep": {"name": "teachers", "storage_path": str(root / "sweeps"), "metric": "loss", "mode": "min",
                  "search": "grid", "scheduler": {"type": "none"},
                  "space": {"model.teacher": {"grid": ["ss-tiny", "slat-tiny"]}}},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(doc))
    cfg, spec, tree = load_sweep(root / "sweep.yaml")
    return root, run_sweep(cfg, spec, tree)


@pytest.mark.ray
def test_a_sweep_trial_refuses_an_incompatible_teacher(teacher_sweep):
    _, out = teacher_sweep
    status = {t["params"]["model.teacher"]: t for t in out["trials"]}
    assert status["ss-tiny"]["status"] == "DONE"
    bad = status["slat-tiny"]
    assert bad["status"] == "ERROR"
    assert "the teacher is a SLatFlowModel (stage 'slat') but model.stage is 'ss'" in bad["error"]
    assert out["best"]["trial"] == status["ss-tiny"]["trial"]


@pytest.mark.ray
def test_a_sweep_trial_writes_its_run_metadata_and_one_child_run(teacher_sweep):
    from mlflow.tracking import MlflowClient

    root, out = teacher_sweep
    metas = sorted((root / "sweeps" / "teachers-trials").glob(f"*/{RUN_META}"))
    assert len(metas) == 1  # the refused trial started nothing
    meta = json.loads(metas[0].read_text())
    assert meta["name"] == metas[0].parent.name and meta["config"]["model"]["teacher"] == "ss-tiny"
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    child = client.get_run(meta["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
    assert child.data.tags["mdt_ray.sweep"] == "teachers"
    done = [t for t in out["trials"] if t["status"] == "DONE"][0]
    assert child.data.tags["mdt_ray.trial_id"] == done["trial"] and child.info.status == "FINISHED"
    exp = client.get_experiment_by_name("launch")
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == out["parent_run_id"]]
    assert [c.info.run_id for c in children] == [child.info.run_id]
