"""The students study (issue #26, docs/benchmark.md "What limits the students"): the ceiling,
quality against training length, and the official recipe's knobs one at a time.

    python benchmarks/students.py run --recipe ceiling mdt --teacher exact --steps 3200 --seeds 0 1
    python benchmarks/students.py run --recipe mdt-dnorm-off --teacher exact --steps 800
    python benchmarks/students.py report      # tables.md and the figures from every run file

Each run writes `<out>/<recipe>__<teacher>__s<seed>.json` (config, scores at every eval step,
the per-step loss terms and diagnostics); `report` reads whatever run files are there. Runs go
`--jobs` at a time in spawned processes, each on `--threads` torch threads. Recipes: RECIPES in
mdt_ray/benchmark/study.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "docs/benchmark/study"

_BENCH = {}


def _init(threads: int) -> None:
    import torch

    from methods import TEACHER, build_corpora
    from mdt_ray.benchmark.compare import load_bench
    from mdt_ray.benchmark.study import default_budget

    torch.set_num_threads(threads)
    uris = build_corpora(ROOT)
    _BENCH["bench"] = load_bench(uris["train"], uris["val"], uris["test"], str(ROOT / TEACHER), default_budget())


def _one(job: tuple[str, str, int, int, list[int], str]) -> str:
    from mdt_ray.benchmark.study import run_file, study_run

    recipe, teacher, seed, steps, eval_at, out = job
    path = run_file(Path(out), recipe, teacher, seed)

    def write(result: dict) -> None:
        # After every score, so a run cut short keeps its measured points (marked "partial").
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=0))
        tmp.replace(path)

    study_run(_BENCH["bench"], recipe, teacher=teacher, steps=steps, seed=seed, eval_at=eval_at,
              log=lambda line: print(line, flush=True), on_eval=write)
    return str(path)


def run(args) -> int:
    from mdt_ray.benchmark.study import EVAL_AT, settings_of

    for recipe in args.recipe:
        try:
            settings_of(recipe)  # an unknown name is a usage error before any corpus loads
        except ValueError as e:
            print(f"students.py run: error: --recipe: {e}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_at = args.eval_at or [k for k in EVAL_AT if k <= args.steps]
    jobs = [(r, t, s, args.steps, eval_at, str(out)) for r in args.recipe for t in args.teacher for s in args.seeds]
    t0 = time.perf_counter()
    print(f"[study] {len(jobs)} run(s), {args.jobs} at a time, {args.threads} thread(s) each -> {out}", flush=True)
    if args.jobs <= 1:
        _init(args.threads)
        for job in jobs:
            print(f"[study] wrote {_one(job)}", flush=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init, initargs=(args.threads,)) as pool:
            for path in pool.map(_one, jobs):
                print(f"[study] wrote {path}", flush=True)
    print(f"[study] done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


def report(args) -> int:
    from mdt_ray.benchmark import study

    out = Path(args.out)
    runs = study.load_runs(out)
    if not runs:
        print(f"students.py report: no run files (*__*__s*.json) in {out}", file=sys.stderr)
        return 2
    text = ["# Students study: results", "", "Last eval of each run group:", "", study.table(runs), ""]
    for at in sorted({int(s) for r in runs for s in r["evals"]}):
        text += [f"At {at} training steps:", "", study.table(runs, at), ""]
    text += ["Per-t-bin VM loss (mean of the last 20 logged windows, seed 0):", "", study.t_bin_table(runs)]
    (out / "tables.md").write_text("\n".join(text))
    study.budget_figure(runs, out / "budget.png")
    study.diagnostics_figure([r for r in runs if "diag_grad_vm" in (r["curve"] or [{}])[0]], out / "diagnostics.png")
    print((out / "tables.md").read_text())
    print(f"[study] figures: {out / 'budget.png'}, {out / 'diagnostics.png'}")
    return 0


def _positive(text: str) -> int:
    """argparse type: an integer >= 1, so a bad count is a usage error, not a worker's traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score study runs")
    r.add_argument("--recipe", nargs="+", required=True)
    r.add_argument("--teacher", nargs="+", default=["exact"], choices=["exact", "learned"])
    r.add_argument("--steps", type=_positive, default=3200)
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--eval-at", type=int, nargs="*", default=None, help="steps to score at (default 200·2^k ≤ steps)")
    r.add_argument("--jobs", type=_positive, default=1)
    r.add_argument("--threads", type=_positive, default=1)
    r.add_argument("--out", default=str(OUT))
    g = sub.add_parser("report", help="tables and figures from the run files")
    g.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
