"""`mdt-ray pretrain-teacher` / `mdt-ray pretrain-slat-teacher` / `python jobs/pretrain_teacher.py`:
flow-matching pre-training of a small benchmark teacher (mdt_ray/pretrain.py). The stage-2
command is this one with `--stage slat` as its default."""

from __future__ import annotations

import argparse
import logging

from mdt_ray.cli._common import add_config_args, main_for

# The packaged assets hold the stage-1 teacher only; a stage-2 teacher goes to a run folder.
DEFAULT_OUT = {"ss": "mdt_ray/assets", "slat": "runs/slat-teacher"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--stage", choices=sorted(DEFAULT_OUT), default="ss",
                        help="the TRELLIS stage of the teacher: ss (stage 1) or slat (stage 2); picks the defaults")
    parser.add_argument("--out", default=None, help="folder for <name>.json + <name>.safetensors (default: "
                        + ", ".join(f"{v} for {k}" for k, v in DEFAULT_OUT.items()) + ")")
    parser.add_argument("--name", default=None, help="checkpoint name (default: run.name)")
    parser.add_argument("--eval-steps", type=int, default=25, help="sampler steps of the final held-out eval")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also export the EMA weights every N steps to <out>/snapshots/ (0: only at the end)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a machine whose cores are "
                             "busy with other work, 1 is faster than 2: idle BLAS threads spin-wait")


def run(args: argparse.Namespace) -> int:
    import torch

    from mdt_ray.pretrain import load_pretrain_config, pretrain
    from mdt_ray.train.launch import RunError

    cfg = load_pretrain_config(args.config, args.overrides, stage=args.stage)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        pretrain(cfg, args.out or DEFAULT_OUT[args.stage], args.name or cfg.run.name, eval_steps=args.eval_steps,
                 snapshot_every=args.snapshot_every, log=logging.getLogger(__name__).info)
    except FloatingPointError as e:
        raise RunError(str(e)) from None
    return 0


main = main_for("pretrain_teacher", "flow-matching pre-training of a small benchmark teacher", add_arguments, run)
