"""Driver side of a distillation run: checks, MLflow run, dataset, `TorchTrainer`, result.

Ray 2.60 runs Ray Train V2 by default: a run whose `RunConfig(name, storage_path)` already holds
a checkpoint-manager snapshot is restored from its latest checkpoint. We therefore refuse to
start over an existing run unless asked to resume, so two different runs never mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mdt_ray.config import Config

RUN_META = "mdt_ray_run.json"


class RunError(RuntimeError):
    """A run cannot start or did not finish; the message says why and what to do."""


@dataclass
class DistillResult:
    run_dir: str
    checkpoint: Optional[str]
    metrics: dict[str, Any]
    mlflow_run_id: Optional[str]
    result: Any  # the ray.train.Result


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)


def storage_target(cfg: Config):
    """(storage_path, storage_filesystem) for RunConfig. Ray 2.60 takes an `s3://` URI with its
    default filesystem, but a custom endpoint needs our filesystem with the scheme stripped."""
    from mdt_ray.data.storage import is_s3, pyarrow_fs

    path = cfg.run.storage_path
    if is_s3(path):
        fs, bare = pyarrow_fs(path, cfg.data.storage_endpoint, cfg.data.storage_region)
        return bare, fs
    return str(Path(path).expanduser().resolve()), None


def _fs_and_dir(cfg: Config):
    import pyarrow.fs as pafs

    path, fs = storage_target(cfg)
    fs = fs or pafs.LocalFileSystem()
    return fs, f"{path.rstrip('/')}/{cfg.run.name}"


def read_run_meta(cfg: Config) -> Optional[dict[str, Any]]:
    import pyarrow.fs as pafs

    fs, run_dir = _fs_and_dir(cfg)
    info = fs.get_file_info(f"{run_dir}/{RUN_META}")
    if info.type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{run_dir}/{RUN_META}") as f:
        return json.loads(f.read().decode())


def run_exists(cfg: Config) -> bool:
    import pyarrow.fs as pafs

    fs, run_dir = _fs_and_dir(cfg)
    info = fs.get_file_info(run_dir)
    if info.type == pafs.FileType.NotFound:
        return False
    return any(True for _ in fs.get_file_info(pafs.FileSelector(run_dir, recursive=False)))


def write_run_meta(cfg: Config, meta: dict[str, Any]) -> None:
    fs, run_dir = _fs_and_dir(cfg)
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(f"{run_dir}/{RUN_META}") as f:
        f.write(json.dumps(meta, indent=1).encode())


def _take_stop_note(cfg: Config) -> Optional[dict[str, Any]]:
    """Read and remove the note a worker leaves when it stops the run (non-finite loss)."""
    import pyarrow.fs as pafs

    from mdt_ray.train.loop import STOP_NOTE

    fs, run_dir = _fs_and_dir(cfg)
    path = f"{run_dir}/{STOP_NOTE}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        note = json.loads(f.read().decode())
    fs.delete_file(path)
    return note


def teacher_spec(cfg: Config) -> dict[str, Any]:
    """The teacher's `{"name", "args"}` without building it."""
    from mdt_ray.models import NAMED_CONFIGS

    if cfg.model.teacher in NAMED_CONFIGS:
        return NAMED_CONFIGS[cfg.model.teacher]
    from mdt_ray.train.loop import teacher_path

    path = teacher_path(cfg.model.teacher)
    if not path.is_file():
        raise RunError(f"model.teacher: no TRELLIS checkpoint config at {path} (expected <name>.json with "
                       f"<name>.safetensors beside it)")
    try:
        spec = json.loads(path.read_text())
        spec["name"], spec["args"]
    except (ValueError, KeyError, TypeError):
        raise RunError(f"model.teacher: {path} is not a TRELLIS model config ({{\"name\": ..., \"args\": ...}})") from None
    return spec


_STAGE_OF = {"SparseStructureFlowModel": "ss", "SLatFlowModel": "slat", "ElasticSLatFlowModel": "slat"}


def check_compatible(cfg: Config, manifest) -> None:
    """The teacher must be a model of `model.stage` whose input/cond sizes are the corpus's."""
    spec = teacher_spec(cfg)
    args = spec["args"]
    stage = _STAGE_OF.get(spec["name"])
    problems = []
    if stage != cfg.model.stage:
        problems.append(f"the teacher is a {spec['name']} (stage {stage!r}) but model.stage is {cfg.model.stage!r}")
    elif stage == "ss":
        c, r = manifest.latent_shape[0], manifest.latent_shape[1]
        if args.get("in_channels") != c or args.get("resolution") != r:
            problems.append(f"latent {list(manifest.latent_shape)} vs model in_channels={args.get('in_channels')}, "
                            f"resolution={args.get('resolution')}")
    elif args.get("in_channels") != manifest.slat_channels:
        problems.append(f"{manifest.slat_channels} SLAT channels vs model in_channels={args.get('in_channels')}")
    if cfg.model.stage not in manifest.stages:
        problems.append(f"the corpus holds no stage-{cfg.model.stage!r} data (stages {list(manifest.stages)})")
    if args.get("cond_channels") != manifest.cond_shape[1]:
        problems.append(f"cond tokens {list(manifest.cond_shape)} (T, C) vs model cond_channels={args.get('cond_channels')}")
    if problems:
        raise RunError(f"model.teacher {cfg.model.teacher!r} does not fit the corpus data.uri {cfg.data.uri!r}: "
                       + "; ".join(problems))


def build_trainer(cfg: Config, *, mlflow_run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                  callbacks: Optional[list] = None, eval_data: Any = None, dataset: Any = None,
                  storage: Optional[tuple] = None):
    """The TorchTrainer of one distillation run (also what each Tune trial runs)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mdt_ray.data.pipeline import make_dataset
    from mdt_ray.train.loop import train_loop_per_worker

    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                      resources_per_worker=resources, accelerator_type=s.accelerator_type)
    storage_path, storage_fs = storage or storage_target(cfg)
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        callbacks=callbacks,
    )
    manifest = None
    if dataset is None:
        from mdt_ray.data.schema import read_manifest

        # Rows travel as stored (float16 lists) and each worker validates and decodes its own
        # batches: one Ray Data stage and one float32 trip through the object store fewer than
        # decoding in read tasks (benchmarks/ingest.py: 0.86x of bare pyarrow against 0.56x).
        manifest = read_manifest(cfg.data.uri, endpoint_url=cfg.data.storage_endpoint, region=cfg.data.storage_region)
        dataset = make_dataset(cfg.data.uri, stage=cfg.model.stage, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                               endpoint_url=cfg.data.storage_endpoint, region=cfg.data.storage_region,
                               decode="collate")
        manifest = dataclasses.replace(manifest, shards=[])  # workers need shapes and stats, not the file list
    loop_config = {"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id,
                   "tracking_uri": tracking_uri, "eval_data": eval_data, "manifest": manifest,
                   "run_dir": f"{storage_path.rstrip('/')}/{cfg.run.name}", "storage_fs": storage_fs}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": dataset},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )


def load_eval_data(cfg: Config, manifest_source: str = "") -> Optional[dict[str, Any]]:
    if not cfg.data.eval_uri:
        return None
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.data.schema import read_manifest

    rows = load_local(cfg.data.eval_uri, stage=cfg.model.stage, limit=cfg.train.eval_assets,
                      endpoint_url=cfg.data.storage_endpoint, region=cfg.data.storage_region)
    source = read_manifest(cfg.data.eval_uri, endpoint_url=cfg.data.storage_endpoint,
                           region=cfg.data.storage_region).source
    rows.pop("asset_id", None)
    return {**rows, "source": source}


def distill(cfg: Config, *, resume: bool = False) -> DistillResult:
    """Run (or resume) one distillation job end to end; raises RunError when it cannot finish."""
    import ray

    from mdt_ray import tracking
    from mdt_ray.data.schema import read_manifest

    resume = resume or cfg.run.resume
    ensure_ray()
    exists = run_exists(cfg)
    if exists and not resume:
        raise RunError(f"run {cfg.run.name!r} already exists in {cfg.run.storage_path}: pass --resume to continue "
                       "it from its latest checkpoint, or set run.name to start a new one")
    manifest = read_manifest(cfg.data.uri, endpoint_url=cfg.data.storage_endpoint, region=cfg.data.storage_region)
    check_compatible(cfg, manifest)

    meta = read_run_meta(cfg) if exists else None
    run_id, uri = None, None
    if cfg.tracking.enabled:
        uri = tracking.resolve_uri(cfg.tracking.resolved_uri())
        if meta and meta.get("mlflow_run_id") and meta.get("tracking_uri") == uri:
            run_id = meta["mlflow_run_id"]
            tracking.reopen_run(uri, run_id)
        else:
            run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.run.name, cfg.flat(),
                                        tags={"mdt_ray.corpus_rows": str(manifest.num_rows)})
    write_run_meta(cfg, {"mlflow_run_id": run_id, "tracking_uri": uri, "name": cfg.run.name,
                         "config": cfg.model_dump(mode="json")})

    eval_data = load_eval_data(cfg)
    trainer = build_trainer(cfg, mlflow_run_id=run_id, tracking_uri=uri,
                            eval_data=ray.put(eval_data) if eval_data is not None else None)
    stop_note = _take_stop_note(cfg)  # a stale note from an earlier stop must not fail this run
    status = "FAILED"
    try:
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        stop_note = _take_stop_note(cfg)
        if stop_note:
            raise RunError(stop_note.get("message", "non-finite loss"))
        status = "FINISHED"
    except Exception as e:
        if uri and run_id:
            tracking.end_run(uri, run_id, "FAILED")
        if isinstance(e, RunError):
            raise
        raise RunError(f"run {cfg.run.name!r} failed: {e}") from e
    if uri and run_id:
        tracking.end_run(uri, run_id, status)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return DistillResult(run_dir=str(result.path), checkpoint=checkpoint, metrics=metrics,
                         mlflow_run_id=run_id, result=result)
