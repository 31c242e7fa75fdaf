"""Convert a TRELLIS dataset root into corpus shards (spec §1: TRELLIS's on-disk formats).

Input layout (what TRELLIS's dataset_toolkits write):

    ROOT/metadata.csv                                  sha256, aesthetic_score, num_voxels,
                                                       ss_latent_<ss_model>, latent_<slat_model>,
                                                       cond_rendered, ... (one row per asset)
    ROOT/ss_latents/<ss_model>/<sha256>.npz            key `mean`: (8, 16, 16, 16) float32
    ROOT/latents/<slat_model>/<sha256>.npz             keys `feats` (L, 8) float32,
                                                       `coords` (L, 3) uint8 in [0, 64)
    ROOT/latents/<slat_model>/stats.json               optional: {"mean": [8], "std": [8]}
    ROOT/renders_cond/<sha256>/transforms.json         {"frames": [{"file_path": "000.png", ...}]}
    ROOT/renders_cond/<sha256>/000.png ...             RGBA views (render_cond.py: 24 of 1024²)

The condition (cond="views", the default): `views` of each asset's frames, evenly spaced over its
frame list, each cropped, resized and premultiplied as TRELLIS's trainer does
(mdt_ray.conditioning.preprocess_view) and stored compressed (`image_format`); a frozen encoder on
the worker makes the tokens. cond="tokens" instead reads precomputed tokens,
ROOT/<cond_dir>/<sha256>.npy | .npz, (T, C) or (V, T, C) for V views.

Assets are kept as TRELLIS's datasets keep them: the latent flags true, aesthetic score at least
`min_aesthetic`, at most `max_voxels` voxels (stage 2), cond rendered. Every asset left out is
counted by reason, printed and recorded in the manifest; an asset that passes the filters but
whose files are missing or malformed is an error naming it (or, with skip_missing, counted too).
A view whose pixels turn out unusable while the shard is written (it does not decode, its alpha
is empty) is always an error naming the asset and file: the plan has fixed the shard's rows.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from mdt_ray.data.corpus import (
    ROW_GROUP_BYTES,
    BuildPlan,
    ShardTask,
    row_bytes,
    run_plan,
    shard_counts,
)
from mdt_ray.data.schema import LATENT_SHAPE, SLAT_CHANNELS, CorpusError, Manifest
from mdt_ray.data.storage import StorageTarget

from mdt_ray.data.trellis_defaults import (  # noqa: F401  (re-exported: the import's defaults)
    DEFAULT_COND_DIR,
    DEFAULT_IMAGE_FORMAT,
    DEFAULT_IMAGE_QUALITY,
    DEFAULT_SLAT_MODEL,
    DEFAULT_SS_MODEL,
    DEFAULT_VIEWS,
    MAX_VOXELS,
    MIN_AESTHETIC,
    RENDERS_DIR,
)

_VIEW_BYTES_GUESS = 190_000  # row-size estimate (a lossless 518² view, docs/scaling.md) for shard sizing only
SLAT_RESOLUTION = 64
_COND_KEYS = ("tokens", "cond", "features", "patchtokens")
_ROWS_PER_CHUNK = 16


class TrellisImportError(CorpusError):
    pass


def _truthy(value: str, *, column: str, sha: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", ""):
        return False
    raise TrellisImportError(f"metadata.csv: asset {sha}: column {column!r} is {value!r}, not a boolean")


def _pick_model(root: str, folder: str, given: Optional[str], default: str) -> str:
    if given:
        return given
    base = os.path.join(root, folder)
    subdirs = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(base) else []
    if len(subdirs) == 1:
        return subdirs[0]
    if default in subdirs or not subdirs:
        return default
    raise TrellisImportError(f"{base} holds several encoders {subdirs}; choose one with --{folder.rstrip('s').replace('_', '-')}-model")


def _cond_path(cond_dir: str, sha: str) -> Optional[str]:
    for ext in (".npy", ".npz"):
        p = os.path.join(cond_dir, sha + ext)
        if os.path.exists(p):
            return p
    return None


def load_cond(path: str, *, sha: str) -> np.ndarray:
    """Tokens (T, C) or (V, T, C) from an .npy, or an .npz with one array (or key tokens/cond/...)."""
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = keys[0] if len(keys) == 1 else next((k for k in _COND_KEYS if k in keys), None)
                if key is None:
                    raise TrellisImportError(
                        f"asset {sha}: {path} holds arrays {keys}; expected one array or one of {list(_COND_KEYS)}"
                    )
                arr = z[key]
    except TrellisImportError:
        raise
    except Exception as e:
        raise TrellisImportError(f"asset {sha}: cannot read cond tokens {path}: {e}") from None
    if arr.ndim not in (2, 3):
        raise TrellisImportError(f"asset {sha}: cond tokens {path} have shape {arr.shape}; expected (T, C) or (V, T, C)")
    return arr


def read_frames(render_dir: str, *, sha: str) -> list[str]:
    """The frame files listed in `render_dir/transforms.json`, in its order, as paths."""
    path = os.path.join(render_dir, "transforms.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        frames = [os.path.join(render_dir, str(fr["file_path"])) for fr in meta["frames"]]
    except FileNotFoundError:
        raise TrellisImportError(f"asset {sha}: {path} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        expected = '{"frames": [{"file_path": ...}, ...]}'
        raise TrellisImportError(f"asset {sha}: {path} is malformed (expected {expected}: {type(e).__name__}: {e})"
                                 ) from None
    if not frames:
        raise TrellisImportError(f"asset {sha}: {path} lists no frames")
    return frames


def pick_frames(frames: Sequence[str], views: int, *, sha: str, where: str) -> list[str]:
    """`views` frames evenly spaced over the list (render_cond.py spreads consecutive frames over
    the sphere, so any even spacing covers it)."""
    if len(frames) < views:
        raise TrellisImportError(f"asset {sha}: {where} lists {len(frames)} frames, fewer than --views {views}")
    return [frames[i * len(frames) // views] for i in range(views)]


def _check_frame(path: str, *, sha: str) -> None:
    """The cheap checks, from the file header only: the frame exists, is an image, has alpha."""
    from PIL import Image

    from mdt_ray.conditioning.views import has_alpha

    if not os.path.isfile(path):
        raise TrellisImportError(f"asset {sha}: frame {path} is missing")
    try:
        with Image.open(path) as im:
            alpha = has_alpha(im)
            mode = im.mode
    except Exception as e:  # PIL raises several kinds for a file that is not an image
        raise TrellisImportError(f"asset {sha}: frame {path} is unreadable ({type(e).__name__}: {e})") from None
    if not alpha:
        raise TrellisImportError(f"asset {sha}: frame {path} has mode {mode}, no alpha channel (TRELLIS crops "
                                 "condition views around their alpha mask)")


def load_view(path: str, *, sha: str, image_format: str, quality: int) -> bytes:
    """One frame through TRELLIS's crop, as the compressed bytes the corpus stores."""
    from PIL import Image

    from mdt_ray.conditioning.views import ViewError, encode_view, view_pixels

    try:
        with Image.open(path) as im:
            im.load()
            pixels = view_pixels(im)
    except ViewError as e:
        raise TrellisImportError(f"asset {sha}: frame {path}: {e}") from None
    except Exception as e:  # a truncated or damaged image body
        raise TrellisImportError(f"asset {sha}: frame {path} is unreadable ({type(e).__name__}: {e})") from None
    return encode_view(pixels, image_format, quality)


@dataclass
class _Entry:
    sha: str
    ss_path: Optional[str]
    slat_path: Optional[str]
    cond_path: Any  # the token file, or the tuple of chosen frame paths


def _read_npz(path: str, keys: Sequence[str], *, sha: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z]
            if missing:
                raise TrellisImportError(f"asset {sha}: {path} lacks key(s) {missing} (has {list(z.keys())})")
            return {k: z[k] for k in keys}
    except TrellisImportError:
        raise
    except Exception as e:
        raise TrellisImportError(f"asset {sha}: cannot read {path}: {e}") from None


def trellis_rows(*, entries: list[tuple], stages: Sequence[str], cond_shape: Sequence[int], views: str,
                 max_voxels: int, cond: str = "tokens", image_format: str = DEFAULT_IMAGE_FORMAT,
                 image_quality: int = DEFAULT_IMAGE_QUALITY) -> Iterator[dict[str, Any]]:
    """Columns for the given assets, _ROWS_PER_CHUNK at a time, each checked against the formats."""
    cols: dict[str, list] = {k: [] for k in ("asset_id", "ss_latent", "slat_coords", "slat_feats",
                                             "views" if cond == "views" else "cond")}
    for sha, ss_path, slat_path, cond_path in entries:
        if "ss" in stages:
            mean = _read_npz(ss_path, ["mean"], sha=sha)["mean"]
            if mean.shape != LATENT_SHAPE:
                raise TrellisImportError(f"asset {sha}: {ss_path} `mean` has shape {mean.shape}, expected {LATENT_SHAPE}")
        else:
            mean = np.zeros(LATENT_SHAPE, np.float32)
        if "slat" in stages:
            z = _read_npz(slat_path, ["feats", "coords"], sha=sha)
            feats, coords = z["feats"], z["coords"]
            if coords.ndim != 2 or coords.shape[1] != 3 or feats.shape != (coords.shape[0], SLAT_CHANNELS):
                raise TrellisImportError(
                    f"asset {sha}: {slat_path} has coords {coords.shape} and feats {feats.shape}; "
                    f"expected (L, 3) and (L, {SLAT_CHANNELS})"
                )
            if len(coords) > max_voxels:
                raise TrellisImportError(f"asset {sha}: {slat_path} has {len(coords)} voxels, metadata.csv said at most {max_voxels}")
            if coords.size and (coords.min() < 0 or coords.max() >= SLAT_RESOLUTION):
                raise TrellisImportError(f"asset {sha}: {slat_path} coords outside [0, {SLAT_RESOLUTION})")
            coords = coords.astype(np.int16)
        else:
            coords, feats = np.zeros((0, 3), np.int16), np.zeros((0, SLAT_CHANNELS), np.float32)
        if cond == "views":
            cols["asset_id"].append(sha)
            cols["ss_latent"].append(mean)
            cols["slat_coords"].append(coords)
            cols["slat_feats"].append(feats)
            cols["views"].append([load_view(p, sha=sha, image_format=image_format, quality=image_quality)
                                  for p in cond_path])
            if len(cols["asset_id"]) >= _ROWS_PER_CHUNK:
                yield _stack(cols)
                cols = {k: [] for k in cols}
            continue
        tokens = load_cond(cond_path, sha=sha)
        per_view = tokens if tokens.ndim == 3 else tokens[None]
        if tuple(per_view.shape[1:]) != tuple(cond_shape):
            raise TrellisImportError(
                f"asset {sha}: cond tokens {cond_path} are {per_view.shape[1:]} per view; the first asset's "
                f"were {tuple(cond_shape)} and one corpus has one cond shape"
            )
        chosen = range(len(per_view)) if views == "all" else range(1)
        for v in chosen:
            cols["asset_id"].append(sha if views != "all" else f"{sha}:{v}")
            cols["ss_latent"].append(mean)
            cols["slat_coords"].append(coords)
            cols["slat_feats"].append(feats)
            cols["cond"].append(per_view[v])
        if len(cols["asset_id"]) >= _ROWS_PER_CHUNK:
            yield _stack(cols)
            cols = {k: [] for k in cols}
    if cols["asset_id"]:
        yield _stack(cols)


def _stack(cols: dict[str, list]) -> dict[str, Any]:
    out = {**cols, "ss_latent": np.stack(cols["ss_latent"])}
    if "cond" in cols:
        out["cond"] = np.stack(cols["cond"])
    return out


@dataclass
class _Filters:
    """What plan_import keeps: the models whose latents it needs and the asset filters."""

    root: str
    ss_model: Optional[str]
    slat_model: Optional[str]
    cond_root: str
    min_aesthetic: Optional[float]
    max_voxels: int
    skip_missing: bool
    cond: str = "tokens"
    views: int = 1


def _read_metadata(meta_path: str, min_aesthetic: Optional[float]) -> tuple[list[str], list[dict[str, str]]]:
    with open(meta_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    if "sha256" not in header:
        raise TrellisImportError(f"{meta_path} has no sha256 column (columns: {header})")
    if min_aesthetic is not None and "aesthetic_score" not in header:
        raise TrellisImportError(
            f"{meta_path} has no aesthetic_score column; pass --min-aesthetic none to import without that filter"
        )
    return header, rows


def _number(row: dict[str, str], column: str, where: str, sha: str) -> float:
    try:
        return float(row[column])
    except ValueError:
        raise TrellisImportError(f"{where}: asset {sha}: {column} {row[column]!r} is not a number") from None


def _filtered_out(row: dict[str, str], header: list[str], f: _Filters, sha: str, where: str) -> Optional[str]:
    """Why the metadata row of `sha` is left out, or None when it passes the filters."""
    flags = [(f"ss_latent_{f.ss_model}", "ss_latent not encoded", f.ss_model),
             (f"latent_{f.slat_model}", "slat latent not encoded", f.slat_model),
             ("cond_rendered", "cond not rendered", True)]
    for column, reason, wanted in flags:
        if wanted and column in header and not _truthy(row[column], column=column, sha=sha):
            return reason
    if f.min_aesthetic is not None and not _number(row, "aesthetic_score", where, sha) >= f.min_aesthetic:
        return f"aesthetic_score < {f.min_aesthetic:g}"
    if f.slat_model:
        slat_path = os.path.join(f.root, "latents", f.slat_model, sha + ".npz")
        if "num_voxels" in header and row["num_voxels"].strip():
            nvox = int(_number(row, "num_voxels", where, sha))
        elif os.path.exists(slat_path):
            nvox = len(_read_npz(slat_path, ["coords"], sha=sha)["coords"])
        else:
            nvox = 0
        if nvox > f.max_voxels:
            return f"num_voxels > {f.max_voxels}"
    return None


def _entry(f: _Filters, sha: str) -> tuple[Optional[_Entry], list[str]]:
    """The asset's files, or None and what is wrong with them (missing latents; for views, a
    missing or malformed transforms.json, or a chosen frame missing, unreadable, without alpha)."""
    ss_path = os.path.join(f.root, "ss_latents", f.ss_model, sha + ".npz") if f.ss_model else None
    slat_path = os.path.join(f.root, "latents", f.slat_model, sha + ".npz") if f.slat_model else None
    absent = [p for p in (ss_path, slat_path) if p and not os.path.exists(p)]
    if f.cond == "views":
        render_dir = os.path.join(f.cond_root, sha)
        try:
            frames = pick_frames(read_frames(render_dir, sha=sha), f.views, sha=sha,
                                 where=os.path.join(render_dir, "transforms.json"))
            for p in frames:
                _check_frame(p, sha=sha)
            cond_path: Any = tuple(frames)
        except TrellisImportError as e:
            absent.append(str(e).removeprefix(f"asset {sha}: "))
    else:
        cond_path = _cond_path(f.cond_root, sha)
        if cond_path is None:
            absent.append(os.path.join(f.cond_root, sha + ".npy|.npz"))
    return (None if absent else _Entry(sha, ss_path, slat_path, cond_path)), absent


def _select(rows: list[dict[str, str]], header: list[str], f: _Filters, meta_path: str, limit: Optional[int]
            ) -> tuple[list[_Entry], Counter, list[str]]:
    """The kept assets, the count of each filter reason, and the assets left out for missing files."""
    filtered: Counter = Counter()
    missing: list[str] = []
    kept: list[_Entry] = []
    seen: set[str] = set()
    for row in rows:
        sha = row["sha256"].strip()
        if not sha:
            raise TrellisImportError(f"{meta_path}: a row has an empty sha256")
        if sha in seen:
            raise TrellisImportError(f"{meta_path}: asset {sha} is listed twice")
        seen.add(sha)
        reason = _filtered_out(row, header, f, sha, meta_path)
        if reason is not None:
            filtered[reason] += 1
            continue
        entry, absent = _entry(f, sha)
        if entry is None:
            if not f.skip_missing:
                raise TrellisImportError(
                    f"asset {sha} passes the filters but its file(s) are missing or unusable: {absent} "
                    "(fix the dataset, or pass --skip-missing to leave such assets out, counted)"
                )
            missing.append(sha)
            filtered["files missing"] += 1
            continue
        kept.append(entry)
        if limit is not None and len(kept) >= limit:
            break
    if not kept:
        raise TrellisImportError(f"no asset of {meta_path} passes the filters ({dict(filtered)})")
    return kept, filtered, missing


def _slat_stats(root: str, slat_model: Optional[str]) -> tuple[list[float], list[float], str]:
    """TRELLIS's published feature statistics from `stats.json`, else computed over the corpus."""
    if not slat_model:
        return [], [], "corpus"
    stats_path = os.path.join(root, "latents", slat_model, "stats.json")
    if not os.path.exists(stats_path):
        return [], [], "corpus"
    with open(stats_path) as f:
        stats = json.load(f)
    mean = [float(x) for x in stats.get("mean", [])]
    std = [float(x) for x in stats.get("std", [])]
    if len(mean) != SLAT_CHANNELS or len(std) != SLAT_CHANNELS:
        raise TrellisImportError(f"{stats_path}: expected {SLAT_CHANNELS} means and stds")
    return mean, std, stats_path


def _shard_tasks(kept: list[_Entry], counts: Sequence[int], rows_per_asset: int, spec: dict[str, Any]
                 ) -> list[ShardTask]:
    tasks, start = [], 0
    for k, n in enumerate(counts):
        chunk = [(e.sha, e.ss_path, e.slat_path, e.cond_path) for e in kept[start:start + n]]
        tasks.append(ShardTask(index=k, num_rows=n * rows_per_asset, produce=trellis_rows,
                               spec={"entries": chunk, **spec}))
        start += n
    return tasks


def _filters(root: str, ss_model, slat_model, cond_dir: str, stages: Sequence[str], min_aesthetic, max_voxels,
             token_views: str, skip_missing: bool, cond: str, views: int) -> _Filters:
    if not stages or set(stages) - {"ss", "slat"}:
        raise ValueError(f"stages must be a non-empty subset of ('ss', 'slat'), got {stages}")
    if token_views not in ("first", "all"):
        raise ValueError(f"token_views must be 'first' or 'all', got {token_views!r}")
    if cond not in ("views", "tokens"):
        raise ValueError(f"cond must be 'views' or 'tokens', got {cond!r}")
    if views < 1:
        raise ValueError(f"--views must be >= 1, got {views}")
    if not os.path.isfile(os.path.join(root, "metadata.csv")):
        raise TrellisImportError(f"{root} is not a TRELLIS dataset root: no metadata.csv")
    ss_model = _pick_model(root, "ss_latents", ss_model, DEFAULT_SS_MODEL) if "ss" in stages else None
    slat_model = _pick_model(root, "latents", slat_model, DEFAULT_SLAT_MODEL) if "slat" in stages else None
    if cond == "views":
        cond_root = os.path.join(root, RENDERS_DIR)
        if not os.path.isdir(cond_root):
            raise TrellisImportError(f"{root} has no {RENDERS_DIR}/ folder of condition views (TRELLIS's "
                                     "render_cond.py writes it; --cond tokens imports precomputed tokens instead)")
    else:
        cond_root = cond_dir if os.path.isabs(cond_dir) else os.path.join(root, cond_dir)
        if not os.path.isdir(cond_root):
            raise TrellisImportError(f"cond token folder {cond_root} does not exist (set --cond-dir)")
    return _Filters(root, ss_model, slat_model, cond_root, min_aesthetic, max_voxels, skip_missing, cond, views)


def plan_import(
    root: str,
    *,
    ss_model: Optional[str] = None,
    slat_model: Optional[str] = None,
    cond_dir: str = DEFAULT_COND_DIR,
    stages: Sequence[str] = ("ss", "slat"),
    min_aesthetic: Optional[float] = MIN_AESTHETIC,
    max_voxels: int = MAX_VOXELS,
    cond: str = "views",
    views: int = DEFAULT_VIEWS,
    image_format: str = DEFAULT_IMAGE_FORMAT,
    image_quality: int = DEFAULT_IMAGE_QUALITY,
    token_views: str = "first",
    skip_missing: bool = False,
    rows_per_shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    limit: Optional[int] = None,
) -> tuple[BuildPlan, dict[str, Any]]:
    """Read metadata.csv, filter, check that every kept asset's files exist; returns the plan
    and a report {kept, candidates, filtered: {reason: count}, missing: [...]}.

    cond "views": `views` condition images per asset from renders_cond/, as `image_format`
    (mdt_ray.conditioning.FORMATS; `image_quality` for the lossy ones). cond "tokens": the
    precomputed tokens of `cond_dir`, the first view's or, with token_views "all", a row per view."""
    from mdt_ray.conditioning.views import FORMATS, IMAGE_SIZE

    if image_format not in FORMATS:
        raise ValueError(f"image format must be one of {sorted(FORMATS)}, got {image_format!r}")
    root = os.path.abspath(root)
    stages = tuple(stages)
    f = _filters(root, ss_model, slat_model, cond_dir, stages, min_aesthetic, max_voxels, token_views, skip_missing,
                 cond, views)
    meta_path = os.path.join(root, "metadata.csv")
    header, rows = _read_metadata(meta_path, min_aesthetic)
    kept, filtered, missing = _select(rows, header, f, meta_path, limit)

    if cond == "views":
        cond_shape, rows_per_asset = (0, 0), 1
        image_fields = {"views": views, "image_size": IMAGE_SIZE, "image_format": image_format}
        cond_source = {"cond": "views", "views": views, "image_format": image_format,
                       **({} if FORMATS[image_format][2] else {"image_quality": image_quality})}
    else:
        first = load_cond(kept[0].cond_path, sha=kept[0].sha)
        cond_shape = tuple(int(x) for x in first.shape[-2:])
        rows_per_asset = (first.shape[0] if first.ndim == 3 else 1) if token_views == "all" else 1
        image_fields, cond_source = {}, {"cond": "tokens", "views": token_views}
    slat_mean, slat_std, stats_from = _slat_stats(root, f.slat_model)
    report = {"candidates": len(rows), "kept": len(kept), "rows": len(kept) * rows_per_asset,
              "filtered": dict(sorted(filtered.items())), "missing": missing}
    manifest = Manifest(
        latent_shape=LATENT_SHAPE, cond_shape=cond_shape, slat_channels=SLAT_CHANNELS,
        slat_resolution=SLAT_RESOLUTION, stages=stages,
        source={"kind": "trellis", "root": root, "ss_model": f.ss_model, "slat_model": f.slat_model,
                "cond_dir": f.cond_root, **cond_source, "min_aesthetic": min_aesthetic, "max_voxels": max_voxels,
                "candidates": len(rows), "filtered": report["filtered"]},
        slat_mean=slat_mean, slat_std=slat_std, slat_stats_from=stats_from, **image_fields,
    )
    nbytes = row_bytes(manifest, mean_voxels=20000 if f.slat_model else 0, view_bytes=_VIEW_BYTES_GUESS)
    counts = shard_counts(len(kept), rows_per_shard=None if rows_per_shard is None else max(1, rows_per_shard // rows_per_asset),
                          num_shards=num_shards, row_nbytes=nbytes * rows_per_asset)
    tasks = _shard_tasks(kept, counts, rows_per_asset, {"stages": stages, "cond_shape": cond_shape,
                                                        "views": token_views, "max_voxels": max_voxels, "cond": cond,
                                                        "image_format": image_format, "image_quality": image_quality})
    return BuildPlan(manifest=manifest, tasks=tasks, rows_per_group=max(1, ROW_GROUP_BYTES // nbytes)), report


def import_trellis(root: str, target: str | StorageTarget, *, workers: Optional[int] = None,
                   use_ray: Optional[bool] = None, overwrite: bool = False, progress: bool = True,
                   **plan_kwargs: Any) -> tuple[Manifest, dict[str, Any]]:
    plan, report = plan_import(root, **plan_kwargs)
    if progress:
        left_out = sum(report["filtered"].values())
        print(f"TRELLIS import: {report['kept']} of {report['candidates']} assets kept, {left_out} left out"
              + (f" ({', '.join(f'{k}: {v}' for k, v in report['filtered'].items())})" if left_out else ""),
              file=sys.stderr)
    manifest = run_plan(plan, target, workers=workers, use_ray=use_ray, overwrite=overwrite, progress=progress)
    return manifest, report
