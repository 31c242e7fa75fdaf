"""The `TorchTrainer` of one distillation run, and the Ray cluster and store it runs on.

mdt_ray.train.launch decides whether and how a run starts (checks, MLflow, run metadata) and
calls `build_trainer`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from mdt_ray.config import Config
from mdt_ray.train.state import RunDir


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it) or start a local one whose
    address every process in it knows.

    Ray 2.60's Train V2 frees the worker placement group of a run whose controller died (a sweep
    trial Tune stopped early) from a detached PlacementGroupCleaner actor, which finds its cluster
    through RAY_ADDRESS, else by looking for Ray processes on the machine, and fails when it sees
    more than one Ray instance there. The stopped run's worker CPUs then stay reserved, and the
    next run's Ray Data has no CPU to read with. So the GCS port of a local cluster is chosen here
    and every worker gets the address (RAY_GCS_SERVER_PORT is what Ray's head start reads).
    """
    import socket

    import ray

    from mdt_ray.interrupts import reclaim_sigterm

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        reclaim_sigterm()
        return
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(num_cpus=num_cpus, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}})
    finally:
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before
    reclaim_sigterm()


def storage_target(cfg: Config) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig. Ray 2.60 takes an `s3://` URI with its
    default filesystem, but a custom endpoint needs our filesystem with the scheme stripped."""
    from mdt_ray.data.storage import StorageTarget

    target = StorageTarget.from_data_config(cfg.data, cfg.run.storage_path)
    if target.is_s3:
        fs, bare = target.pyarrow_fs()
        return bare, fs
    return str(Path(cfg.run.storage_path).expanduser().resolve()), None


def run_dir_of(cfg: Config) -> RunDir:
    """Where Ray keeps the run named run.name: `<run.storage_path>/<run.name>`."""
    path, fs = storage_target(cfg)
    return RunDir(fs, f"{path.rstrip('/')}/{cfg.run.name}")


def ingest_config(cfg: Config):
    """Ray Train's DataConfig for the run. Ray Train 2.60 gives each dataset these execution
    options when it splits it across workers (replacing the dataset's own); `preserve_order`
    also turns off the locality-driven hand-out of blocks, so which worker gets which rows
    depends only on the read order (ray/data/_internal/execution/operators/output_splitter.py)."""
    import copy

    import ray.data
    import ray.train

    # A copy of the current options rather than DataConfig.default_ingest_options(), whose
    # constructor call passes the deprecated `exclude_resources` and warns in every run.
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = cfg.data.deterministic
    return ray.train.DataConfig(execution_options=options)


def build_trainer(cfg: Config, manifest, *, mlflow_run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                  callbacks: Optional[list] = None, eval_split: Any = None):
    """The TorchTrainer of a run on data.uri, whose `manifest` the caller has read; `eval_split`
    is the held-out Split (or an object ref to it) for rank 0's in-training eval."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mdt_ray.data.pipeline import make_dataset
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.train.loop import StopOnDeterministicError, train_loop_per_worker

    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                      resources_per_worker=resources, accelerator_type=s.accelerator_type)
    storage_path, storage_fs = storage_target(cfg)
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        # A config, corpus or checkpoint error fails the same way on every restart: not retried.
        callbacks=[*(callbacks or []), StopOnDeterministicError()],
    )
    # Rows travel as stored (float16 lists) and each worker validates and decodes its own
    # batches: one Ray Data stage and one float32 trip through the object store fewer than
    # decoding in read tasks (benchmarks/ingest.py has the comparison).
    dataset = make_dataset(StorageTarget.from_data_config(cfg.data), manifest=manifest, stage=cfg.model.stage,
                           shuffle=cfg.data.shuffle, seed=cfg.train.seed, decode="collate")
    loop_config = {"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id,
                   "tracking_uri": tracking_uri, "eval_split": eval_split, "run_dir": run_dir_of(cfg),
                   # workers need shapes and stats, not the file list
                   "manifest": dataclasses.replace(manifest, shards=[])}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": dataset},
        dataset_config=ingest_config(cfg),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )

