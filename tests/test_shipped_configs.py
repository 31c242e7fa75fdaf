"""The shipped local configs run as shipped, started exactly as the README starts them, and the
mistakes a new user makes on the way end in one line, leaving nothing that blocks the fix.

The jobs run as subprocesses from the repository root with no Ray running for them, so each
starts its own local Ray with the machine's real CPUs (2 on CI), not the 4 logical CPUs of the
test session's cluster. Their only overrides shrink them (steps, assets, corpora built here with
`mdt-ray corpus build`) or send their output to temporary folders; scale.* and the sweep's
concurrency stay as shipped.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mdt_ray.cli import main as mdt_ray_main
from mdt_ray.train.state import RUN_META

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
BIN = Path(sys.executable).parent
# The configs meant for a laptop or the CI machine, and the job script that runs each; the
# trellis_*.yaml ones are cluster configs, validated against cluster/ by tests/test_cluster.py.
LOCAL = {"demo.yaml": "distill.py", "sweep.yaml": "sweep.py"}
JOB_TIMEOUT_S = 600


def test_every_shipped_config_is_local_or_a_cluster_config():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped - {n for n in shipped if n.startswith("trellis_")} == set(LOCAL)


@pytest.fixture(scope="module")
def job_env():
    """The tests' environment (conftest.py) with a Ray and temp folder of the jobs' own, short
    enough for Ray's socket paths, and no RAY_ADDRESS: the jobs must not join the test session's
    cluster."""
    root = tempfile.mkdtemp(prefix="mdt-job-", dir="/tmp")
    for sub in ("ray", "tmp"):
        os.makedirs(os.path.join(root, sub))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=os.path.join(root, "ray"), TMPDIR=os.path.join(root, "tmp"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    yield env
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, job_env):
    """Small training and held-out corpora, built as the README builds them."""
    root = tmp_path_factory.mktemp("shipped-corpora")
    for name, assets, seed in (("train", 32, 0), ("eval", 8, 1)):
        proc = subprocess.run([str(BIN / "mdt-ray"), "corpus", "build", "--kind", "synthetic", "--num-assets",
                               str(assets), "--seed", str(seed), "--out", str(root / name), "--no-ray", "--quiet"],
                              env=job_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def _job(config: str, sets: list[str], env: dict, *extra: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python jobs/<script> --config jobs/configs/<config> --set ...`, as the README runs it."""
    cmd = [sys.executable, f"jobs/{LOCAL[config]}", "--config", f"jobs/configs/{config}"]
    if cwd != REPO:
        cmd[1], cmd[3] = str(REPO / cmd[1]), str(REPO / cmd[3])
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd + list(extra), cwd=cwd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def _shrunk(corpora, tmp_path) -> list[str]:
    return [f"data.uri={corpora}/train", f"data.eval_uri={corpora}/eval", "train.steps=4", "train.batch_size=4",
            "train.log_every=2", "train.checkpoint_every=4", "train.eval_assets=4",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]


def _mlflow_runs(tmp_path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# -- the shipped configs, as shipped ----------------------------------------------------------------
@pytest.mark.ray
def test_demo_config_runs_as_shipped(corpora, job_env, tmp_path):
    proc = _job("demo.yaml", _shrunk(corpora, tmp_path) + [f"run.storage_path={tmp_path}/runs"], job_env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" in out  # its own cluster, not the test session's
    assert "[mdt-ray] step 4/4" in out
    assert (tmp_path / "runs/mdt-demo/checkpoint_00000004/trellis/mdt-demo_student.safetensors").is_file()
    (run,) = _mlflow_runs(tmp_path, "mdt-ray-demo")
    assert run.info.status == "FINISHED" and run.data.params["scale.cpus_per_worker"] == "0.5"


# The shipped grid (4 trials, one at a time on 2 cores) takes minutes there: it runs with the slow
# tests. The default suite runs the same sweep, as shipped but for a search whose outcome is
# certain (metric: the learning rate itself, best first): ASHA stops the second trial at its first
# rung, and the third must still find the CPUs the stopped one held. With another Ray instance on
# the machine (the test session's), Ray 2.60 kept a stopped trial's workers reserved unless its
# cluster's processes know the cluster's address (mdt_ray.train.trainer.ensure_ray), and the third
# trial waited at 0 rows forever.
STOP_THEN_NEXT = ["sweep.metric=lr", "sweep.mode=max", 'sweep.space={"train.lr": {"grid": [3.0e-4, 1.0e-7, 1.0e-6]}}',
                  "data.eval_uri=null"]


@pytest.mark.ray
@pytest.mark.parametrize("search, statuses", [
    pytest.param([], None, marks=pytest.mark.slow, id="shipped-grid"),
    pytest.param(STOP_THEN_NEXT, ["DONE", "STOPPED", "STOPPED"], id="asha-stop-then-next-trial")])
def test_sweep_config_runs_as_shipped(ray_local, corpora, job_env, tmp_path, search, statuses):
    # The relative paths as shipped (data/demo-corpus, data/demo-eval, runs/sweeps, the packaged
    # teacher, a relative sqlite store), read from a working directory that holds the corpora
    # there: the trials run in Tune's trial folders, so only paths resolved on the driver reach them.
    (tmp_path / "data").mkdir()
    (tmp_path / "data/demo-corpus").symlink_to(corpora / "train")
    (tmp_path / "data/demo-eval").symlink_to(corpora / "eval")
    sets = [s for s in _shrunk(corpora, tmp_path) if not s.startswith(("data.", "tracking."))]
    # The scheduler as shipped, at 4 steps a trial: ASHA's first rung at step 2.
    sets += ["tracking.uri=sqlite:///mlflow.db", "train.eval_every=2", "sweep.scheduler.grace_period=2", *search]
    proc = _job("sweep.yaml", sets, job_env, "--json", str(tmp_path / "sweep.json"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" in out
    assert "trial(s) at a time" in out and "[mdt-ray] best trial" in out
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["best"]["metric"] is not None and result["best"]["checkpoint"]
    assert result["best"]["checkpoint"].startswith(str(tmp_path / "runs/sweeps")), result["best"]
    if statuses is None:
        assert len(result["trials"]) == 4 and all(t["status"] in ("DONE", "STOPPED") for t in result["trials"])
    else:
        by_lr = sorted(result["trials"], key=lambda t: -t["params"]["train.lr"])
        assert [t["status"] for t in by_lr] == statuses and result["best"]["params"]["train.lr"] == 3.0e-4
    runs = _mlflow_runs(tmp_path, "mdt-ray-demo")
    (parent,) = [r for r in runs if r.info.run_id == result["parent_run_id"]]
    assert parent.info.status == "FINISHED"
    if statuses is not None:
        # Each trial's MLflow child run closed as its trial ended: a stopped one KILLED and tagged.
        children = {r.data.tags["mdt_ray.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
        for trial in result["trials"]:
            child = children[trial["trial"]]
            assert child.info.status == ("FINISHED" if trial["status"] == "DONE" else "KILLED"), trial
            if trial["status"] == "STOPPED":
                assert child.data.tags["mdt_ray.stopped_early"] == "true"


# -- one line for what the user got wrong, and nothing left behind ----------------------------------
@pytest.mark.parametrize("config", sorted(LOCAL))
def test_the_readme_command_before_the_corpus_exists_is_one_line_before_ray(config, job_env, tmp_path):
    """The README's command in a folder without data/: the default corpus path does not exist."""
    t0 = time.monotonic()
    proc = _job(config, [], job_env, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    prog = LOCAL[config].removesuffix(".py")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The path as resolved from the command's directory, before any line announces the run.
    assert _error_lines(proc.stderr) == [f"{prog}: error: data.uri: no corpus at {tmp_path.resolve()}/data/demo-corpus: "
                                         "the path does not exist"]
    assert "distilling" not in proc.stderr
    assert "Traceback" not in proc.stdout and "Ray instance" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no mlflow.db
    assert elapsed < 60


# Ray forwards its actors' own logs to the driver as "(ActorName pid=N) ..." lines (colour
# codes first when it thinks it writes to a terminal): those are Ray's, not the command's.
_RAY_ACTOR_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\([A-Za-z_][\w.]* pid=\d+")


def _error_lines(stderr: str) -> list[str]:
    """The command's error lines; whatever else the command itself writes on stderr must hold
    no traceback."""
    ours = [line for line in stderr.splitlines() if not _RAY_ACTOR_LINE.match(line)]
    assert not any("Traceback" in line for line in ours), "\n".join(ours)[-3000:]
    return [line for line in ours if ": error: " in line]


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = mdt_ray_main(list(argv))
    return code, _error_lines(capsys.readouterr().err)


def _distill(capsys, tmp_path, *sets: str) -> tuple[int, list[str]]:
    argv = ["distill", "--config", str(CONFIGS / "demo.yaml"), "--set", "model.teacher=ss-tiny",
            "--set", f"run.storage_path={tmp_path}/runs", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    for s in sets:
        argv += ["--set", s]
    return _cli(capsys, *argv)


def _nothing_written(tmp_path) -> bool:
    return not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("files", [{"notes.txt": "hello"}, {"part-00000.parquet": "not parquet at all"}])
def test_a_folder_without_a_corpus_is_one_line(capsys, tmp_path, files):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    code, err = _distill(capsys, tmp_path, f"data.uri={folder}")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mdt-ray distill: error: data.uri: ") and str(folder) in err[0]
    assert _nothing_written(tmp_path)


def test_a_missing_eval_corpus_is_one_line(capsys, corpora, tmp_path):
    code, err = _distill(capsys, tmp_path, f"data.uri={corpora}/train", f"data.eval_uri={tmp_path}/held-out")
    assert code == 2
    assert err == [f"mdt-ray distill: error: data.eval_uri: no corpus at {tmp_path}/held-out: the path does not exist"]
    assert _nothing_written(tmp_path)


def test_an_incompatible_teacher_is_one_line(capsys, corpora, tmp_path):
    code, err = _distill(capsys, tmp_path, f"data.uri={corpora}/train", "model.teacher=slat-tiny")
    assert code == 1 and len(err) == 1
    assert "the teacher is a SLatFlowModel (stage 'slat') but model.stage is 'ss'" in err[0]
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("key", ["data.uri", "run.storage_path"])
def test_a_bucket_that_does_not_exist_is_one_line(capsys, corpora, s3_server, tmp_path, key):
    values = {"data.uri": f"{corpora}/train", key: "s3://no-such-bucket-for-mdt/prefix"}
    code, err = _distill(capsys, tmp_path, *(f"{k}={v}" for k, v in values.items()))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mdt-ray distill: error: {key}: S3 bucket 'no-such-bucket-for-mdt' does not exist")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.ray
def test_runs_that_fail_after_starting_leave_nothing_that_blocks_the_rerun(ray_local, capsys, corpora, tmp_path):
    """A damaged shard (found when the trainer is built) and a non-finite loss at the first step
    (found in the workers) fail the run before its first checkpoint; the corrected command then
    runs under the same run.name without --resume."""
    from mlflow.tracking import MlflowClient

    damaged = tmp_path / "damaged"
    shutil.copytree(corpora / "train", damaged)
    shard = sorted(damaged.glob("*.parquet"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    base = ["data.eval_uri=null", "scale.num_workers=1", "train.steps=2", "train.batch_size=4",
            "train.checkpoint_every=2", "train.log_every=1", "run.name=retry"]
    failures = [([f"data.uri={damaged}"], 2, f"shard {shard} is corrupt"),
                ([f"data.uri={corpora}/train", "distill.cfg_vm=1e38", "distill.cfg_vd=1e38"], 1, "non-finite loss")]
    for sets, want_code, want in failures:
        code, err = _distill(capsys, tmp_path, *base, *sets)
        assert code == want_code and len(err) == 1 and want in err[0], err
        assert not (tmp_path / "runs" / "retry" / RUN_META).exists()
        assert not (tmp_path / "runs" / "retry").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mdt-ray-demo").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]

    code, err = _distill(capsys, tmp_path, *base, f"data.uri={corpora}/train")
    assert code == 0, err[-20:]
    assert (tmp_path / "runs" / "retry" / RUN_META).is_file()
    runs = client.search_runs([client.get_experiment_by_name("mdt-ray-demo").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]


def test_a_teacher_whose_weights_do_not_fit_its_json_is_one_line_before_ray(capsys, corpora, tmp_path):
    """Found from the safetensors header on the driver (no weight read, no worker started)."""
    from safetensors.torch import load_file, save_file

    from mdt_ray.models.checkpoint import check_trellis
    from mdt_ray.models.teachers import PACKAGED_TEACHER, from_root

    packaged = from_root(PACKAGED_TEACHER)
    check_trellis(packaged)  # the shipped teacher fits
    check_trellis(REPO / "tests/fixtures/trellis/slat_flow_tiny.json")  # so does a stage-2 model
    bad = tmp_path / "teacher" / "t.json"
    bad.parent.mkdir()
    bad.write_text(packaged.read_text())
    tensors = load_file(str(packaged.with_suffix(".safetensors")))
    tensors["out_layer.weight"] = tensors["out_layer.weight"][:, :-1].contiguous()
    save_file(tensors, str(bad.with_suffix(".safetensors")))
    code, err = _distill(capsys, tmp_path, f"data.uri={corpora}/train", f"model.teacher={bad}")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mdt-ray distill: error: model.teacher: ") and "out_layer.weight: checkpoint" in err[0]
    assert _nothing_written(tmp_path)


def test_a_batch_larger_than_a_workers_share_is_one_line_before_ray(capsys, corpora, tmp_path):
    code, err = _distill(capsys, tmp_path, f"data.uri={corpora}/train", "train.batch_size=32", "scale.num_workers=2")
    assert code == 1 and len(err) == 1, err
    assert "holds 32 assets: 16 per worker for scale.num_workers=2, fewer than train.batch_size=32" in err[0]
    assert _nothing_written(tmp_path)
