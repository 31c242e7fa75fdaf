"""Sweeps on a real local Ray cluster with a real MLflow store."""

from pathlib import Path

import pytest
import yaml

from mdt_ray.config import ConfigError
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.tune import fit_concurrency, load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-corpus")
    build_synthetic(str(root / "train"), 32, seed=0, progress=False)
    build_synthetic(str(root / "eval"), 12, seed=1, progress=False)
    return root


def _sweep_file(tmp_path, corpus, sweep: dict, **overrides) -> Path:
    doc = {
        "base": str(REPO / "jobs/configs/demo.yaml"),
        "overrides": {
            "data.uri": f"{corpus}/train", "data.eval_uri": f"{corpus}/eval", "model.teacher": "ss-tiny",
            "train.steps": 4, "train.batch_size": 4, "train.log_every": 2, "train.checkpoint_every": 4,
            "train.eval_assets": 8, "train.eval_steps": [1], "scale.num_workers": 1,
            "scale.cpus_per_worker": 0.5, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.experiment": "sweeps", **overrides,
        },
        "sweep": {"storage_path": str(tmp_path / "sweeps"), **sweep},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _children(tmp_path, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == parent_id][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    return client, parent, children


@pytest.mark.ray
def test_grid_sweep_over_lambda_and_dt_with_mlflow_parent_and_children(ray_local, corpus, tmp_path):
    path = _sweep_file(tmp_path, corpus, {
        "name": "lam-dt", "metric": "eval_fd_1step", "mode": "min", "search": "grid",
        "scheduler": {"type": "none"},
        "space": {"distill.lambda_vd": {"grid": [0.5, 1.0]}, "distill.dt": {"grid": [0.01, 0.05]}},
    })
    cfg, spec, tree = load_sweep(path)
    out = run_sweep(cfg, spec, tree)
    assert len(out["trials"]) == 4 and all(t["status"] == "DONE" for t in out["trials"])
    assert {(t["params"]["distill.lambda_vd"], t["params"]["distill.dt"]) for t in out["trials"]} == {
        (0.5, 0.01), (0.5, 0.05), (1.0, 0.01), (1.0, 0.05)}
    assert out["best"]["metric"] == min(t["metric"] for t in out["trials"])
    assert out["best"]["checkpoint"]
    assert "eval_fd_1step" in out["table"] and "distill.lambda_vd" in out["table"]

    client, parent, children = _children(tmp_path, out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == out["best"]["trial"]
    assert "best_eval_fd_1step" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.txt", "trials.json", "best_trial.json"}
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"distill.lambda_vd", "distill.dt"} <= set(child.data.params)
        assert "eval_fd_1step" in child.data.metrics
    assert {(c.data.params["distill.lambda_vd"], c.data.params["distill.dt"]) for c in children} == {
        ("0.5", "0.01"), ("0.5", "0.05"), ("1.0", "0.01"), ("1.0", "0.05")}


# The default suite has ASHA stopping a trial in test_shipped_configs.py (the shipped sweep, its
# stopped trial's MLflow run KILLED): this in-process variant runs with the slow tests.
@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_worse_trials_early(ray_local, corpus, tmp_path):
    # Built so the outcome is certain: the metric is the learning rate itself (mode max) and the
    # grid runs best-first, one trial at a time, so every later trial trails at the first rung.
    path = _sweep_file(tmp_path, corpus, {
        "name": "asha", "metric": "lr", "mode": "max", "search": "grid", "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "space": {"train.lr": {"grid": [1e-3, 1e-7]}},
    }, **{"train.steps": 6, "data.eval_uri": None})
    cfg, spec, tree = load_sweep(path)
    out = run_sweep(cfg, spec, tree)
    status = {t["params"]["train.lr"]: t["status"] for t in out["trials"]}
    assert status == {1e-3: "DONE", 1e-7: "STOPPED"}
    (stopped,) = [t for t in out["trials"] if t["status"] == "STOPPED"]
    assert stopped["step"] < 6
    _, parent, children = _children(tmp_path, out["parent_run_id"])
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"]
    (killed,) = [c for c in children if c.info.status == "KILLED"]
    assert killed.data.tags["mdt_ray.trial_id"] == stopped["trial"] and killed.data.tags["mdt_ray.stopped_early"] == "true"


@pytest.mark.parametrize("space, key", [
    ({"distill.lambda_vd": {"grid": [1.0, -0.5]}}, "distill.lambda_vd"),
    ({"distill.dt": {"uniform": [0.01, 0.9]}}, "distill.dt"),
    ({"distill.cfg_vm": {"choice": [3.0, -1.0]}}, "distill.cfg_vm"),
    ({"train.learning_rate": {"grid": [1e-4]}}, "train.learning_rate"),
    ({"distill.lambda_vd": {"grid": []}}, "distill.lambda_vd"),
    ({"distill.lambda_vd": {"grid": [1.0], "uniform": [0.1, 1]}}, "distill.lambda_vd"),
])
def test_invalid_search_space_is_rejected_before_any_trial(tmp_path, space, key):
    path = _sweep_file(tmp_path, Path("/nonexistent"), {"name": "bad", "space": space})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert key in str(e.value)
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_shipped_sweep_config_validates_and_fits_two_cores():
    cfg, spec, _ = load_sweep(REPO / "jobs/configs/sweep.yaml")
    assert set(spec.space) == {"distill.lambda_vd", "distill.dt"}
    assert spec.metric == "eval_fd_1step" and cfg.scale.num_workers == 1
    # As shipped, on the 2-core CI machine: one trial at a time, with a whole CPU left for its
    # Ray Data read tasks (tests/test_shipped_configs.py runs it there).
    assert spec.max_concurrent_trials == "auto" and fit_concurrency(cfg, spec, {"CPU": 2.0}) == 1


def test_each_corpus_the_space_lists_is_checked_before_ray_starts(corpus, tmp_path):
    from mdt_ray.data.schema import CorpusError
    from mdt_ray.tune import check_inputs

    missing = tmp_path / "no-corpus"
    path = _sweep_file(tmp_path, corpus, {"name": "uris", "space": {
        "data.uri": {"grid": [f"{corpus}/train", str(missing)]}}})
    cfg, spec, _ = load_sweep(path)
    with pytest.raises(CorpusError, match=r"sweep\.space\.data\.uri\[1\]: .*no-corpus"):
        check_inputs(cfg, spec)
    assert not (tmp_path / "sweeps").exists()


def test_a_deterministic_error_is_found_through_ray_trains_wrapping():
    from mdt_ray.models.teachers import ModelPathError
    from mdt_ray.train.launch import RunError
    from mdt_ray.train.loop import DeterministicFailure, is_deterministic

    class ControllerError(Exception):  # Ray Train 2.60's shape: the cause in controller_failure
        def __init__(self, failure):
            super().__init__("controller failed")
            self.controller_failure = failure

    def raised(inner):
        try:
            raise RunError("run 'x' failed") from inner
        except RunError as e:
            return e

    assert is_deterministic(raised(ControllerError(DeterministicFailure("rank 0: ConfigError: bad"))))
    assert is_deterministic(raised(ModelPathError("model.teacher: no file")))
    assert not is_deterministic(raised(ControllerError(RuntimeError("worker died"))))
    assert not is_deterministic(raised(OSError("connection reset")))


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_that_fails_on_bad_input_is_not_retried(ray_local, corpus, tmp_path):
    missing = tmp_path / "missing-teacher.json"
    path = _sweep_file(tmp_path, corpus, {
        "name": "bad-teacher", "search": "grid", "scheduler": {"type": "none"}, "max_failures": 2,
        "max_concurrent_trials": 1, "space": {"model.teacher": {"grid": [str(missing)]}},
    }, **{"data.eval_uri": None})
    cfg, spec, tree = load_sweep(path)
    out = run_sweep(cfg, spec, tree)
    (trial,) = out["trials"]
    assert trial["status"] == "ERROR"
    assert "not retried" in trial["error"] and "missing-teacher.json" in trial["error"]
    # Every retry Tune made ended at the note, so the run itself started once: one MLflow child.
    _, parent, children = _children(tmp_path, out["parent_run_id"])
    assert parent.info.status == "FAILED" and [c.info.status for c in children] in ([], ["FAILED"])
