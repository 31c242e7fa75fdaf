"""`mdt-ray distill` / `python jobs/distill.py`: load the config, run, summarise."""

from __future__ import annotations

import argparse

from mdt_ray.cli._common import add_config_args, main_for
from mdt_ray.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named run.name from its latest checkpoint")


def run(args: argparse.Namespace) -> int:
    from mdt_ray.train.launch import distill

    cfg = load_config(args.config, args.overrides)
    print(f"[mdt-ray] distilling {cfg.model.teacher} ({cfg.model.stage}, {cfg.distill.method}) on {cfg.data.uri} "
          f"with {cfg.scale.num_workers} worker(s), {cfg.train.steps} steps -> {cfg.run.storage_path}/{cfg.run.name}",
          flush=True)
    out = distill(cfg, resume=args.resume)
    m = out.metrics
    print(f"[mdt-ray] done: step {m.get('step')} loss {m.get('loss', float('nan')):.4g}")
    for k in sorted(k for k in m if k.startswith("eval_")):
        print(f"[mdt-ray]   {k} = {m[k]:.4g}")
    print(f"[mdt-ray] checkpoint: {out.checkpoint}")
    print(f"[mdt-ray] TRELLIS export: {out.checkpoint}/trellis/{cfg.run.name}_student.{{json,safetensors}}")
    if out.mlflow_run_id:
        print(f"[mdt-ray] MLflow run {out.mlflow_run_id} in {cfg.tracking.resolved_uri()}")
    return 0


main = main_for("distill", "MDT-dist distillation on Ray Train", add_arguments, run)
