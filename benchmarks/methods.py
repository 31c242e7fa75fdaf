"""The multimodal benchmark (docs/benchmark.md): corpora, the learned teacher, the method comparison.

    python benchmarks/methods.py corpora                 # train / val / test corpora under data/
    python benchmarks/methods.py --threads 2 teacher     # the committed learned teacher (mdt_ray/assets, ~40 min)
    python benchmarks/methods.py diagnose                # where its own sampler goes wrong
    python benchmarks/methods.py run --quick             # the CI smoke run (minutes)
    python benchmarks/methods.py run                     # the full comparison (docs/benchmark.md)
    python benchmarks/methods.py run --steps 2000 ...    # larger budgets

Everything is written under --out (results.json, tables.md, the figures) and logged to MLflow
(experiment mdt-ray-benchmark; MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPORA = {"train": ("data/multimodal-train", 0, 4096), "val": ("data/multimodal-val", 1, 1024),
           "test": ("data/multimodal-test", 2, 1024)}
TEACHER = "mdt_ray/assets/teacher_ss_multimodal.json"
# The Budget fields `run` takes as flags (--steps, --batch-size, ...).
BUDGET_FLAGS = ("steps", "batch_size", "seeds", "test_assets", "val_assets", "sweep_steps", "ablation_seeds", "jobs")


def build_corpora(root: Path, *, overwrite: bool = False) -> dict[str, str]:
    from mdt_ray.benchmark.corpus import build
    from mdt_ray.data.storage import StorageTarget

    uris = {}
    for split, (rel, seed, n) in CORPORA.items():
        path = root / rel
        if overwrite or not (path / "_common_metadata").exists():
            build(StorageTarget(str(path)), n, seed=seed, workers=1, use_ray=False, overwrite=True, progress=False)
        uris[split] = str(path)
    return uris


# The committed teacher's recipe (37.5 min at --threads 2 on 2 cores): four runs from scratch,
# each continuing from the EMA weights of the one before with a fresh optimizer and its own
# warm-up + cosine. A short start at mid t; many high-t samples, where the modes separate; mid t
# again, where the shapes are drawn; then batches of 8 data rows + 8 states of the teacher's own
# 25-step sampler (OwnTrajectories), where it drifts off the data's path. docs/benchmark.md has
# the six-phase search (116 min) this condenses and what each part changed.
TEACHER_PHASES = (
    {"steps": 500, "lr": 1.5e-3, "t_mean": 0.0, "t_std": 1.2},
    {"steps": 2500, "lr": 1.5e-3, "t_mean": 1.0, "t_std": 1.2},
    {"steps": 1000, "lr": 1e-3, "t_mean": 0.0, "t_std": 1.2},
    {"steps": 1600, "lr": 7e-4, "t_mean": 0.0, "t_std": 1.2, "batch_size": 8, "own_per_step": 8},
)


def teacher_recipes(phases) -> list:
    """One TeacherRecipe per phase, each checked: a bad value in the last phase must surface
    before the corpora are built and the first phase trains, not after an hour of them."""
    from mdt_ray.benchmark.teacher import TeacherRecipe

    recipes = []
    for i, phase in enumerate(phases):
        recipe = TeacherRecipe()
        for key, value in phase.items():
            if value is not None:
                setattr(recipe, key, value)
        recipe.check(f"phase {i + 1}")
        recipes.append(recipe)
    return recipes


def train_teacher(train_uri: str, out: Path, name: str, recipes, *, init=None, snapshot_every: int = 0) -> None:
    import json
    import tempfile

    from mdt_ray.benchmark.teacher import pretrain_teacher

    summaries = []
    with tempfile.TemporaryDirectory(prefix="teacher-phases-") as scratch:
        for i, recipe in enumerate(recipes):
            last = i == len(recipes) - 1
            where, label = (out, name) if last else (Path(scratch), f"{name}_phase{i + 1}")
            summary = pretrain_teacher(train_uri, where, name=label, recipe=recipe, log_every=50, init=init,
                                       snapshot_every=snapshot_every if last else 0)
            summaries.append(summary)
            init = summary["json"]
    if len(summaries) > 1:
        record = dict(summaries[-1])
        record["phases"] = [{k: v for k, v in s.items() if k not in ("json", "safetensors")} for s in summaries]
        record["train_s"] = sum(s["train_s"] for s in summaries)
        record["cpu_s"] = sum(s["cpu_s"] for s in summaries)
        Path(out, f"{name}.train.json").write_text(json.dumps(record, indent=1))


def diagnose(args) -> int:
    import json

    from mdt_ray.benchmark.teacher import trajectory_diagnosis
    from mdt_ray.models import load_trellis

    model = load_trellis(args.teacher).float().eval()
    rows = trajectory_diagnosis(model, per_condition=args.per_condition)
    print(f"{args.teacher}: its 25-step trajectory (TRELLIS grid) from fixed noise, {args.per_condition} per condition")
    print(f"{'t':>6} {'x0-hat IoU':>11} {'right cond.':>12} {'exact x0-hat IoU':>17} {'field rel. err':>15}")
    for r in rows:
        print(f"{r['t']:6.3f} {r['iou']:11.3f} {r['right_condition']:12.2f} {r['exact_iou']:17.3f} {r['rel_err']:15.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (the budget's counts), so a bad one is a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def phases_from(args) -> list[dict]:
    """The committed recipe, or the one phase the command line describes."""
    if any(v is not None for v in (args.steps, args.lr, args.t_mean, args.t_std, args.p_mix, args.own_per_step,
                                    args.init)):
        return [{"steps": args.steps, "lr": args.lr, "t_mean": args.t_mean, "t_std": args.t_std,
                 "p_mix": args.p_mix, "own_per_step": args.own_per_step}]
    return list(TEACHER_PHASES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: cores shared with other jobs)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpora", help="build the train / val / test corpora")
    c.add_argument("--root", default=str(ROOT))
    c.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("teacher", help="pre-train the learned teacher by regressing the exact velocity")
    t.add_argument("--out", default=str(ROOT / "mdt_ray/assets"))
    t.add_argument("--name", default="teacher_ss_multimodal")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--t-mean", type=float, default=None, help="training times ~ logit-normal(t_mean, t_std)")
    t.add_argument("--t-std", type=float, default=None)
    t.add_argument("--p-mix", type=float, default=None, help="share of samples blended toward another mode")
    t.add_argument("--own-per-step", type=int, default=None,
                   help="states of the network's own 25-step sampler added to every batch (OwnTrajectories)")
    t.add_argument("--snapshot-every", type=int, default=0, help="also export the EMA weights every N steps")
    t.add_argument("--init", default=None, help="continue from this TRELLIS json instead of a fresh model")
    t.add_argument("--root", default=str(ROOT))
    e = sub.add_parser("teachers", help="score the exact and the learned teacher at 1, 2 and 25 steps")
    e.add_argument("--teacher", default=str(ROOT / TEACHER))
    e.add_argument("--exact-only", action="store_true")
    e.add_argument("--learned-only", action="store_true")
    e.add_argument("--test-assets", type=int, default=256)
    e.add_argument("--root", default=str(ROOT))
    e.add_argument("--json", default=None, help="write the rows (and the learned teacher's field error) here")
    g = sub.add_parser("diagnose", help="where a learned teacher's own sampler goes wrong (field error along it)")
    g.add_argument("--teacher", default=str(ROOT / TEACHER))
    g.add_argument("--per-condition", type=int, default=8)
    g.add_argument("--json", default=None)
    r = sub.add_parser("run", help="the method comparison")
    r.add_argument("--quick", action="store_true", help="tiny budget: the CI smoke run")
    r.add_argument("--out", default=None, help="output folder (default runs/benchmark[-quick])")
    r.add_argument("--teacher", default=str(ROOT / TEACHER))
    r.add_argument("--root", default=str(ROOT))
    r.add_argument("--no-sweep", action="store_true", help="skip the Ray Tune sweeps; use the default settings")
    r.add_argument("--no-mlflow", action="store_true")
    for name in BUDGET_FLAGS:
        r.add_argument(f"--{name.replace('_', '-')}", type=_count, default=None, dest=name)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.command == "corpora":
        print(build_corpora(Path(args.root), overwrite=args.overwrite))
        return 0
    if args.command == "diagnose":
        return diagnose(args)
    if args.command == "teacher":
        try:
            recipes = teacher_recipes(phases_from(args))
        except ValueError as e:
            p.error(str(e))
    uris = build_corpora(Path(args.root))
    if args.command == "teacher":
        train_teacher(uris["train"], Path(args.out), args.name, recipes, init=args.init,
                      snapshot_every=args.snapshot_every)
        return 0
    from mdt_ray.benchmark.compare import Budget, run_benchmark, teachers_report

    if args.command == "teachers":
        report = teachers_report(uris, None if args.exact_only else args.teacher, args.test_assets,
                                 exact=not args.learned_only)
        if args.json:
            import json

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
            from mdt_ray.benchmark.corpus import distribution
            from mdt_ray.eval.render import render_grid

            d = distribution()
            render_grid([("true modes", d.occupancy.copy())], Path(args.json).parent / "truth_modes.png",
                        column_labels=[n.replace("/", " ")[:14] for n in d.mode_names])
        return 0

    budget = Budget.quick() if args.quick else Budget()
    for name in BUDGET_FLAGS:
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    out = args.out or str(ROOT / ("runs/benchmark-quick" if args.quick else "runs/benchmark"))
    run_benchmark(uris, args.teacher, out, budget, sweep=not args.no_sweep, track=not args.no_mlflow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
