"""`mdt-ray corpus build | import-trellis | inspect`, and `jobs/build_corpus.py` (the same build
and import as one command, for `ray job submit`)."""

from __future__ import annotations

import argparse
import logging
import json
import sys
from typing import Any, Optional

from mdt_ray.cli._common import guarded, main_for


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", dest="storage_endpoint", default=None,
                   help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    p.add_argument("--region", dest="storage_region", default=None,
                   help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")


def _target(args: argparse.Namespace, uri: str):
    """`uri` on the store the --endpoint-url / --region options name."""
    from mdt_ray.data.storage import StorageTarget

    return StorageTarget(uri, args.storage_endpoint, args.storage_region)


def add_write_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how a corpus is written (shared by build, import-trellis and the job)."""
    p.add_argument("--out", required=True, help="corpus folder: a local path or s3://bucket/prefix")
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--shards", type=int, default=None, help="number of shards (default: ~256 MB each)")
    shards.add_argument("--rows-per-shard", type=int, default=None, help="assets per shard")
    p.add_argument("--workers", type=int, default=None,
                   help="local processes writing shards (default: CPU count); ignored with Ray")
    p.add_argument("--ray", dest="use_ray", action="store_const", const=True, default=None,
                   help="write shards as Ray tasks (default: when a Ray session is up or RAY_ADDRESS is set)")
    p.add_argument("--no-ray", dest="use_ray", action="store_const", const=False)
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _storage_args(p)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["synthetic", "multimodal"], default="synthetic",
                   help="corpus generator: synthetic shapes, or the benchmark's exactly known multimodal "
                        "distribution (docs/benchmark.md); TRELLIS data: use `import-trellis`")
    p.add_argument("--num-assets", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    add_write_arguments(p)


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="TRELLIS dataset root (holds metadata.csv)")
    add_trellis_options(p)
    add_write_arguments(p)


def add_trellis_options(p: argparse.ArgumentParser) -> None:
    """What to import from a TRELLIS root and how to filter it."""
    from mdt_ray.data import trellis_defaults as ti

    p.add_argument("--ss-model", default=None, help=f"ss_latents/<name> (default: the only one, or {ti.DEFAULT_SS_MODEL})")
    p.add_argument("--slat-model", default=None, help=f"latents/<name> (default: the only one, or {ti.DEFAULT_SLAT_MODEL})")
    p.add_argument("--cond", choices=["views", "tokens"], default="views",
                   help="condition: images from renders_cond/ (encoded on the workers), or precomputed tokens")
    p.add_argument("--views", type=int, default=ti.DEFAULT_VIEWS,
                   help=f"condition views stored per asset, evenly spaced over its frames (default {ti.DEFAULT_VIEWS})")
    p.add_argument("--image-format", default=ti.DEFAULT_IMAGE_FORMAT, choices=["webp", "jpeg", "png", "webp-lossless"],
                   help=f"how the views are stored (default {ti.DEFAULT_IMAGE_FORMAT}; docs/scaling.md compares them)")
    p.add_argument("--image-quality", type=int, default=ti.DEFAULT_IMAGE_QUALITY,
                   help=f"quality of webp/jpeg views (default {ti.DEFAULT_IMAGE_QUALITY})")
    p.add_argument("--cond-dir", default=ti.DEFAULT_COND_DIR,
                   help="--cond tokens: folder of <sha256>.npy|.npz cond tokens, relative to ROOT or absolute")
    p.add_argument("--stages", default="ss,slat", help="which latents to import: ss, slat or ss,slat")
    p.add_argument("--min-aesthetic", default=str(ti.MIN_AESTHETIC),
                   help="keep assets with aesthetic_score >= this ('none': no filter)")
    p.add_argument("--max-voxels", type=int, default=ti.MAX_VOXELS)
    p.add_argument("--token-views", choices=["first", "all"], default="first",
                   help="--cond tokens files with several views: first view only, or one row per view")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out (and count) assets whose files are missing instead of failing")
    p.add_argument("--limit", type=int, default=None, help="import at most this many assets")


def run_build(args: argparse.Namespace) -> int:
    from mdt_ray.data.corpus import build_synthetic

    if args.kind == "multimodal":
        from mdt_ray.benchmark.corpus import build as build_multimodal

        build_multimodal(
            _target(args, args.out), args.num_assets, seed=args.seed, rows_per_shard=args.rows_per_shard,
            num_shards=args.shards, workers=args.workers, use_ray=args.use_ray, overwrite=args.overwrite,
            progress=not args.quiet,
        )
        return 0
    build_synthetic(
        _target(args, args.out), args.num_assets, seed=args.seed, rows_per_shard=args.rows_per_shard,
        num_shards=args.shards, workers=args.workers, use_ray=args.use_ray, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    from mdt_ray.data.trellis_import import import_trellis

    min_aes: Optional[float]
    if str(args.min_aesthetic).lower() == "none":
        min_aes = None
    else:
        try:
            min_aes = float(args.min_aesthetic)
        except ValueError:
            raise ValueError(f"--min-aesthetic must be a number or 'none', got {args.min_aesthetic!r}") from None
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    _, report = import_trellis(
        args.root, _target(args, args.out), ss_model=args.ss_model, slat_model=args.slat_model, cond_dir=args.cond_dir,
        stages=stages, min_aesthetic=min_aes, max_voxels=args.max_voxels, cond=args.cond, views=args.views,
        image_format=args.image_format, image_quality=args.image_quality, token_views=args.token_views,
        skip_missing=args.skip_missing, limit=args.limit, rows_per_shard=args.rows_per_shard,
        num_shards=args.shards, workers=args.workers, use_ray=args.use_ray, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if report["missing"] and not args.quiet:
        logging.getLogger(__name__).warning("assets left out for missing files: %s", report["missing"])
    return 0


def _mb(n: float) -> str:
    if n >= 2**20:
        return f"{n / 2**20:,.2f} MiB"
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,.0f} B"


def format_inspect(info: dict[str, Any]) -> str:
    m = info["manifest"]
    lines = [
        f"corpus        {info['uri']}",
        f"format        v{m['format_version']}  stages {', '.join(m['stages'])}",
        f"source        {json.dumps(m['source'], sort_keys=True)}",
        f"latent        {m['latent_shape']}  "
        + (f"cond {m['views']} view(s) of {m['image_size']}² {m['image_format']}  " if m.get("views")
           else f"cond (T, C) {m['cond_shape']}  ")
        + f"slat {m['slat_channels']} ch @ {m['slat_resolution']}³",
        f"rows          {info['num_rows']:,} in {info['num_shards']} shard(s); "
        f"mean voxels/asset {info['mean_voxels']:,.0f}",
        f"size          {_mb(info['total_bytes'])} on storage, {_mb(info['bytes_per_asset'])} per asset",
        f"ss  mean/std  {[round(x, 4) for x in m['ss_mean']]} / {[round(x, 4) for x in m['ss_std']]}",
        f"slat mean/std {[round(x, 4) for x in m['slat_mean']]} / {[round(x, 4) for x in m['slat_std']]} "
        f"(from {m['slat_stats_from']})",
    ]
    if info["columns"]:
        lines.append("column        stored/asset   decoded/asset   ratio")
        for name, c in info["columns"].items():
            ratio = c["uncompressed"] / max(1, c["compressed"])
            lines.append(f"  {name:<11} {_mb(c['compressed_per_asset']):>12}   {_mb(c['uncompressed_per_asset']):>13}   {ratio:5.1f}×")
    lines.append("shards")
    for s in info["shards"][:20]:
        groups = f", {s['row_groups']} row groups" if "row_groups" in s else ""
        lines.append(f"  {s['path']}  {s['num_rows']:,} rows, {_mb(s['num_bytes'])}{groups}")
    if len(info["shards"]) > 20:
        lines.append(f"  ... and {len(info['shards']) - 20} more")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from mdt_ray.data.corpus import inspect_corpus

    info = inspect_corpus(_target(args, args.uri), check_shards=not args.no_check)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_inspect(info))
    return 0


def register(subparsers, name: str = "corpus", help_text: str = "build, import and inspect distillation corpora"
             ) -> argparse.ArgumentParser:
    """Add `corpus` with its sub-commands to the `mdt-ray` parser."""
    corpus = subparsers.add_parser(name, help=help_text)
    sub = corpus.add_subparsers(dest="corpus_command", required=True)

    p = sub.add_parser("build", help="build a generated corpus (synthetic or multimodal)")
    add_build_arguments(p)
    p.set_defaults(func=guarded("mdt-ray corpus build", run_build))

    p = sub.add_parser("import-trellis", help="convert a TRELLIS dataset root into corpus shards")
    add_import_arguments(p)
    p.set_defaults(func=guarded("mdt-ray corpus import-trellis", run_import))

    p = sub.add_parser("inspect", help="print a corpus's manifest, row count and sizes")
    p.add_argument("uri", help="corpus folder (local or s3://) or one shard file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-check", action="store_true", help="do not read every shard's footer")
    _storage_args(p)
    p.set_defaults(func=guarded("mdt-ray corpus inspect", run_inspect))
    return corpus


# --- jobs/build_corpus.py -------------------------------------------------------------------

def add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["synthetic", "multimodal", "trellis"], default="synthetic")
    p.add_argument("--num-assets", type=int, default=None, help="synthetic: how many assets")
    p.add_argument("--seed", type=int, default=0, help="synthetic: corpus seed")
    p.add_argument("--root", default=None, help="trellis: dataset root (holds metadata.csv)")
    add_trellis_options(p)
    add_write_arguments(p)


def run_job(args: argparse.Namespace) -> int:
    """Build or import; under `ray job submit` (RAY_ADDRESS set) or with --ray, one Ray task per shard."""
    import os

    if args.kind in ("synthetic", "multimodal") and args.num_assets is None:
        raise ValueError(f"--kind {args.kind} needs --num-assets")
    if args.kind == "trellis" and args.root is None:
        raise ValueError("--kind trellis needs --root")
    if args.use_ray is None and os.environ.get("RAY_ADDRESS"):
        args.use_ray = True
    if args.use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    return run_import(args) if args.kind == "trellis" else run_build(args)


job_main = main_for("build_corpus.py", "build the synthetic corpus or import a TRELLIS root", add_job_arguments,
                    run_job)
