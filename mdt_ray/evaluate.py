"""Few-step sampling of a checkpoint on held-out conditions, scored against held-out latents.

`quick_eval` is the cheap in-training eval (the metric a sweep's early stopping reads): the
Fréchet distance of latent features (mdt_ray.metrics) and, for corpora whose latents decode
exactly to voxels (the synthetic benchmark), the IoU with the shape behind each condition.

`evaluate_model` is the full evaluation behind `mdt-ray eval` / `jobs/evaluate.py`: a checkpoint
sampled at several step counts next to the teacher at 25 guided steps, on the same noise and the
same held-out conditions, scored by FD, IoU with the ground-truth shape, COV / MMD / 1-NNA
(distance 1 − IoU), latency per sample and speed-up over the teacher, plus a PNG grid of renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mdt_ray import flow, metrics


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    steps: int,
    cfg_strength: float = 0.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    rescale_t: float = 1.0,
    latent_shape: Sequence[int] = (8, 16, 16, 16),
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Samples (N, *latent_shape) for N conditions, noise seeded per call for comparability."""
    device = cond.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(cond.shape[0], *latent_shape, generator=g).to(device)
    out = []
    for i in range(0, cond.shape[0], batch_size):
        c = cond[i : i + batch_size]
        out.append(flow.sample(model, noise[i : i + batch_size], c, torch.zeros_like(c), steps=steps,
                               cfg_strength=cfg_strength, cfg_interval=cfg_interval, rescale_t=rescale_t))
    return torch.cat(out).float()


def score(samples: np.ndarray, reference: np.ndarray, decode: Optional[Callable[[np.ndarray], np.ndarray]] = None,
          *, shape_metrics: bool = False) -> dict[str, float]:
    """FD between sample and reference latents; with `decode`, IoU of each sample with the
    reference shape of the same condition (and COV/MMD/1-NNA when `shape_metrics`)."""
    out = {"fd": metrics.frechet_distance(metrics.latent_features(samples), metrics.latent_features(reference))}
    if decode is not None:
        gen_occ, ref_occ = decode(samples), decode(reference)
        out["iou"] = float(np.mean(metrics.iou(gen_occ, ref_occ)))
        if shape_metrics:
            out.update(metrics.shape_metrics(gen_occ, ref_occ))
    return out


def synthetic_decoder(source: dict) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The exact latent→voxel decoder for corpora built by mdt_ray.data.synthetic (manifest
    `source.kind == "synthetic"`); TRELLIS latents need TRELLIS's VAE decoder, so None."""
    if not isinstance(source, dict) or source.get("kind") != "synthetic":
        return None
    from mdt_ray.data.synthetic import decode_ss

    return decode_ss


def quick_eval(
    model: torch.nn.Module,
    x0: np.ndarray,
    cond: np.ndarray,
    *,
    steps: Sequence[int] = (1, 2),
    device: torch.device | str = "cpu",
    decode: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    seed: int = 0,
) -> dict[str, float]:
    """{"eval_fd_<k>step": ..., "eval_iou_<k>step": ...} for each step count k."""
    was_training = model.training
    model.eval()
    c = torch.as_tensor(cond, dtype=torch.float32, device=device)
    result: dict[str, float] = {}
    try:
        for k in steps:
            samples = generate(model, c, steps=k, latent_shape=x0.shape[1:], seed=seed).cpu().numpy()
            for name, value in score(samples, x0, decode).items():
                result[f"eval_{name}_{k}step"] = float(value)
    finally:
        model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------
# Full evaluation: samplers, latency, renders, the report

# The teacher as TRELLIS runs its stage 1 (spec §3.4): the guidance-interval Euler sampler,
# 25 steps, guidance on t ∈ [0.5, 1], time grid warped by rescale_t = 3. TRELLIS-L uses guidance
# 7.5; our 1.45M-parameter teacher was scored at 25 steps on a validation corpus for guidance 0 to 3
# (`benchmarks/quality.py --tune-teacher`, docs/benchmark.md): FD grows with the guidance
# (3.6 at 0, 6.4 at 1, 19 at 3) while IoU peaks at 1 (0.392 → 0.413). 1.0 keeps guidance in
# the loop, as TRELLIS does, at a modest cost in FD.
TEACHER_SAMPLER: dict[str, Any] = {"steps": 25, "cfg_strength": 1.0, "cfg_interval": (0.5, 1.0), "rescale_t": 3.0}
# A distilled student has the teacher's guidance built in (its targets are guided velocities), so
# it samples without CFG, on the plain grid that MDT-dist's own few-step snapshots use.
STUDENT_SAMPLER: dict[str, Any] = {"cfg_strength": 0.0, "cfg_interval": (0.0, 1.0), "rescale_t": 1.0}
METRICS = ("fd", "iou", "cov", "mmd", "nna")
# Two views per rendered shape: the conditioning camera (what the model saw) and the opposite
# side (what it had to infer).
RENDER_VIEWS: tuple[tuple[float, float], ...] = ((45.0, 30.0), (225.0, 30.0))
RENDER_CELL = 64
_LABEL_W, _HEADER_H, _GAP = 132, 14, 4


def sampler_nfe(steps: int, sampler: dict[str, Any]) -> int:
    return flow.num_function_evals(steps, sampler.get("cfg_strength", 0.0), tuple(sampler.get("cfg_interval", (0.0, 1.0))),
                                   sampler.get("rescale_t", 1.0))


def _sample_kwargs(sampler: dict[str, Any]) -> dict[str, Any]:
    return {"cfg_strength": float(sampler.get("cfg_strength", 0.0)),
            "cfg_interval": tuple(sampler.get("cfg_interval", (0.0, 1.0))),
            "rescale_t": float(sampler.get("rescale_t", 1.0))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(entries: dict[str, tuple[torch.nn.Module, int, dict[str, Any]]], cond: torch.Tensor, *,
                    latent_shape: Sequence[int] = (8, 16, 16, 16), repeats: int = 3, seed: int = 0,
                    noise: Any = None) -> dict[str, float]:
    """Seconds per sample of each (model, steps, sampler), one batch of `cond` at a time, from
    `noise` (seeded Gaussian of `latent_shape` when None; a SparseBatch for stage 2).

    Every entry is timed once per round, round after round (interleaved), after one untimed
    warm-up call each, and the fastest round counts: on a shared machine the minimum is the
    estimate least inflated by other work, and interleaving exposes every entry to the same load.
    """
    if repeats < 1:
        raise ValueError(f"latency repeats must be >= 1, got {repeats}")
    device = cond.device
    if noise is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(cond.shape[0], *latent_shape, generator=g).to(device)
    neg = torch.zeros_like(cond)
    best = {name: float("inf") for name in entries}
    for round_ in range(repeats + 1):
        for name, (model, steps, sampler) in entries.items():
            _sync(device)
            start = time.perf_counter()
            flow.sample(model, noise, cond, neg, steps=steps, **_sample_kwargs(sampler))
            _sync(device)
            elapsed = time.perf_counter() - start
            if round_ > 0:  # round 0 warms caches and allocators up
                best[name] = min(best[name], elapsed / cond.shape[0])
    return best


def speedups(latency: dict[str, float], reference: str) -> dict[str, float]:
    """latency[reference] / latency[name] for every entry (the reference itself is 1)."""
    if reference not in latency:
        raise KeyError(f"no latency measured for the reference {reference!r}; have {sorted(latency)}")
    return {name: latency[reference] / value for name, value in latency.items()}


def grid_size(n_rows: int, n_cols: int, *, cell: int = RENDER_CELL, views: int = len(RENDER_VIEWS)) -> tuple[int, int]:
    """(width, height) in pixels of the `render_grid` image."""
    return (_LABEL_W + n_cols * (views * cell + _GAP), _HEADER_H + n_rows * (cell + _GAP))


def render_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, *, cell: int = RENDER_CELL,
                views: Sequence[tuple[float, float]] = RENDER_VIEWS, column_labels: Optional[Sequence[str]] = None
                ) -> Path:
    """Write a PNG: one row per (label, occupancy (N, 32, 32, 32)), one column per asset, each
    cell the shape rendered from every view in `views`, side by side."""
    from PIL import Image, ImageDraw

    from mdt_ray.data.synthetic import render_view

    if not rows:
        raise ValueError("render_grid needs at least one row")
    n_cols = rows[0][1].shape[0]
    for label, occ in rows:
        if occ.shape[0] != n_cols or occ.dtype != np.bool_:
            raise ValueError(f"render_grid row {label!r}: expected ({n_cols}, 32, 32, 32) bool occupancy, "
                             f"got {occ.shape} {occ.dtype}")
    width, height = grid_size(len(rows), n_cols, cell=cell, views=len(views))
    canvas = np.full((height, width), 40, dtype=np.uint8)  # dark grey separates black backgrounds
    for r, (_, occ) in enumerate(rows):
        top = _HEADER_H + r * (cell + _GAP)
        for v, (az, el) in enumerate(views):
            imgs = render_view(occ, size=cell, azimuth=az, elevation=el)
            for c in range(n_cols):
                left = _LABEL_W + c * (len(views) * cell + _GAP) + v * cell
                canvas[top : top + cell, left : left + cell] = np.clip(imgs[c] * 255.0, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    for r, (label, _) in enumerate(rows):
        draw.text((4, _HEADER_H + r * (cell + _GAP) + cell // 2 - 6), label, fill=(255, 255, 255))
    for c in range(n_cols):
        text = column_labels[c] if column_labels is not None else f"#{c}"
        draw.text((_LABEL_W + c * (len(views) * cell + _GAP) + 2, 1), text, fill=(200, 200, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def sample_and_score(model: torch.nn.Module, held: dict[str, Any], *, steps: int, sampler: dict[str, Any],
                     decode: Optional[Callable[[np.ndarray], np.ndarray]], seed: int = 0, batch_size: int = 64,
                     device: torch.device | str = "cpu") -> tuple[np.ndarray, dict[str, float]]:
    """Samples for every held-out condition and their scores (FD always; IoU, COV, MMD, 1-NNA
    when latents decode to voxels)."""
    cond = torch.as_tensor(held["cond"], dtype=torch.float32, device=device)
    samples = generate(model, cond, steps=steps, latent_shape=held["x0"].shape[1:], seed=seed,
                       batch_size=batch_size, **_sample_kwargs(sampler)).cpu().numpy()
    return samples, score(samples, held["x0"], decode, shape_metrics=decode is not None)


def evaluate_model(
    model: torch.nn.Module,
    held: dict[str, Any],
    *,
    teacher: Optional[torch.nn.Module],
    steps: Sequence[int] = (1, 2, 4, 25),
    sampler: Optional[dict[str, Any]] = None,
    teacher_sampler: Optional[dict[str, Any]] = None,
    decode: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    latency_batch: int = 8,
    latency_repeats: int = 3,
    render_path: Optional[str | Path] = None,
    render_assets: int = 8,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """The report of `mdt-ray eval`: {"steps": {"<k>": metrics}, "teacher": metrics, "settings": ...}.

    Every sampler starts from the same noise for the same condition, so the renders compare what
    each one makes of the same starting point. Latency is timed on the first `latency_batch`
    conditions, teacher and checkpoint interleaved on the same device (`measure_latency`); the
    speed-up of each step count is the teacher's latency over its own.
    """
    log = log or (lambda _msg: None)
    sampler = {**STUDENT_SAMPLER, **(sampler or {})}
    teacher_sampler = {**TEACHER_SAMPLER, **(teacher_sampler or {})}
    device = torch.device(device)
    steps = [int(k) for k in steps]
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of positive step counts, got {steps}")
    n = held["x0"].shape[0]
    if n < 2:
        raise ValueError(f"the held-out set needs at least 2 assets for FD and 1-NNA, got {n}")
    model = model.to(device).eval()
    models = {f"{k}": (model, k, sampler) for k in steps}
    generated: dict[str, np.ndarray] = {}
    result: dict[str, Any] = {"steps": {}, "teacher": None}
    for k in steps:
        t0 = time.perf_counter()
        generated[str(k)], scores = sample_and_score(model, held, steps=k, sampler=sampler, decode=decode,
                                                     seed=seed, batch_size=batch_size, device=device)
        result["steps"][str(k)] = {**scores, "nfe": sampler_nfe(k, sampler)}
        log(f"[eval] {k} step(s): " + _fmt_scores(scores) + f" ({time.perf_counter() - t0:.0f}s)")
    if teacher is not None:
        teacher = teacher.to(device).eval()
        t0 = time.perf_counter()
        generated["teacher"], scores = sample_and_score(
            teacher, held, steps=teacher_sampler["steps"], sampler=teacher_sampler, decode=decode, seed=seed,
            batch_size=batch_size, device=device)
        result["teacher"] = {**scores, "nfe": sampler_nfe(teacher_sampler["steps"], teacher_sampler),
                             "steps": teacher_sampler["steps"]}
        models["teacher"] = (teacher, teacher_sampler["steps"], teacher_sampler)
        log(f"[eval] teacher {teacher_sampler['steps']} steps: " + _fmt_scores(scores)
            + f" ({time.perf_counter() - t0:.0f}s)")

    lat_cond = torch.as_tensor(held["cond"][: max(1, min(latency_batch, n))], dtype=torch.float32, device=device)
    latency = measure_latency(models, lat_cond, latent_shape=held["x0"].shape[1:], repeats=latency_repeats, seed=seed)
    ups = speedups(latency, "teacher") if "teacher" in latency else {}
    for name, entry in [(str(k), result["steps"][str(k)]) for k in steps] + [("teacher", result["teacher"])]:
        if entry is None:
            continue
        entry["latency_s"] = latency[name]
        if ups:
            entry["speedup"] = ups[name]

    if render_path is not None and decode is not None:
        m = min(render_assets, n)
        rows = [("ground truth", decode(held["x0"][:m]))]
        if "teacher" in generated:
            rows.append((f"teacher {teacher_sampler['steps']} steps", decode(generated["teacher"][:m])))
        rows += [(f"{k} step" + ("s" if k > 1 else ""), decode(generated[str(k)][:m])) for k in steps]
        ids = [str(a)[-6:] for a in held.get("asset_id", [])[:m]] or None
        render_grid(rows, render_path, column_labels=ids)
        result["render"] = str(render_path)

    result["settings"] = {
        "assets": n, "seed": seed, "device": str(device), "latency_batch": int(lat_cond.shape[0]),
        "latency_repeats": latency_repeats, "sampler": _jsonable(sampler),
        "teacher_sampler": _jsonable(teacher_sampler) if teacher is not None else None,
    }
    return result


def _jsonable(sampler: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sampler.items()}


def _fmt_scores(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={scores[k]:.4g}" for k in METRICS if k in scores)


# The quality columns of the stage-1 table: (result key, header, width, format).
SS_COLUMNS: tuple[tuple[str, str, int, str], ...] = (
    ("fd", "FD", 10, ".3f"), ("iou", "IoU", 8, ".3f"), ("cov", "COV", 8, ".3f"), ("mmd", "MMD", 8, ".3f"),
    ("nna", "1-NNA", 8, ".3f"))


def format_table(result: dict[str, Any], columns: Sequence[tuple[str, str, int, str]] = SS_COLUMNS) -> str:
    """The report as a fixed-width text table, teacher first; `columns` picks the quality metrics."""
    head = (f"{'sampler':<22}{'NFE':>5}" + "".join(f"{title:>{width}}" for _, title, width, _ in columns)
            + f"{'ms/sample':>11}{'speed-up':>10}")
    lines = [head, "-" * len(head)]

    def row(label: str, e: dict[str, Any]) -> str:
        cells = [f"{label:<22}", f"{e.get('nfe', 0):>5d}"]
        for key, _, width, fmt in columns:
            cells.append(f"{e[key]:>{width}{fmt}}" if key in e else f"{'-':>{width}}")
        cells.append(f"{e['latency_s'] * 1e3:>11.2f}" if "latency_s" in e else f"{'-':>11}")
        cells.append(f"{e['speedup']:>9.1f}x" if "speedup" in e else f"{'-':>10}")
        return "".join(cells)

    if result.get("teacher"):
        t = result["teacher"]
        w = (result.get("settings") or {}).get("teacher_sampler") or {}
        lines.append(row(f"teacher {t.get('steps', '')} (cfg {w.get('cfg_strength', '?')})", t))
    for k, e in result["steps"].items():
        lines.append(row(f"checkpoint {k} step" + ("s" if int(k) > 1 else ""), e))
    return "\n".join(lines)


def flat_metrics(result: dict[str, Any], names: Sequence[str] = METRICS) -> dict[str, float]:
    """MLflow metric names: eval_<metric>_<k>step (quick_eval's names) and eval_teacher_<metric>."""
    out: dict[str, float] = {}
    keys = tuple(names) + ("latency_s", "speedup", "nfe")
    for k, e in result["steps"].items():
        out.update({f"eval_{m}_{k}step": float(e[m]) for m in keys if m in e})
    if result.get("teacher"):
        out.update({f"eval_teacher_{m}": float(result["teacher"][m]) for m in keys if m in result["teacher"]})
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints: what `mdt-ray eval` accepts

PACKAGED_TEACHER = "mdt_ray/assets/teacher_ss_demo.json"


def resolve_model_path(path: str | Path) -> Path:
    """A TRELLIS `<name>.json` from a json path, a checkpoint dir (its `trellis/*.json`, or a json
    beside the weights), or a run dir (its latest `checkpoint_*`). Relative paths not found from
    the cwd are tried from the repository (or installed package) root, so the packaged teacher
    resolves from anywhere."""
    p = Path(path)
    if not p.exists() and not p.is_absolute():
        alt = Path(__file__).resolve().parents[1] / p
        if alt.exists():
            p = alt
    if p.is_file():
        if p.suffix != ".json":
            raise ValueError(f"{p}: expected a TRELLIS <name>.json (with <name>.safetensors beside it)")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for folder in (p / "trellis", p):
        found = sorted(j for j in folder.glob("*.json") if j.with_suffix(".safetensors").is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{folder} holds several TRELLIS checkpoints ({', '.join(j.name for j in found)}); "
                             "pass the .json of the one to evaluate")
    ckpts = sorted(c for c in p.glob("checkpoint_*") if c.is_dir())
    if ckpts:
        return resolve_model_path(ckpts[-1])
    raise FileNotFoundError(f"no TRELLIS <name>.json + <name>.safetensors in {p} (looked in {p}/trellis, {p} "
                            "and its checkpoint_* folders)")


def run_teacher_of(path: Path) -> Optional[str]:
    """model.teacher recorded in the state.json of the run checkpoint that holds `path`, if any."""
    for folder in (path.parent, path.parent.parent):
        state = folder / "state.json"
        if state.is_file():
            try:
                teacher = json.loads(state.read_text()).get("config", {}).get("model", {}).get("teacher")
            except (json.JSONDecodeError, AttributeError):
                return None
            return teacher if isinstance(teacher, str) else None
    return None


# ---------------------------------------------------------------------------------------------
# The command: `mdt-ray eval` and jobs/evaluate.py


def add_arguments(parser) -> None:
    from mdt_ray.config import add_config_args

    add_config_args(parser)
    parser.add_argument("checkpoint", help="TRELLIS <name>.json, a run checkpoint dir (with trellis/*.json), "
                        "or a run dir (its latest checkpoint)")
    parser.add_argument("--teacher", default=None, help="teacher <name>.json (default: model.teacher of "
                        f"--config/--set, else of the run's state.json, else {PACKAGED_TEACHER}); 'none' skips it")
    parser.add_argument("--data", default=None, help="held-out corpus (default: data.eval_uri)")
    parser.add_argument("--assets", type=int, default=256, help="held-out assets to sample (default 256)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 25], help="step counts for the checkpoint")
    parser.add_argument("--cfg", type=float, default=STUDENT_SAMPLER["cfg_strength"],
                        help="checkpoint's guidance strength (0: a distilled student has guidance built in)")
    parser.add_argument("--interval", type=float, nargs=2, default=list(STUDENT_SAMPLER["cfg_interval"]),
                        metavar=("LO", "HI"), help="checkpoint's guidance interval")
    parser.add_argument("--rescale-t", type=float, default=STUDENT_SAMPLER["rescale_t"],
                        help="checkpoint's time-grid warp")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_SAMPLER["steps"])
    parser.add_argument("--teacher-cfg", type=float, default=TEACHER_SAMPLER["cfg_strength"])
    parser.add_argument("--teacher-interval", type=float, nargs=2, default=list(TEACHER_SAMPLER["cfg_interval"]),
                        metavar=("LO", "HI"))
    parser.add_argument("--teacher-rescale-t", type=float, default=TEACHER_SAMPLER["rescale_t"])
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: train.seed)")
    parser.add_argument("--batch", type=int, default=64, help="sampling batch for the quality metrics")
    parser.add_argument("--latency-batch", type=int, default=8, help="batch for the latency timing")
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--render-assets", type=int, default=8, help="columns of the render grid")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for eval.json, renders.png and table.txt "
                        "(default: runs/eval/<checkpoint>-<time>)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run instead of a new one")


def run_command(args) -> int:
    import sys

    from mdt_ray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        result, out_dir = _run(args, cfg)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if not isinstance(e, ConfigError) else 2
    print(result.pop("table", None) or format_table(result), flush=True)
    print(f"[eval] report: {out_dir / 'eval.json'}; renders: {result.get('render', '-')}", flush=True)
    if args.json_path:
        print(f"[eval] JSON: {args.json_path}", flush=True)
    if result.get("mlflow_run_id"):
        print(f"[eval] MLflow run {result['mlflow_run_id']} in {result['mlflow_uri']}", flush=True)
    return 0


def _run(args, cfg) -> tuple[dict[str, Any], Path]:
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.evaluate_slat import checkpoint_stage, evaluate_slat_model, format_slat_table
    from mdt_ray.models import NAMED_CONFIGS, load_trellis

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        # numpy's BLAS (FD's eigendecompositions) keeps its own pool, whose idle threads spin-wait
        # and, on a busy machine, slow everything down far more than they help.
        try:
            import threadpoolctl
        except ImportError:  # not a pinned dependency; without it numpy keeps its default pool
            pass
        else:
            threadpoolctl.threadpool_limits(args.threads)
    if args.assets < 2:
        raise ValueError(f"--assets must be >= 2 (FD and 1-NNA need two samples), got {args.assets}")
    ckpt = resolve_model_path(args.checkpoint)
    stage = checkpoint_stage(ckpt)
    teacher_spec = args.teacher
    if teacher_spec is None:
        from_cfg = cfg.model.teacher if cfg.model.teacher not in NAMED_CONFIGS else None
        teacher_spec = from_cfg or run_teacher_of(ckpt) or (PACKAGED_TEACHER if stage == "ss" else None)
    if teacher_spec is None:
        raise ValueError(f"{ckpt} is a stage-2 (SLAT) checkpoint and the packaged teacher is stage-1 only: "
                         "pass --teacher <slat teacher>.json (or --teacher none)")
    if teacher_spec in NAMED_CONFIGS:
        raise ValueError(f"teacher {teacher_spec!r} is a built-in size without trained weights; pass --teacher "
                         "<name>.json (or --teacher none)")
    data_uri = args.data or cfg.data.eval_uri
    if not data_uri:
        raise ValueError("no held-out corpus: pass --data or set data.eval_uri")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed = cfg.train.seed if args.seed is None else args.seed

    model = load_trellis(ckpt, device=device)
    teacher = None
    teacher_path = None
    if str(teacher_spec).lower() != "none":
        teacher_path = resolve_model_path(teacher_spec)
        teacher = load_trellis(teacher_path, device=device)
    held = load_local(data_uri, stage=stage, limit=args.assets)
    decode = synthetic_decoder(read_manifest(data_uri).source) if stage == "ss" else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or f"runs/eval/{ckpt.stem}-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"[eval] {ckpt} at steps {args.steps} vs teacher {teacher_path or 'none'} on {len(held['asset_id'])} "
        f"held-out assets of {data_uri} ({device})" + ("; stage 2: feature MSE and FD on the held-out voxels, "
                                                       "no renders" if stage == "slat" else ""))
    if stage == "slat":
        result = evaluate_slat_model(
            model, held, teacher=teacher, steps=args.steps,
            sampler={"cfg_strength": args.cfg, "cfg_interval": tuple(args.interval), "rescale_t": args.rescale_t},
            teacher_sampler={"steps": args.teacher_steps, "cfg_strength": args.teacher_cfg,
                             "cfg_interval": tuple(args.teacher_interval), "rescale_t": args.teacher_rescale_t},
            seed=seed, batch_size=args.batch, device=device, latency_batch=args.latency_batch,
            latency_repeats=args.latency_repeats, log=log)
    else:
        result = evaluate_model(
            model, held, teacher=teacher, steps=args.steps,
            sampler={"cfg_strength": args.cfg, "cfg_interval": tuple(args.interval), "rescale_t": args.rescale_t},
            teacher_sampler={"steps": args.teacher_steps, "cfg_strength": args.teacher_cfg,
                             "cfg_interval": tuple(args.teacher_interval), "rescale_t": args.teacher_rescale_t},
            decode=decode, seed=seed, batch_size=args.batch, device=device, latency_batch=args.latency_batch,
            latency_repeats=args.latency_repeats, render_path=out_dir / "renders.png" if decode else None,
            render_assets=args.render_assets, log=log)
    result["checkpoint"], result["teacher_checkpoint"], result["data"] = str(ckpt), (
        str(teacher_path) if teacher_path else None), data_uri
    table = format_slat_table(result) if stage == "slat" else format_table(result)
    result["table"] = table
    (out_dir / "table.txt").write_text(table + "\n")
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    if cfg.tracking.enabled:
        result["mlflow_uri"], result["mlflow_run_id"] = _log_mlflow(result, cfg, out_dir, args.run_id, ckpt)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=1))
    return result, out_dir


def _log_mlflow(result: dict[str, Any], cfg, out_dir: Path, run_id: Optional[str], ckpt: Path) -> tuple[str, str]:
    from mdt_ray.tracking import RunLogger, end_run, resolve_uri, start_run

    uri = resolve_uri(cfg.tracking.resolved_uri())
    new_run = run_id is None
    if new_run:
        s = result["settings"]
        params = {"eval.checkpoint": str(ckpt), "eval.teacher": result.get("teacher_checkpoint"),
                  "eval.data": result.get("data"), "eval.assets": s["assets"], "eval.seed": s["seed"],
                  "eval.device": s["device"], "eval.latency_batch": s["latency_batch"]}
        params.update({f"eval.sampler.{k}": v for k, v in s["sampler"].items()})
        params.update({f"eval.teacher_sampler.{k}": v for k, v in (s["teacher_sampler"] or {}).items()})
        run_id = start_run(uri, cfg.tracking.experiment, f"eval-{ckpt.stem}", params, tags={"kind": "eval"})
    logger = RunLogger(uri, run_id)
    if (result.get("settings") or {}).get("stage") == "slat":
        from mdt_ray.evaluate_slat import SLAT_METRICS

        logger.log_metrics(flat_metrics(result, SLAT_METRICS), step=0)
    else:
        logger.log_metrics(flat_metrics(result), step=0)
    for name in ("eval.json", "table.txt", "renders.png"):
        if (out_dir / name).is_file():
            logger.log_artifact(out_dir / name, "eval")
    if new_run:
        end_run(uri, run_id)
    return uri, run_id


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="evaluate", description="few-step quality and speed-up of a checkpoint "
                                     "against its teacher on held-out conditions")
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
