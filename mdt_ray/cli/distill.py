"""`mdt-ray distill` / `python jobs/distill.py`: load the config, run, summarise."""

from __future__ import annotations

import argparse
import logging

from mdt_ray.cli._common import add_config_args, main_for
from mdt_ray.config import load_config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named run.name from its latest checkpoint")


def run(args: argparse.Namespace) -> int:
    from mdt_ray.tracking import resolve_uri
    from mdt_ray.train.launch import distill

    cfg = load_config(args.config, args.overrides)
    check_corpus(cfg)
    log.info("distilling %s (%s, %s) on %s with %d worker(s), %d steps -> %s/%s", cfg.model.teacher, cfg.model.stage,
             cfg.distill.method, cfg.data.uri, cfg.scale.num_workers, cfg.train.steps, cfg.run.storage_path,
             cfg.run.name)
    out = distill(cfg, resume=args.resume)
    m = out.metrics
    log.info("done: step %s loss %.4g", m.get("step"), m.get("loss", float("nan")))
    for k in sorted(k for k in m if k.startswith("eval_")):
        log.info("  %s = %.4g", k, m[k])
    log.info("checkpoint: %s", out.checkpoint)
    log.info("TRELLIS export: %s/trellis/%s_student.{json,safetensors}", out.checkpoint, cfg.run.name)
    if out.mlflow_run_id:
        log.info("MLflow run %s in %s", out.mlflow_run_id, resolve_uri(cfg.tracking.resolved_uri()))
    return 0


def check_corpus(cfg) -> None:
    """The training corpus named by data.uri exists and reads, before the run is announced."""
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.train.launch import naming

    with naming("data.uri"):
        read_manifest(StorageTarget.from_data_config(cfg.data))


main = main_for("distill", "MDT-dist distillation on Ray Train", add_arguments, run)
