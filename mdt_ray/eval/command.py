"""What `mdt-ray eval` (and jobs/evaluate.py) does, given a config and plain arguments: find the
checkpoint and its teacher, read the held-out corpus, run `evaluate`, and leave eval.json,
table.txt and renders.png in the output folder (and in MLflow when tracking is on). The argument
parsing lives in mdt_ray/cli/eval.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from mdt_ray.eval.report import LATENCY_BUDGET_S, evaluate, flat_metrics, format_table, stage_label
from mdt_ray.models.teachers import PACKAGED_TEACHER, from_root, resolve_model_path, run_teacher_of
from mdt_ray.stages import Split, Stage, stage_of_class


def _print(msg: str) -> None:
    logging.getLogger(__name__).info(msg)


def checkpoint_stage(json_path: str | Path) -> Stage:
    """The stage of a TRELLIS <name>.json, from its model class ("name")."""
    try:
        return stage_of_class(json.loads(Path(json_path).read_text()).get("name"))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{json_path}: {e}") from None


def limit_threads(threads: Optional[int]) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    # numpy's BLAS (FD's eigendecompositions) keeps its own pool, whose idle threads spin-wait
    # and, on a busy machine, slow everything down far more than they help.
    try:
        import threadpoolctl
    except ImportError:  # pinned, but optional for a bare `pip install --no-deps`: numpy keeps its pool
        return
    threadpoolctl.threadpool_limits(threads)


def choose_teacher(cfg, ckpt: Path, stage: Stage, teacher: Optional[str]) -> Optional[Path]:
    """The teacher's <name>.json: `teacher`, else model.teacher of the config when it is a path,
    else the one the run's state.json names, else the packaged teacher when it is of the
    checkpoint's stage; None for "none"."""
    from mdt_ray.models import NAMED_CONFIGS

    spec = teacher
    if spec is None:
        from_cfg = cfg.model.teacher if cfg.model.teacher not in NAMED_CONFIGS else None
        packaged = PACKAGED_TEACHER if checkpoint_stage(from_root(PACKAGED_TEACHER)) is stage else None
        spec = from_cfg or run_teacher_of(ckpt) or packaged
    if spec is None:
        raise ValueError(f"{ckpt} is a {stage_label(stage)} ({stage.name}) checkpoint and the packaged teacher "
                         f"{PACKAGED_TEACHER} is not: pass --teacher <{stage.name} teacher>.json (or --teacher none)")
    if spec in NAMED_CONFIGS:
        raise ValueError(f"teacher {spec!r} is a built-in size without trained weights; pass --teacher "
                         "<name>.json (or --teacher none)")
    if str(spec).lower() == "none":
        return None
    from mdt_ray.models.pipeline import resolve_teacher

    return resolve_model_path(resolve_teacher(str(spec), stage.name))


def load_held_out(cfg, stage: Stage, data_uri: str, assets: int) -> Split:
    """The first `assets` assets of the held-out corpus, through the config's storage settings."""
    from mdt_ray.data.storage import StorageTarget

    return stage.load(StorageTarget.from_data_config(cfg.data, data_uri), limit=assets)


def _given(sampler: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The sampler values the user set (None: the default), intervals as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (sampler or {}).items() if v is not None}


def write_report(result: dict[str, Any], out_dir: Path, json_path: Optional[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.txt").write_text(result["table"] + "\n")
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))


def run_eval(cfg, checkpoint: str, *, teacher: Optional[str] = None, data: Optional[str] = None, assets: int = 256,
             steps: Sequence[int] = (1, 2, 4, 25), sampler: Optional[dict[str, Any]] = None,
             teacher_sampler: Optional[dict[str, Any]] = None, seed: Optional[int] = None, batch: int = 64,
             latency_batch: int = 8, latency_repeats: int = 3, latency_budget: Optional[float] = LATENCY_BUDGET_S,
             render_assets: int = 8, device: Optional[str] = None,
             threads: Optional[int] = None, out: Optional[str] = None, json_path: Optional[str] = None,
             run_id: Optional[str] = None, log: Callable[[str], None] = _print) -> tuple[dict[str, Any], Path]:
    """Evaluate `checkpoint` (a <name>.json, checkpoint dir or run dir) against its teacher on the
    held-out corpus `data` (default data.eval_uri); returns (report, output folder). Sampler
    values left None take STUDENT_SAMPLER's and the checkpoint stage's teacher sampler's."""
    from mdt_ray.models import load_trellis

    limit_threads(threads)
    if assets < 2:
        raise ValueError(f"--assets must be >= 2 (FD and 1-NNA need two samples), got {assets}")
    ckpt = resolve_model_path(checkpoint)
    stage = checkpoint_stage(ckpt)
    teacher_path = choose_teacher(cfg, ckpt, stage, teacher)
    data_uri = data or cfg.data.eval_uri
    if not data_uri:
        raise ValueError("no held-out corpus: pass --data or set data.eval_uri")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_trellis(ckpt, device=device)
    teacher_model = load_trellis(teacher_path, device=device) if teacher_path is not None else None
    split = load_held_out(cfg, stage, data_uri, assets)
    # Made by the first file written into it: a run that fails before (a teacher of the wrong
    # stage, say) leaves no empty folder behind.
    out_dir = Path(out or f"runs/eval/{ckpt.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    renders = stage.decoder(split) is not None
    log(f"[eval] {ckpt} at steps {list(steps)} vs teacher {teacher_path or 'none'} on {len(split)} held-out assets "
        f"of {data_uri} ({device}, stage {stage.name})" + ("" if renders else "; no renders: no exact decoder "
                                                          "from these samples to voxels"))
    result = evaluate(model, split, teacher=teacher_model, steps=steps, sampler=_given(sampler),
                      teacher_sampler=_given(teacher_sampler), seed=cfg.train.seed if seed is None else seed,
                      batch_size=batch, device=device, latency_batch=latency_batch, latency_repeats=latency_repeats,
                      latency_budget_s=latency_budget, render_path=out_dir / "renders.png" if renders else None,
                      render_assets=render_assets, log=log)
    result["checkpoint"], result["data"] = str(ckpt), data_uri
    result["teacher_checkpoint"] = str(teacher_path) if teacher_path is not None else None
    result["table"] = format_table(result)
    write_report(result, out_dir, json_path)
    if cfg.tracking.enabled:
        result["mlflow_uri"], result["mlflow_run_id"] = log_mlflow(result, cfg, out_dir, run_id, ckpt)
        write_report(result, out_dir, json_path)
    return result, out_dir


def training_run_of(ckpt: Path) -> Optional[str]:
    """The MLflow run id of the distillation run whose checkpoint `ckpt` is: the run folder above a
    `checkpoint_*` folder records it (mdt_ray.train.state.RUN_META); None for any other file."""
    from mdt_ray.train.state import RUN_META

    for folder in Path(ckpt).resolve().parents:
        if folder.name.startswith("checkpoint_"):
            try:
                meta = json.loads((folder.parent / RUN_META).read_text())
            except (OSError, ValueError):
                return None
            return meta.get("mlflow_run_id") if isinstance(meta, dict) else None
    return None


def log_mlflow(result: dict[str, Any], cfg, out_dir: Path, run_id: Optional[str], ckpt: Path) -> tuple[str, str]:
    """Log the report's metrics (eval_<metric>_<k>step_<N>assets) and files into `run_id`, or into
    a new run of kind "eval"."""
    from mdt_ray.tracking import RunLogger, end_run, resolve_uri, start_run

    uri = resolve_uri(cfg.tracking.resolved_uri())
    new_run = run_id is None
    if new_run:
        s = result["settings"]
        params = {"eval.checkpoint": str(ckpt), "eval.teacher": result.get("teacher_checkpoint"),
                  "eval.data": result.get("data"), "eval.assets": s["assets"], "eval.seed": s["seed"],
                  "eval.device": s["device"], "eval.latency_batch": s["latency_batch"],
                  "eval.latency_budget_s": s["latency_budget_s"]}
        params.update({f"eval.sampler.{k}": v for k, v in s["sampler"].items()})
        params.update({f"eval.teacher_sampler.{k}": v for k, v in (s["teacher_sampler"] or {}).items()})
        tags = {"kind": "eval"}
        trained_in = training_run_of(ckpt)
        if trained_in:
            tags["mdt_ray.training_run_id"] = trained_in
        run_id = start_run(uri, cfg.tracking.experiment, f"eval-{ckpt.stem}", params, tags=tags)
    logger = RunLogger(uri, run_id)
    # The held-out asset count is part of each name: the run's in-training eval logs FDs of fewer
    # assets (train.eval_assets) under eval_<metric>_<k>step, and an FD depends on the count.
    assets = result["settings"]["assets"]
    logger.log_metrics({f"{k}_{assets}assets": v for k, v in flat_metrics(result).items()}, step=0)
    for name in ("eval.json", "table.txt", "renders.png"):
        if (out_dir / name).is_file():
            logger.log_artifact(out_dir / name, "eval")
    if new_run:
        end_run(uri, run_id)
    return uri, run_id
