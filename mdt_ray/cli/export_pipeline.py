"""`mdt-ray export-pipeline`: a TRELLIS pipeline folder whose flow models are the distilled
students, sampled as they were evaluated, that TRELLIS's own `from_pretrained` loads unchanged;
optionally the artifact of a new MLflow registered model version (mdt_ray.models.pipeline does the work)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

DESCRIPTION = "a TRELLIS pipeline folder with the flow models replaced by distilled students"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base TRELLIS pipeline: a folder with pipeline.json, or a "
                        "Hugging Face id such as microsoft/TRELLIS-image-large[@revision]")
    parser.add_argument("--ss", default=None, help="stage-1 student: a run dir, run checkpoint dir or <name>.json")
    parser.add_argument("--slat", default=None, help="stage-2 student: a run dir, run checkpoint dir or <name>.json")
    parser.add_argument("--steps", type=int, required=True, choices=(1, 2), help="sampler steps of each student")
    parser.add_argument("--out", required=True, help="the pipeline folder to write (new or empty)")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="also log the folder to MLflow run --run-id and register it as a version of model NAME")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --register")
    parser.add_argument("--run-id", default=None, help="MLflow run for --register (default: the --ss student's run)")


def run(args: argparse.Namespace) -> int:
    from mdt_ray.models.pipeline import PipelineError, export_pipeline, student_run_id

    students = {s: getattr(args, s) for s in ("ss", "slat") if getattr(args, s)}
    if args.register and not args.tracking_uri:
        raise PipelineError("--register needs --tracking-uri")
    out = export_pipeline(args.base, students, args.steps, args.out)
    log.info("[export-pipeline] wrote %s", out)
    if args.register:
        from mdt_ray import tracking

        run_id = args.run_id or student_run_id(next(iter(students.values())))
        if not run_id:
            raise PipelineError(f"{next(iter(students.values()))} records no MLflow run: pass --run-id")
        tracking._client(args.tracking_uri).log_artifacts(run_id, str(out), "pipeline")
        version = tracking.register_model(args.tracking_uri, run_id, args.register, "pipeline")
        log.info("[export-pipeline] registered model %r version %s (artifact 'pipeline' of run %s)",
                 args.register, version, run_id)
    print(out, flush=True)
    return 0
