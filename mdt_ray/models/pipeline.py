"""TRELLIS pipeline folders: finding a stage's flow checkpoint in one (a local folder or a Hugging
Face repository id such as `microsoft/TRELLIS-image-large[@revision]`), and writing the distilled
pipeline folder that `export-pipeline` hands back.

A pipeline folder holds `pipeline.json`, whose `args.models` maps model names to checkpoint paths
relative to the folder (`<path>.json` + `<path>.safetensors`), and one sampler per stage
(`<sampler>: {name, args: {sigma_min}, params: {steps, cfg_strength, cfg_interval, rescale_t}}`). Hub ids go through huggingface_hub, so its cache, `HF_HOME`,
`HF_HUB_OFFLINE` and revisions behave as for any other Hub user, on whichever node resolves them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from mdt_ray.models.teachers import ModelPathError, from_root

# pipeline.json's keys per stage: the flow model under args.models, and its sampler.
STAGE_KEYS: dict[str, tuple[str, str]] = {
    "ss": ("sparse_structure_flow_model", "sparse_structure_sampler"),
    "slat": ("slat_flow_model", "slat_sampler"),
}
# owner/name[@revision]: the shape of a Hub repository id (no scheme, exactly one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


class PipelineError(ModelPathError):
    """A pipeline folder or Hub id that does not give what was asked of it; the message says why."""


def split_hub_id(spec: str) -> Optional[tuple[str, Optional[str]]]:
    """(repository, revision or None) of a Hub id `owner/name[@revision]`; None for anything else."""
    if not _HUB_ID.match(spec):
        return None
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def is_pipeline(spec: str) -> bool:
    """Whether `spec` names a pipeline: a folder holding pipeline.json, or a Hub id that is no local path."""
    p = from_root(spec)
    if p.is_dir():
        return (p / "pipeline.json").is_file()
    return not p.exists() and not spec.endswith(".json") and split_hub_id(spec) is not None


def _hub_download(spec: str, filename: str) -> Path:
    """One file of Hub repository `spec` (owner/name[@rev]) from the local cache or the Hub."""
    import huggingface_hub
    from huggingface_hub import errors

    repo, revision = split_hub_id(spec)
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision))
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError,
            errors.LocalEntryNotFoundError) as e:
        where = huggingface_hub.constants.HF_HUB_CACHE
        offline = " (HF_HUB_OFFLINE is set: only the cache was looked in)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{filename} of Hugging Face repository {repo!r} at revision {revision or 'main'} not "
                            f"found in {where} or on the Hub{offline}: {type(e).__name__}: {reason}") from None


def read_pipeline(spec: str) -> tuple[dict[str, Any], Path]:
    """(pipeline.json's content, the folder it was read from) of a local folder or a Hub id."""
    p = from_root(spec)
    if p.is_dir():
        path = p / "pipeline.json"
        if not path.is_file():
            raise PipelineError(f"{p} is not a TRELLIS pipeline folder: no pipeline.json in it")
    elif split_hub_id(spec) is not None and not p.exists():
        path = _hub_download(spec, "pipeline.json")
    else:
        raise PipelineError(f"{spec}: neither a TRELLIS pipeline folder nor a Hugging Face repository id (owner/name)")
    try:
        pipeline = json.loads(path.read_text())
        pipeline["args"]["models"].items()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PipelineError(f"{path} is not a TRELLIS pipeline.json (expected {{'name', 'args': {{'models': "
                            "{...}}}})") from None
    return pipeline, path.parent


def stage_checkpoint(spec: str, stage: str) -> Path:
    """The `<name>.json` of `stage`'s flow model in pipeline `spec`, its `.safetensors` beside it
    (both fetched into the Hub cache for a Hub id)."""
    model_key = STAGE_KEYS[stage][0]
    pipeline, folder = read_pipeline(spec)
    rel = pipeline["args"]["models"].get(model_key)
    if not isinstance(rel, str):
        raise PipelineError(f"pipeline {spec} has no {model_key} (model.stage {stage!r}) in args.models of its "
                            f"pipeline.json; it has: {sorted(pipeline['args']['models'])}")
    if not from_root(spec).is_dir():
        for suffix in (".safetensors", ".json"):  # the json last: it is what the caller opens
            path = _hub_download(spec, f"{rel}{suffix}")
        return path
    path = folder / f"{rel}.json"
    for p in (path, path.with_suffix(".safetensors")):
        if not p.is_file():
            raise PipelineError(f"pipeline {spec}: {model_key} is {rel!r} in pipeline.json but {p} does not exist")
    return path


def resolve_teacher(spec: str, stage: str) -> str:
    """`model.teacher` as a built-in size or checkpoint path: a pipeline resolves to its stage's flow checkpoint."""
    from mdt_ray.models.registry import NAMED_CONFIGS

    if spec in NAMED_CONFIGS or not is_pipeline(spec):
        return spec
    return str(stage_checkpoint(spec, stage))


def _student(spec: str, stage: str, base_cfg: dict[str, Any]) -> tuple[Path, dict[str, Any], Optional[Path]]:
    """(json path, its config, the run checkpoint folder holding it if any) of the student given
    for `stage`, refused in one line when it is another stage's model or another shape than the base's."""
    from mdt_ray.models.checkpoint import check_trellis
    from mdt_ray.models.teachers import resolve_model_path
    from mdt_ray.stages import stage_of_class

    path = resolve_model_path(spec)
    try:
        cfg = json.loads(path.read_text())
        student_stage = stage_of_class(cfg.get("name", "")).name
    except (ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise PipelineError(f"--{stage} {spec}: {path} is no TRELLIS model config: {e}") from None
    if student_stage != stage:
        raise PipelineError(f"--{stage} {spec}: {path.name} is a {cfg['name']} (stage {student_stage!r}), not a "
                            f"stage-{stage!r} model")
    # Shape is what the weights hold: the json's args may spell defaults out or leave them out.
    shape, base_shape = _param_shapes(cfg), _param_shapes(base_cfg)
    if cfg["name"] != base_cfg["name"] or shape != base_shape:
        diff = sorted(k for k in set(shape) | set(base_shape) if shape.get(k) != base_shape.get(k))
        what = (f"{len(diff)} tensors differ, e.g. {diff[0]}: {shape.get(diff[0])} vs {base_shape.get(diff[0])}"
                if diff else f"model class {cfg['name']} vs {base_cfg['name']}")
        raise PipelineError(f"--{stage} {spec}: {path.name} does not have the shape of the base pipeline's "
                            f"{STAGE_KEYS[stage][0]} ({what})")
    check_trellis(path)
    run_ckpt = path.parent.parent if path.parent.name == "trellis" else None
    return path, cfg, run_ckpt


def _param_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each weight's shape in the model `cfg` describes, built on the meta device (no memory)."""
    import torch

    from mdt_ray.models.registry import build_model

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def _link_or_copy(src: Path, dst: Path) -> None:
    """A symlink to the real file (Hub cache entries are themselves links into its blobs), or a
    copy where the file system has no links."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src.resolve(), dst)


def _base_folder(spec: str) -> Path:
    """The base pipeline as a local folder: itself, or its Hub snapshot (all files, cached)."""
    p = from_root(spec)
    if p.is_dir():
        read_pipeline(spec)
        return p
    read_pipeline(spec)  # a missing repo or pipeline.json is a one-line PipelineError
    import huggingface_hub

    repo, revision = split_hub_id(spec)
    return Path(huggingface_hub.snapshot_download(repo, revision=revision))


def export_pipeline(base: str, students: dict[str, str], steps: int, out: str | os.PathLike) -> Path:
    """Write the distilled pipeline folder `out`: the base's pipeline.json with each stage in
    `students` ({"ss": run or checkpoint, ...}) pointing at its student under ckpts/ and sampled
    the way the student was evaluated (STUDENT_SAMPLER, `steps` steps), the base's other models
    linked, and a model card. Every input is checked before anything is written."""
    from mdt_ray.stages import STUDENT_SAMPLER

    if steps not in (1, 2):
        raise PipelineError(f"--steps {steps}: a distilled student samples with 1 or 2 steps")
    if not students:
        raise PipelineError("give at least one student (--ss and/or --slat)")
    pipeline, _ = read_pipeline(base)
    folder = _base_folder(base)
    models = pipeline["args"]["models"]
    chosen = {}
    for stage, spec in students.items():
        model_key, sampler_key = STAGE_KEYS[stage]
        if model_key not in models:
            raise PipelineError(f"base pipeline {base} has no {model_key} for --{stage}; it has: {sorted(models)}")
        if not isinstance(pipeline["args"].get(sampler_key), dict):
            raise PipelineError(f"base pipeline {base} has no {sampler_key} in its pipeline.json")
        base_json = folder / f"{models[model_key]}.json"
        chosen[stage] = _student(spec, stage, json.loads(base_json.read_text()))

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"--out {out} exists and is not empty")
    (out / "ckpts").mkdir(parents=True, exist_ok=True)
    replaced = {STAGE_KEYS[s][0] for s in chosen}
    for key, rel in models.items():
        if key not in replaced:
            for suffix in (".json", ".safetensors"):
                _link_or_copy(folder / f"{rel}{suffix}", out / f"{rel}{suffix}")
    for stage, (path, _, _) in chosen.items():
        model_key, sampler_key = STAGE_KEYS[stage]
        name = f"ckpts/{model_key}_mdt_{steps}step"
        for suffix in (".safetensors", ".json"):
            shutil.copy2(path.with_suffix(suffix), out / f"{name}{suffix}")
        models[model_key] = name
        # TRELLIS's pipeline takes a stage's sampler settings from args.<sampler>.params.
        params = pipeline["args"][sampler_key].setdefault("params", {})
        params.update(steps=steps, cfg_strength=STUDENT_SAMPLER["cfg_strength"],
                      cfg_interval=list(STUDENT_SAMPLER["cfg_interval"]), rescale_t=STUDENT_SAMPLER["rescale_t"])
    (out / "pipeline.json").write_text(json.dumps(pipeline, indent=4) + "\n")
    (out / "README.md").write_text(model_card(base, chosen, steps))
    return out


def student_run_id(spec: str) -> Optional[str]:
    """The MLflow run id recorded in the state.json of the run checkpoint holding student `spec`."""
    from mdt_ray.models.teachers import resolve_model_path

    path = resolve_model_path(spec)
    state = _run_state(path.parent.parent if path.parent.name == "trellis" else None)
    return state.get("mlflow_run_id")


def _run_state(run_ckpt: Optional[Path]) -> dict[str, Any]:
    if run_ckpt is None or not (run_ckpt / "state.json").is_file():
        return {}
    try:
        return json.loads((run_ckpt / "state.json").read_text())
    except ValueError:
        return {}


def model_card(base: str, chosen: dict[str, tuple[Path, dict, Optional[Path]]], steps: int) -> str:
    """README.md of the exported folder: what each student was distilled from, how, for how long, and its eval."""
    from mdt_ray.stages import STUDENT_SAMPLER

    lines = [f"# Distilled TRELLIS pipeline ({steps}-step)", "",
             f"Base pipeline: `{base}`. Flow models replaced by MDT-dist students (mdt-ray), sampled with "
             f"{steps} step(s), cfg_strength {STUDENT_SAMPLER['cfg_strength']:g}, rescale_t "
             f"{STUDENT_SAMPLER['rescale_t']:g}, as they were evaluated. Load it as the base: "
             "`TrellisImageTo3DPipeline.from_pretrained(<this folder>)`.", ""]
    for stage, (path, cfg, run_ckpt) in chosen.items():
        state = _run_state(run_ckpt)
        config = state.get("config", {})
        lines += [f"## {STAGE_KEYS[stage][0]} ({cfg['name']})", "", f"- student: `{path}`"]
        if config:
            lines += [f"- teacher: `{config.get('model', {}).get('teacher')}`",
                      f"- recipe: `{json.dumps(config.get('distill', {}), sort_keys=True)}`",
                      f"- budget: {config.get('train', {}).get('steps')} steps, batch "
                      f"{config.get('train', {}).get('batch_size')}, trained to step {state.get('step')}"]
        evals = {k: v for k, v in state.get("metrics", {}).items() if k.startswith("eval_")} if state else {}
        if evals:
            lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(evals.items())
                                                                 if isinstance(v, (int, float))]
        lines.append("")
    return "\n".join(lines)
