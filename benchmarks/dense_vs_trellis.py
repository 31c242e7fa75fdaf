"""Stage-1 forward speed: mdt-ray's SparseStructureFlowModel against TRELLIS's own, same weights.

Both models are built from the same named config (default ss-demo), TRELLIS's loads mdt-ray's
state dict strictly, both get the same inputs; the outputs must be bit-identical (checked, the
run fails otherwise). Forwards then alternate in this process (mdt-ray, TRELLIS, mdt-ray, …)
under `torch.no_grad`, so outside load on a shared machine falls on both alike; each round
reports the median of each side and their ratio, and `--rounds` repeats the comparison.
`--profile` prints torch.profiler's top operators of one forward of each.

TRELLIS is not vendored: its source is read from `--trellis` (a checkout holding `trellis/`)
or, by default, extracted from the fetched git mirror `--mirror` with `git archive`. Only the
model modules are imported: the package `__init__` (pipelines, renderers, their native deps)
is bypassed with namespace stubs, its sparse module (spconv) is stubbed since the dense model
only names its classes, and its attention backend is set to torch SDPA.

    python benchmarks/dense_vs_trellis.py [--model ss-demo] [--batch 8] [--threads 2]
        [--repeats 10] [--rounds 3] [--profile] [--trellis PATH | --mirror GITDIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cond_tokens, set_threads, write_json  # noqa: E402
from mdt_ray.models import NAMED_CONFIGS, build_model  # noqa: E402

MIRROR = "/work/.mirror/microsoft+TRELLIS/repo"


def trellis_source(path: str | None, mirror: str) -> Path:
    if path:
        root = Path(path)
    else:
        if not Path(mirror).exists():
            raise SystemExit(f"no TRELLIS source: pass --trellis <checkout> or --mirror <git dir> ({mirror} is missing)")
        root = Path(tempfile.mkdtemp(prefix="trellis_src_"))
        archive = subprocess.run(["git", "--git-dir", mirror, "archive", "HEAD", "trellis/models", "trellis/modules"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    if not (root / "trellis" / "models" / "sparse_structure_flow.py").exists():
        raise SystemExit(f"{root}: no trellis/models/sparse_structure_flow.py")
    return root


def import_trellis_ss_flow(root: Path):
    os.environ["ATTN_BACKEND"] = "sdpa"
    for name in ("trellis", "trellis.models", "trellis.modules"):
        stub = types.ModuleType(name)
        stub.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = stub
    sparse = types.ModuleType("trellis.modules.sparse")
    # utils.py lists the sparse classes among the fp16-convertible types; none is ever built here
    sparse.__getattr__ = lambda name: type(name, (), {})
    sys.modules["trellis.modules.sparse"] = sparse
    return importlib.import_module("trellis.models.sparse_structure_flow").SparseStructureFlowModel


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    # TRELLIS's init zeroes the modulation and head: the output would be 0 on both sides.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))


def profile_table(fn, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ss-demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--trellis", help="a TRELLIS checkout (the folder holding trellis/)")
    p.add_argument("--mirror", default=MIRROR, help="git dir of a TRELLIS clone, used when --trellis is not given")
    p.add_argument("--json")
    args = p.parse_args(argv)
    set_threads(args.threads)

    TrellisModel = import_trellis_ss_flow(trellis_source(args.trellis, args.mirror))
    cfg = NAMED_CONFIGS[args.model]["args"]
    ours = build_model(args.model).eval()
    randomize(ours)
    theirs = TrellisModel(**cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    g = torch.Generator().manual_seed(1)
    r = cfg["resolution"]
    x = torch.randn(args.batch, cfg["in_channels"], r, r, r, generator=g)
    t = 1000 * torch.rand(args.batch, generator=g)
    cond = torch.randn(args.batch, cond_tokens(cfg["cond_channels"]), cfg["cond_channels"], generator=g)

    def run_ours():
        with torch.no_grad():
            return ours(x, t, cond)

    def run_theirs():
        with torch.no_grad():
            return theirs(x, t, cond)

    a, b = run_ours(), run_theirs()
    if not torch.equal(a, b):
        raise SystemExit(f"outputs differ: max |Δ| = {(a - b).abs().max().item():.3e} (mdt-ray vs TRELLIS, {args.model})")
    print(f"[bench] {args.model} batch {args.batch}, {args.threads} threads: outputs bit-identical", flush=True)

    if args.profile:
        print("== mdt-ray\n" + profile_table(run_ours))
        print("== TRELLIS\n" + profile_table(run_theirs))

    rounds = []
    for k in range(args.rounds):
        times = {"mdt_ray": [], "trellis": []}
        for _ in range(args.repeats):
            for side, fn in (("mdt_ray", run_ours), ("trellis", run_theirs)):
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
        med = {s: statistics.median(v) for s, v in times.items()}
        ratio = med["mdt_ray"] / med["trellis"]
        rounds.append({"mdt_ray_ms": 1e3 * med["mdt_ray"], "trellis_ms": 1e3 * med["trellis"], "ratio": ratio,
                       "load": os.getloadavg()[0]})
        print(f"round {k + 1}: mdt-ray {1e3 * med['mdt_ray']:.1f} ms, TRELLIS {1e3 * med['trellis']:.1f} ms, "
              f"ratio {ratio:.3f} (load {os.getloadavg()[0]:.2f})", flush=True)
    res = {"model": args.model, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
           "bit_identical": True, "rounds": rounds}
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
