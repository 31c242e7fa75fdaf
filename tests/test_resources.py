"""The resource check before a run or a sweep starts: the arithmetic (no Ray), and the refusal of
an oversubscribed run and sweep on the real local cluster, fast and leaving nothing behind."""

import time
from pathlib import Path

import pytest
import yaml

from mdt_ray.config import load_config
from mdt_ray.train.launch import RunError
from mdt_ray.train.resources import READ_TASK_CPUS, TRIAL_DRIVER_CPUS, fitting_runs, plan_of
from mdt_ray.tune import fit_concurrency, load_sweep, trial_count

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs/configs/demo.yaml"


def _scale(*sets):
    return load_config(DEMO, list(sets)).scale


def _sweep(tmp_path, sweep: dict, **overrides):
    doc = {"base": str(DEMO), "overrides": {"scale.num_workers": 1, **overrides},
           "sweep": {"storage_path": str(tmp_path / "sweeps"), "space": {"distill.dt": {"grid": [0.01, 0.02, 0.05]}},
                     **sweep}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_sweep(path)


# -- arithmetic ---------------------------------------------------------------------------------
def test_the_shipped_demo_leaves_exactly_one_cpu_for_reads_on_two_cores():
    plan = plan_of(_scale(), {"CPU": 2.0})
    assert (plan.trainer_cpus, plan.drivers_cpus, plan.read_cpus) == (1.0, 0.0, 1.0)
    assert plan.read_cpus_needed == READ_TASK_CPUS == 1.0
    assert plan.problem() is None
    assert "leaves 0.5 for Ray Data's read tasks" in plan_of(_scale(), {"CPU": 1.5}).problem()


def test_the_sweep_that_hung_is_refused_with_its_numbers():
    # The shipped sweep before the fix: one trial, a worker of 1 CPU and a driver of 0.01 on 2
    # cores left Ray Data 0.99 CPU, and no read task ever started.
    plan = plan_of(_scale("scale.num_workers=1", "scale.cpus_per_worker=1.0"), {"CPU": 2.0}, runs=1,
                   driver_cpus=TRIAL_DRIVER_CPUS)
    problem = plan.problem(sweep=True)
    for part in ("the Ray cluster has 2 CPUs", "the trainer workers take 1 (1 trial at a time × scale.num_workers=1 "
                 "× scale.cpus_per_worker=1)", "the trial drivers 0.01", "leaves 0.99 for Ray Data's read tasks",
                 "short of the 1 they need", "lower scale.cpus_per_worker or scale.num_workers"):
        assert part in problem
    assert "max_concurrent_trials" not in problem  # one trial at a time: nothing to lower there


@pytest.mark.parametrize("cpus, runs", [(1.5, 0), (2.0, 1), (3.0, 1), (3.02, 2), (4.0, 2), (8.0, 5)])
def test_auto_concurrency_gives_each_trial_its_workers_driver_and_read_cpu(cpus, runs):
    scale = _scale("scale.num_workers=1", "scale.cpus_per_worker=0.5")  # the shipped sweep's
    assert fitting_runs(scale, {"CPU": cpus}, driver_cpus=TRIAL_DRIVER_CPUS) == runs
    if runs:  # consistent with the check: the count fits, one more does not
        assert plan_of(scale, {"CPU": cpus}, runs=runs, driver_cpus=TRIAL_DRIVER_CPUS).problem() is None
    assert plan_of(scale, {"CPU": cpus}, runs=runs + 1, driver_cpus=TRIAL_DRIVER_CPUS).problem() is not None


def test_gpus_bound_the_runs_and_a_missing_gpu_is_named():
    scale = _scale("scale.use_gpu=true", "scale.num_workers=4", "scale.gpus_per_worker=1", "scale.cpus_per_worker=2")
    assert fitting_runs(scale, {"CPU": 64.0, "GPU": 8.0}) == 2
    problem = plan_of(scale, {"CPU": 64.0, "GPU": 2.0}).problem()
    assert problem.startswith("the Ray cluster has 2 GPUs but the trainer workers need 4")
    assert "scale.gpus_per_worker" in problem


def test_a_cluster_that_may_grow_is_refused_only_when_its_trainers_fit_as_it_is():
    scale = _scale("scale.use_gpu=true", "scale.num_workers=2", "scale.cpus_per_worker=4")
    # A launcher or KubeRay cluster before its GPU nodes are up: its autoscaler brings them.
    assert plan_of(scale, {"CPU": 0.0, "GPU": 0.0, "bounded": False}).problem() is None
    assert plan_of(scale, {"CPU": 0.0, "GPU": 0.0, "bounded": True}).problem() is not None
    # Workers that fit the cluster as it is, with no CPU left for reads: the silent hang on a
    # head started by hand (`ray start --head`, then `ray job submit`).
    problem = plan_of(scale, {"CPU": 8.0, "GPU": 2.0, "bounded": False}).problem()
    assert "leaves 0 for Ray Data's read tasks" in problem


def test_sweep_concurrency_auto_explicit_and_capped_by_the_trial_count(tmp_path):
    cfg, spec, _ = _sweep(tmp_path, {"max_concurrent_trials": "auto"}, **{"scale.cpus_per_worker": 0.5})
    assert trial_count(spec) == 3
    assert fit_concurrency(cfg, spec, {"CPU": 2.0}) == 1
    assert fit_concurrency(cfg, spec, {"CPU": 64.0}) == 3  # no more at once than there are trials
    cfg, spec, _ = _sweep(tmp_path, {"max_concurrent_trials": 2}, **{"scale.cpus_per_worker": 0.5})
    assert fit_concurrency(cfg, spec, {"CPU": 4.0}) == 2
    with pytest.raises(RunError) as e:
        fit_concurrency(cfg, spec, {"CPU": 2.0})
    assert "2 trials at a time" in str(e.value) and "sweep.max_concurrent_trials" in str(e.value)


def test_auto_concurrency_refuses_when_not_even_one_trial_fits(tmp_path):
    cfg, spec, _ = _sweep(tmp_path, {"max_concurrent_trials": "auto"}, **{"scale.cpus_per_worker": 1.0})
    with pytest.raises(RunError) as e:
        fit_concurrency(cfg, spec, {"CPU": 2.0})
    assert "leaves 0.99 for Ray Data's read tasks" in str(e.value)


def test_trial_count_repeats_the_grid_per_sample(tmp_path):
    _, spec, _ = _sweep(tmp_path, {"num_samples": 2, "space": {"distill.dt": {"grid": [0.01, 0.05]},
                                                               "distill.lambda_vd": {"grid": [0.5, 1.0, 2.0]},
                                                               "train.lr": {"choice": [1e-4, 3e-4]}}})
    assert trial_count(spec) == 12
    _, spec, _ = _sweep(tmp_path, {"search": "random", "num_samples": 5, "space": {"train.lr": {"choice": [1e-4]}}})
    assert trial_count(spec) == 5


# -- on the real cluster (ray_local: 4 logical CPUs) ---------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mdt_ray.data.corpus import build_synthetic

    root = tmp_path_factory.mktemp("resources-corpus")
    build_synthetic(str(root / "train"), 8, seed=0, progress=False, use_ray=False)
    return root / "train"


@pytest.mark.ray
def test_cluster_capacity_of_a_local_cluster_is_its_size(ray_local):
    from mdt_ray.train.resources import cluster_capacity

    # Started by this process (the test session's ray.init): nothing can be added to it.
    assert cluster_capacity() == {"CPU": ray_local.cluster_resources()["CPU"], "GPU": 0.0, "bounded": True}


@pytest.mark.ray
def test_an_oversubscribed_run_is_refused_at_once_and_leaves_nothing(ray_local, corpus, tmp_path):
    from mdt_ray.train.launch import distill

    cfg = load_config(DEMO, [f"data.uri={corpus}", "data.eval_uri=null", "model.teacher=ss-tiny",
                             "scale.num_workers=2", "scale.cpus_per_worker=2", "train.batch_size=4",
                             "run.name=greedy",
                             f"run.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    t0 = time.monotonic()
    with pytest.raises(RunError) as e:
        distill(cfg)
    assert time.monotonic() - t0 < 60
    message = str(e.value)
    assert "\n" not in message
    for part in ("run 'greedy' cannot start", "the Ray cluster has 4 CPUs", "the trainer workers take 4 "
                 "(scale.num_workers=2 × scale.cpus_per_worker=2)", "leaves 0 for Ray Data's read tasks",
                 "lower scale.cpus_per_worker or scale.num_workers"):
        assert part in message
    # Refused before anything was written: no run directory, no MLflow store, no run in it.
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.ray
def test_an_oversubscribed_sweep_is_refused_before_its_parent_run(ray_local, corpus, tmp_path):
    from mdt_ray.tune import run_sweep

    cfg, spec, tree = _sweep(tmp_path, {"name": "greedy", "max_concurrent_trials": 3}, **{
        "data.uri": str(corpus), "data.eval_uri": None, "model.teacher": "ss-tiny", "scale.cpus_per_worker": 1.0,
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    t0 = time.monotonic()
    with pytest.raises(RunError) as e:
        run_sweep(cfg, spec, tree)
    assert time.monotonic() - t0 < 60
    assert "sweep 'greedy' cannot start: the Ray cluster has 4 CPUs" in str(e.value)
    assert "3 trials at a time" in str(e.value) and "sweep.max_concurrent_trials" in str(e.value)
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_trial_drivers_go_where_the_driver_resource_is_and_count_as_slots(tmp_path):
    from mdt_ray.tune import driver_resources

    cfg, spec, _ = _sweep(tmp_path, {"max_concurrent_trials": "auto"}, **{"scale.cpus_per_worker": 0.5})
    # A local cluster has no driver slots: a sliver of CPU anywhere, counted in the plan.
    assert driver_resources(spec, {"CPU": 2.0}) == {"CPU": TRIAL_DRIVER_CPUS}
    # A cluster whose head offers slots (cluster/*.yaml): one slot and no CPU per driver, so a
    # head with 0 CPUs holds them, and no more trials at once than there are slots.
    cluster = {"CPU": 64.0, "mdt_trial_driver": 2.0}
    assert driver_resources(spec, cluster) == {"CPU": 0.0, "mdt_trial_driver": 1.0}
    assert fit_concurrency(cfg, spec, cluster) == 2
    assert fit_concurrency(cfg, spec, {"CPU": 3.0, "mdt_trial_driver": 8.0}) == 2  # 1.5 CPU a trial, no driver CPU
