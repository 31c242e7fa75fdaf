"""`mdt-ray eval CHECKPOINT` and jobs/evaluate.py: few-step quality and speed-up of a checkpoint
against its teacher on held-out conditions (mdt_ray.eval.command does the work)."""

from __future__ import annotations

import argparse
import logging

from mdt_ray.cli._common import add_config_args, main_for

log = logging.getLogger(__name__)
from mdt_ray.config import load_config

DESCRIPTION = "few-step quality and speed-up of a checkpoint against its teacher on held-out conditions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("checkpoint", help="TRELLIS <name>.json, a run checkpoint dir (with trellis/*.json), "
                        "or a run dir (its latest checkpoint)")
    parser.add_argument("--teacher", default=None, help="teacher <name>.json (default: model.teacher of "
                        "--config/--set, else of the run's state.json, else the packaged stage-1 teacher); "
                        "'none' skips it")
    parser.add_argument("--data", default=None, help="held-out corpus (default: data.eval_uri)")
    parser.add_argument("--assets", type=int, default=256, help="held-out assets to sample (default 256)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 25], help="step counts for the checkpoint")
    parser.add_argument("--cfg", type=float, default=None,
                        help="checkpoint's guidance strength (default 0: a distilled student has guidance built in)")
    parser.add_argument("--interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="checkpoint's guidance interval (default: the whole of [0, 1])")
    parser.add_argument("--rescale-t", type=float, default=None, help="checkpoint's time-grid warp (default: none)")
    teacher = "the TRELLIS teacher sampler of the checkpoint's stage"
    parser.add_argument("--teacher-steps", type=int, default=None, help=f"(default: {teacher})")
    parser.add_argument("--teacher-cfg", type=float, default=None, help=f"(default: {teacher})")
    parser.add_argument("--teacher-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help=f"(default: {teacher})")
    parser.add_argument("--teacher-rescale-t", type=float, default=None, help=f"(default: {teacher})")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: train.seed)")
    parser.add_argument("--batch", type=int, default=64, help="sampling batch for the quality metrics")
    parser.add_argument("--latency-batch", type=int, default=8, help="batch for the latency timing")
    parser.add_argument("--latency-repeats", type=int, default=3, help="timed rounds at most (default 3); the "
                        "median round counts")
    # The default is mdt_ray.eval.report.LATENCY_BUDGET_S, written out: that module imports torch.
    parser.add_argument("--latency-budget", type=float, default=120.0, metavar="SECONDS",
                        help="seconds the latency timing may take, warm-up included: no round starts that would "
                        "not fit, but one always runs (default 120)")
    parser.add_argument("--render-assets", type=int, default=8, help="columns of the render grid")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for eval.json, renders.png and table.txt "
                        "(default: runs/eval/<checkpoint>-<time>)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run instead of a new one")


def run(args: argparse.Namespace) -> int:
    from mdt_ray.eval.command import run_eval

    cfg = load_config(args.config, args.overrides)
    result, out_dir = run_eval(
        cfg, args.checkpoint, teacher=args.teacher, data=args.data, assets=args.assets, steps=args.steps,
        sampler={"cfg_strength": args.cfg, "cfg_interval": args.interval, "rescale_t": args.rescale_t},
        teacher_sampler={"steps": args.teacher_steps, "cfg_strength": args.teacher_cfg,
                         "cfg_interval": args.teacher_interval, "rescale_t": args.teacher_rescale_t},
        seed=args.seed, batch=args.batch, latency_batch=args.latency_batch, latency_repeats=args.latency_repeats,
        latency_budget=args.latency_budget, render_assets=args.render_assets, device=args.device, threads=args.threads,
        out=args.out, json_path=args.json_path, run_id=args.run_id)
    print(result.pop("table"), flush=True)
    log.info("[eval] report: %s; renders: %s", out_dir / "eval.json", result.get("render", "-"))
    if args.json_path:
        log.info("[eval] JSON: %s", args.json_path)
    if result.get("mlflow_run_id"):
        log.info("[eval] MLflow run %s in %s", result["mlflow_run_id"], result["mlflow_uri"])
    return 0


main = main_for("evaluate", DESCRIPTION, add_arguments, run)
