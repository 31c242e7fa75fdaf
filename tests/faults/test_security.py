"""Security properties as tests: the S3 secret never reaches a log, an MLflow record, a checkpoint
or anything else a run writes; nothing is unpickled (checkpoints, corpora and downloads are read
as safetensors, Parquet, JSON, or with weights_only=True); a config cannot name Python code."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from mdt_ray.config import ConfigError, load_config
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.train.launch import distill
from tests.s3_server import TEST_CREDENTIALS

REPO = Path(__file__).resolve().parents[2]
SECRET = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode()


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # a socket or a file that went away while we looked
                continue
    return hits


@pytest.mark.ray
def test_the_s3_secret_appears_nowhere_a_run_writes(ray_local, s3_server, s3_bucket, tmp_path):
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET.decode()  # the run below really uses it
    build_synthetic(f"s3://{s3_bucket}/corpus", 16, seed=0, progress=False)
    cfg = load_config(REPO / "jobs/configs/demo.yaml", [
        f"data.uri=s3://{s3_bucket}/corpus", "data.eval_uri=null", "model.teacher=ss-tiny", "scale.num_workers=1",
        "scale.cpus_per_worker=0.5", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
        "train.log_every=1", "run.name=secret-check", f"run.storage_path=s3://{s3_bucket}/runs",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    out = distill(cfg)
    assert out.metrics["step"] == 2
    # Everything in the bucket: corpus, checkpoints, Ray Train's own state files.
    from mdt_ray.data.storage import StorageTarget

    fs, _ = StorageTarget(f"s3://{s3_bucket}").pyarrow_fs()
    objects = [i for i in fs.get_file_info(pafs.FileSelector(s3_bucket, recursive=True)) if i.type == pafs.FileType.File]
    assert any("checkpoint_00000002" in i.path for i in objects)
    leaked = [i.path for i in objects if SECRET in fs.open_input_stream(i.path).read()]
    assert not leaked, leaked
    # The MLflow store (params, tags, metrics, artifacts) and every log of the Ray session.
    assert not _files_holding(tmp_path, SECRET)
    ray_logs = Path(os.environ["RAY_TMPDIR"])
    assert not _files_holding(ray_logs, SECRET)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(out.mlflow_run_id)
    assert all(SECRET.decode() not in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_nothing_in_the_code_unpickles():
    """pickle, torch.load without weights_only=True, numpy loads that allow pickles: none in the
    package, the jobs, the benchmarks or the cluster scripts."""
    problems = []
    for folder in ("mdt_ray", "jobs", "benchmarks", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for n in names):
                        problems.append(f"{path}:{node.lineno} imports a pickle library")
            for node, owner, name in _calls(tree):
                keywords = {k.arg: k.value for k in node.keywords}
                if owner == "torch" and name == "load":
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
                if owner in ("np", "numpy") and name == "load":
                    allow = keywords.get("allow_pickle")
                    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                        problems.append(f"{path}:{node.lineno} np.load that may allow pickles")
    assert not problems, problems


@pytest.mark.parametrize("text", [
    "model:\n  teacher: !!python/object/apply:os.system ['touch {marker}']\n",
    "!!python/name:os.system\n",
    "train: !!python/object:argparse.Namespace {{steps: 2}}\n",
])
def test_a_config_cannot_name_python_code(tmp_path, text):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_config_values_are_data_not_import_paths(tmp_path):
    """The one config value that names something to load, model.teacher, is a size name or a
    file path: a dotted Python name is neither, and nothing is imported for it."""
    from mdt_ray.models.teachers import ModelPathError, teacher_spec

    with pytest.raises(ModelPathError):
        teacher_spec("os.system")
    with pytest.raises(ConfigError):
        load_config(REPO / "jobs/configs/demo.yaml", ["distill.method=os.system"])
