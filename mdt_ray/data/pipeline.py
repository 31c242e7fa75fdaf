"""From corpus shards to torch tensors on a training worker, through Ray Data.

    manifest ──► check every shard's footer (header, column types) ──► read tasks planned from
    the manifest (datasource.py: only the stage's columns, shard-level shuffle, many small
    shards per task) ──► decode + validate each batch (float16 lists ->
    float32 arrays; a bad row names its shard and asset) ──► drop the string columns ──►
    ray.train.get_dataset_shard(...) ──► torch_batches(...)

`load_local` reads a small corpus fully, without Ray, through the same decoder (evaluation on
held-out assets, tests).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import re
import sys
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdt_ray.data import storage
from mdt_ray.data.storage import StorageTarget
from mdt_ray.data.schema import (
    VIEWS_COLUMN,
    CorpusError,
    Manifest,
    check_header,
    expected_types,
    header_of,
    read_manifest,
    read_shard_footer,
    schema_problems,
)

STAGES = ("ss", "slat")
_PATH = "path"  # the shard of each row, as its filesystem names it (datasource.PATH_COLUMN)


# -- validation and decoding ---------------------------------------------------------------------
def _row_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return np.full(len(col), col.type.list_size, dtype=np.int64)
    return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)


def _where(paths: Sequence[str], ids: Sequence[str], row: int) -> str:
    return f"shard {paths[row]}, asset {ids[row]!r}"


def _check_list_column(table: pa.Table, name: str, manifest: Manifest, paths: Sequence[str],
                       ids: Sequence[str]) -> None:
    """Raise naming the first row whose shape or dtype disagrees with the manifest."""
    col = table.column(name)
    want = expected_types(manifest)[name]
    if col.type == want:
        if col.null_count:
            row = int(np.nonzero(col.is_null().to_numpy(zero_copy_only=False))[0][0])
            raise CorpusError(f"{_where(paths, ids, row)}: column {name!r} is null")
        return
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)
    if not is_list:
        raise CorpusError(f"{_where(paths, ids, 0)}: column {name!r} has type {col.type}, the manifest implies {want}")
    if col.type.value_type != want.value_type:
        raise CorpusError(
            f"{_where(paths, ids, 0)}: column {name!r} holds {col.type.value_type} values, the "
            f"corpus format stores {want.value_type}"
        )
    if pa.types.is_fixed_size_list(want):
        lengths = _row_lengths(col)
        bad = np.nonzero(lengths != want.list_size)[0]
        if len(bad):
            row = int(bad[0])
            shape = {"ss_latent": manifest.latent_shape, VIEWS_COLUMN: (manifest.views,)}.get(name, manifest.cond_shape)
            raise CorpusError(
                f"{_where(paths, ids, row)}: column {name!r} holds {lengths[row]} values, the "
                f"manifest says {'×'.join(map(str, shape))} = {want.list_size}"
            )
    # Every row has the right length but the shard was written with another list type.
    raise CorpusError(
        f"shard {paths[0]}: column {name!r} has type {col.type}, expected {want} "
        f"(seen at asset {ids[0]!r}); rewrite the shard with mdt-ray corpus"
    )


def _fixed_to_numpy(col: pa.ChunkedArray, shape: Sequence[int], name: str, paths: Sequence[str],
                    ids: Sequence[str]) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), *shape)
    _check_finite(values, name, paths, ids)
    return values


def _check_finite(values: np.ndarray, name: str, paths: Sequence[str], ids: Sequence[str]) -> None:
    # NaN or inf in a stored latent is a damaged row; one would poison every gradient after it.
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not finite.all():
        row = int(np.nonzero(~finite)[0][0])
        raise CorpusError(f"{_where(paths, ids, row)}: column {name!r} holds NaN or inf")


def decode_table(table: pa.Table, manifest: Manifest, stage: str, *, shard: Optional[str] = None,
                 keep_asset_id: bool = False, normalize_slat: bool = True) -> dict[str, Any]:
    """Validate a batch of corpus rows against the manifest and decode it to numpy.

    Stage "ss": x0 (B, 8, 16, 16, 16) float32 and cond (B, T, C) float32 (an image corpus: views
    (B, V, S, S, 3) uint8 instead, every stored view decoded). Stage "slat":
    slat_coords, object array of (L, 3) int32; slat_feats, object array of (L, C) float32
    ((feats - mean) / std with the manifest's statistics when normalize_slat, as TRELLIS feeds
    them); cond. The shard of each row comes from a `path` column when present, else `shard`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    n = table.num_rows
    ids = table.column("asset_id").to_pylist() if "asset_id" in table.column_names else ["?"] * n
    if _PATH in table.column_names:
        prefix = "s3://" if manifest.uri.startswith("s3://") else ""
        paths = [prefix + p for p in table.column(_PATH).to_pylist()]
    else:
        paths = [shard or manifest.uri or "?"] * n
    for name in manifest.stage_columns(stage):
        if name not in table.column_names:
            raise CorpusError(f"shard {paths[0] if n else shard}: column {name!r} is missing")
        _check_list_column(table, name, manifest, paths, ids)
    out: dict[str, Any] = {}
    if stage == "ss":
        out["x0"] = _fixed_to_numpy(table.column("ss_latent"), manifest.latent_shape, "ss_latent", paths, ids)
    else:
        out.update(_decode_slat(table, manifest, paths, ids, normalize_slat))
    if manifest.holds_images:
        out[VIEWS_COLUMN] = _decode_views(table, manifest, paths, ids)
    else:
        out["cond"] = _fixed_to_numpy(table.column("cond"), manifest.cond_shape, "cond", paths, ids)
    if keep_asset_id:
        out["asset_id"] = np.asarray(ids, dtype=object)
    return out


def _decode_views(table: pa.Table, manifest: Manifest, paths: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """The stored condition views, decoded: (B, V, S, S, 3) uint8."""
    from mdt_ray.conditioning.views import ViewError, decode_view

    col = table.column(VIEWS_COLUMN)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    v, size = manifest.views, manifest.image_size
    blobs = col.flatten().to_pylist()
    out = np.empty((len(col), v, size, size, 3), np.uint8)
    for k, data in enumerate(blobs):
        row, view = divmod(k, v)
        try:
            out[row, view] = decode_view(data, size)
        except ViewError as e:
            raise CorpusError(f"{_where(paths, ids, row)}: view {view}: {e}") from None
    return out


def _decode_slat(table: pa.Table, manifest: Manifest, paths: Sequence[str], ids: Sequence[str],
                 normalize: bool) -> dict[str, np.ndarray]:
    c = manifest.slat_channels
    coords_col = table.column("slat_coords").combine_chunks()
    feats_col = table.column("slat_feats").combine_chunks()
    n_coord = _row_lengths(coords_col)
    n_feat = _row_lengths(feats_col)
    bad = np.nonzero(n_coord % 3)[0]
    if len(bad):
        row = int(bad[0])
        raise CorpusError(f"{_where(paths, ids, row)}: slat_coords holds {n_coord[row]} values, not a multiple of 3")
    voxels = n_coord // 3
    bad = np.nonzero(n_feat != voxels * c)[0]
    if len(bad):
        row = int(bad[0])
        raise CorpusError(
            f"{_where(paths, ids, row)}: slat_feats holds {n_feat[row]} values for {voxels[row]} "
            f"voxels; the manifest says {c} channels per voxel"
        )
    coords = coords_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, 3)
    feats = feats_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, c)
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():
        row = int(np.searchsorted(np.cumsum(voxels), np.nonzero(~finite)[0][0], side="right"))
        raise CorpusError(f"{_where(paths, ids, row)}: column 'slat_feats' holds NaN or inf")
    res = manifest.slat_resolution
    outside = np.nonzero((coords < 0).any(axis=1) | (coords >= res).any(axis=1))[0]
    if len(outside):
        row = int(np.searchsorted(np.cumsum(voxels), outside[0], side="right"))
        raise CorpusError(f"{_where(paths, ids, row)}: slat coordinates outside [0, {res})")
    if normalize:
        if len(manifest.slat_mean) != c or len(manifest.slat_std) != c:
            raise CorpusError(
                f"corpus {manifest.uri or paths[0]}: the manifest has no SLAT statistics to normalise "
                "with (a shard read on its own?); read the corpus folder, or pass normalize_slat=False"
            )
        feats = (feats - np.asarray(manifest.slat_mean, np.float32)) / np.asarray(manifest.slat_std, np.float32)
    splits = np.cumsum(voxels)[:-1]
    coords_rows = np.empty(len(voxels), dtype=object)
    feats_rows = np.empty(len(voxels), dtype=object)
    coords_rows[:] = np.split(coords, splits)
    feats_rows[:] = np.split(feats, splits)
    return {"slat_coords": coords_rows, "slat_feats": feats_rows}


class _Decode:
    """The map_batches step: holds only the manifest (small), so it pickles cheaply to tasks."""

    def __init__(self, manifest: Manifest, stage: str, keep_asset_id: bool, normalize_slat: bool):
        self.manifest = manifest
        self.stage = stage
        self.keep_asset_id = keep_asset_id
        self.normalize_slat = normalize_slat

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        return decode_table(table, self.manifest, self.stage, keep_asset_id=self.keep_asset_id,
                            normalize_slat=self.normalize_slat)


# -- shard checks --------------------------------------------------------------------------------
def verify_shards(manifest: Manifest, columns: Sequence[str], *,
                  target: Optional[str | StorageTarget] = None, threads: int = 16) -> None:
    """Read every shard's footer (in parallel) and refuse the corpus if one disagrees.

    Catches missing and corrupt shards, shards from another corpus, and shards whose column
    types differ from the manifest, before any training worker starts; for a type mismatch it
    also finds the first offending asset. `target` is where the manifest was read from: its
    endpoint and region reach the shards (default: the environment's).
    """
    corpus = storage.as_target(manifest.uri if target is None else target).with_uri(manifest.uri)
    fs, folder = corpus.pyarrow_fs()  # one client for all shards
    sizes = _listed_sizes(fs, folder, corpus.describe())

    def check(uri: str, name: str, rows: int) -> None:
        path = storage.bare_path(uri)
        where = corpus.with_uri(uri).describe()
        if sizes is not None and name not in sizes and "/" not in name:
            raise CorpusError(f"shard {where} is listed in the manifest but missing")
        size = None if sizes is None else sizes.get(name)
        meta, schema = read_shard_footer(fs, path, where, manifest, size=size)
        if meta.num_rows != rows:
            raise CorpusError(f"shard {where} has {meta.num_rows} rows, the manifest says {rows}")
        problems = schema_problems(schema, manifest, ["asset_id", *columns])
        if problems:
            _raise_first_bad_row(uri, fs, path, columns, manifest, where, problems)

    uris = manifest.shard_uris()
    pool = cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris))))
    try:
        futures = [pool.submit(check, u, s.path, s.num_rows) for u, s in zip(uris, manifest.shards)]
        for f in futures:
            f.result()
    finally:
        # At the first bad shard, the checks not yet started are dropped, not waited for.
        pool.shutdown(wait=True, cancel_futures=True)


def _listed_sizes(fs, folder: str, where: str) -> Optional[dict[str, int]]:
    """{file name: size} of the corpus folder, from one listing (on S3 a request per 1,000
    files); None where the store does not allow listing, so each shard is looked up instead."""
    import pyarrow.fs as pafs

    try:
        infos = storage.retry(lambda: fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)),
                              what=f"listing the shards of {where}")
    except PermissionError:
        return None
    except OSError as e:
        if "AccessDenied" in str(e) or "ACCESS_DENIED" in str(e):
            return None
        raise
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def _raise_first_bad_row(uri, fs, path, columns, manifest, where, problems) -> None:
    import pyarrow.parquet as pq

    readable = [c for c in ["asset_id", *columns] if not any(p.startswith(f"column {c!r} is missing") for p in problems)]
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=readable, batch_size=256):
                table = pa.Table.from_batches([batch])
                ids = table.column("asset_id").to_pylist() if "asset_id" in readable else ["?"] * len(table)
                for name in columns:
                    if name in table.column_names:
                        _check_list_column(table, name, manifest, [where] * len(table), ids)
    except CorpusError:
        raise
    except Exception:  # the footer-level problem below is still the message the user needs
        pass
    raise CorpusError(f"shard {where}: {'; '.join(problems)}")


# -- datasets ------------------------------------------------------------------------------------
def _manifest_of(target: StorageTarget, manifest: Optional[Manifest]) -> Manifest:
    """The caller's already-read manifest of `target`, else the one on storage."""
    if manifest is None:
        return read_manifest(target)
    # A single shard file's manifest names the folder that holds it.
    folder, here = storage.bare_path(manifest.uri), storage.bare_path(target.uri)
    if here != folder and not here.startswith(folder + "/"):
        raise ValueError(f"the manifest passed is that of {manifest.uri or '?'}, not of {target.uri}")
    return manifest


def make_dataset(
    target: str | StorageTarget,
    *,
    manifest: Optional[Manifest] = None,
    stage: str = "ss",
    shuffle: bool = True,
    seed: int = 0,
    keep_asset_id: bool = False,
    normalize_slat: bool = True,
    verify: bool = True,
    batch_size: int = 64,
    block_bytes: Optional[int] = 32 * 2**20,
    memory_bytes: Optional[int] = None,
    decode: str = "tasks",
) -> "ray.data.Dataset":  # noqa: F821
    """A Ray Dataset of decoded, validated corpus rows for `stage`, ready to hand to a trainer.

    `target` is the corpus (a path, URI or StorageTarget); `manifest`, when already read.
    Reads only the stage's columns; `shuffle` shuffles the order of shard files (seeded, and
    reshuffled each epoch); rows within a shard keep their order (add a local shuffle buffer in
    `torch_batches`). `batch_size` is the decode batch (rows per map_batches call).
    `block_bytes` is the target size of this dataset's Ray Data blocks, the unit that streams
    from read tasks to workers: smaller blocks mean an earlier first batch and less memory in
    flight, at a few ms of overhead each (None: Ray's default, 128 MiB). `memory_bytes` caps the
    object-store memory this dataset's streaming execution may hold (None: Ray's default budget,
    a share of the object store). Ray Train replaces a dataset's execution options with its
    DataConfig's, so under a TorchTrainer pass the same cap with `ingest_options`.

    `decode` says where rows are validated and decoded. "tasks" (the default): in Ray tasks
    after the read, so rows hold x0/cond float32 (or the stage-2 arrays) and any consumer can
    use them. "collate": nowhere in Ray; rows keep the stored columns (asset_id, the float16
    lists, the shard path) and `torch_batches(..., manifest=m)` / `slat_batches(..., manifest=m)`
    validate and decode each batch in the consumer, with the same checks and messages. That
    drops one pipeline stage and its float32 round trip through the object store (what that
    is worth: docs/scaling.md, section 4).
    """
    import ray

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if decode not in ("tasks", "collate"):
        raise ValueError(f"decode must be 'tasks' or 'collate', got {decode!r}")
    target = storage.as_target(target)
    manifest = _manifest_of(target, manifest)
    if stage not in manifest.stages:
        raise CorpusError(
            f"corpus {manifest.uri} holds no stage-{stage!r} data (manifest stages: {list(manifest.stages)})"
        )
    if not manifest.shards:
        raise CorpusError(f"corpus {manifest.uri} has no shards")
    columns = manifest.stage_columns(stage)
    if verify:
        verify_shards(manifest, columns, target=target)
    from mdt_ray.data.datasource import ManifestDatasource

    # Read tasks planned from the manifest (no listing, no second pass over the footers), many
    # small shards to a task: ray.data.read_parquet's start-up grew with the shard count.
    source = ManifestDatasource(target.with_uri(manifest.uri), manifest.shards, ["asset_id", *columns],
                                seed=seed if shuffle else None)
    ds = ray.data.read_datasource(source)
    _set_streaming(ds, block_bytes, memory_bytes)
    if decode == "collate":
        return ds
    # The decode step travels to every task: it needs the shapes and statistics, not the shard
    # list (thousands of entries at scale).
    slim = dataclasses.replace(manifest, shards=[])
    return ds.map_batches(
        _Decode(slim, stage, keep_asset_id, normalize_slat),
        batch_format="pyarrow",
        batch_size=batch_size,
        zero_copy_batch=True,
    )


def _set_streaming(ds, block_bytes: Optional[int], memory_bytes: Optional[int]) -> None:
    """Block size and memory cap on the dataset's own copy of the DataContext (other datasets
    keep their settings). Progress bars only on a terminal: in a log file (`ray job logs`, CI,
    `> out.txt`) Ray Data's bars are redrawn lines full of escape codes, and the training loop
    reports its own progress."""
    bars = sys.stderr.isatty()
    ds.context.enable_progress_bars = bars
    ds.context.enable_operator_progress_bars = bars
    if block_bytes is not None:
        if block_bytes < 2**20:
            raise ValueError(f"block_bytes must be at least 1 MiB, got {block_bytes}")
        ds.context.target_max_block_size = int(block_bytes)
    if memory_bytes is not None:
        ds.context.execution_options = ingest_options(memory_bytes, base=ds.context.execution_options)


def ingest_options(memory_bytes: int, *, base=None) -> "ray.data.ExecutionOptions":  # noqa: F821
    """Ray Data execution options whose object-store budget is `memory_bytes`.

    For `ray.train.DataConfig(execution_options=ingest_options(...))`: Ray Train overwrites each
    dataset's execution options with its DataConfig's when it splits the dataset across workers.
    """
    import copy

    import ray.data

    if memory_bytes < 64 * 2**20:
        raise ValueError(f"memory_bytes must be at least 64 MiB, got {memory_bytes}")
    options = copy.deepcopy(base if base is not None else ray.data.DataContext.get_current().execution_options)
    options.resource_limits = options.resource_limits.copy(object_store_memory=float(memory_bytes))
    return options


def load_local(target: str | StorageTarget, *, stage: str = "ss", limit: Optional[int] = None,
               manifest: Optional[Manifest] = None, normalize_slat: bool = True) -> dict[str, Any]:
    """Read (the first `limit` rows of) a corpus into numpy, shard by shard, without Ray.

    Returns the decode_table columns for `stage` plus `asset_id` (a list of str); stage "slat"
    gives lists of per-asset arrays for slat_coords and slat_feats. `manifest` is the corpus's
    manifest when the caller has read it already.
    """
    import pyarrow.parquet as pq

    target = storage.as_target(target)
    manifest = _manifest_of(target, manifest)
    if stage not in manifest.stages:
        raise CorpusError(f"corpus {manifest.uri} holds no stage-{stage!r} data (manifest stages: {list(manifest.stages)})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    columns = manifest.stage_columns(stage)
    parts: list[dict[str, Any]] = []
    remaining = manifest.num_rows if limit is None else min(limit, manifest.num_rows)
    for s_uri, info in zip(manifest.shard_uris(), manifest.shards):
        if remaining <= 0:
            break
        shard = target.with_uri(s_uri)
        fs, path = shard.pyarrow_fs()
        where = shard.describe()
        try:
            f = storage.retry(lambda: fs.open_input_file(path), what=f"opening shard {where}")
        except FileNotFoundError:
            raise CorpusError(f"shard {where} is listed in the manifest but missing") from None
        with f:
            try:
                pf = pq.ParquetFile(f, page_checksum_verification=True)
            except (pa.ArrowInvalid, OSError) as e:
                raise CorpusError(f"shard {where} is corrupt or not a Parquet file ({e})") from None
            schema = pf.schema_arrow
            check_header(header_of(schema, where=f"shard {where}"), manifest, where=f"shard {where}")
            if schema_problems(schema, manifest, ["asset_id", *columns]):
                _raise_first_bad_row(s_uri, fs, path, columns, manifest, where,
                                     schema_problems(schema, manifest, ["asset_id", *columns]))
            try:
                for batch in pf.iter_batches(columns=["asset_id", *columns], batch_size=256):
                    table = pa.Table.from_batches([batch]).slice(0, remaining)
                    parts.append(decode_table(table, manifest, stage, shard=where, keep_asset_id=True,
                                              normalize_slat=normalize_slat))
                    remaining -= table.num_rows
                    if remaining <= 0:
                        break
            except (pa.ArrowInvalid, OSError) as e:
                raise CorpusError(f"shard {where} could not be read: {e}") from None
    return _concat(parts, stage, manifest)


def _concat(parts: list[dict[str, Any]], stage: str, manifest: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = {"asset_id": [a for p in parts for a in p["asset_id"]]}
    if manifest.holds_images:
        views = [p[VIEWS_COLUMN] for p in parts]
        out[VIEWS_COLUMN] = (np.concatenate(views) if views else
                             np.zeros((0, manifest.views, manifest.image_size, manifest.image_size, 3), np.uint8))
    else:
        cond = [p["cond"] for p in parts]
        out["cond"] = np.concatenate(cond) if cond else np.zeros((0, *manifest.cond_shape), np.float32)
    if stage == "ss":
        x0 = [p["x0"] for p in parts]
        out["x0"] = np.concatenate(x0) if x0 else np.zeros((0, *manifest.latent_shape), np.float32)
    else:
        out["slat_coords"] = [c for p in parts for c in p["slat_coords"]]
        out["slat_feats"] = [f for p in parts for f in p["slat_feats"]]
    return out


# -- batches for the training loop ---------------------------------------------------------------
_OUR_ERROR = re.compile(r"mdt_ray\.data\.schema\.CorpusError: (.+)")


def _plain_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """Re-raise errors from Ray tasks as short CorpusErrors that name the shard.

    A CorpusError raised by a read task (a shard missing or damaged) or by the decode step (a
    bad row) reaches the driver wrapped in a RayTaskError that carries the worker's traceback;
    it becomes one line here.
    """
    try:
        yield from batches
    except Exception as exc:
        cause = getattr(exc, "cause", None)
        for inner in (cause, getattr(cause, "__cause__", None)):
            if isinstance(inner, CorpusError):
                raise CorpusError(str(inner)) from exc
        # Ray Data wraps a UDF's error in UserCodeException and may keep only its text.
        ours = _OUR_ERROR.search(str(exc))
        if ours is not None:
            raise CorpusError(ours.group(1).strip()) from exc
        raise


def _collate(manifest: Optional[Manifest]):
    """The collate step of torch_batches: tensors from decoded rows, or decode + validate here."""
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn

    class SSCollate(NumpyBatchCollateFn):
        """Numpy batch of decoded rows -> {"x0", "cond"} float32 tensors; other columns are left."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            if "ss_latent" in batch:
                raise CorpusError(
                    "the rows hold the stored columns (make_dataset(decode='collate')): pass the "
                    "corpus manifest to torch_batches(..., manifest=read_manifest(uri))"
                )
            cond = VIEWS_COLUMN if VIEWS_COLUMN in batch else "cond"
            missing = [k for k in ("x0", cond) if k not in batch]
            if missing:
                raise CorpusError(
                    f"torch_batches needs stage-'ss' rows (x0, cond or views); the batch has {sorted(batch)} "
                    "(use slat_batches for stage 'slat')"
                )
            # np.require copies only arrays Ray hands over read-only (torch warns on those).
            return {"x0": torch.from_numpy(np.require(batch["x0"], np.float32, ["C", "W"])),
                    cond: torch.from_numpy(np.require(batch[cond], None, ["C", "W"]))}

    class SSDecodeCollate(ArrowBatchCollateFn):
        """Arrow batch of stored rows -> validated, decoded {"x0", "cond"} float32 tensors."""

        def __init__(self, manifest: Manifest):
            super().__init__()
            self.manifest = manifest

        def __call__(self, table: pa.Table) -> dict[str, Any]:
            if "ss_latent" not in table.column_names:
                raise CorpusError(
                    f"torch_batches(manifest=...) decodes stored stage-'ss' rows; the batch has "
                    f"{table.column_names} (rows from make_dataset(decode='tasks') need no manifest)"
                )
            out = decode_table(table, self.manifest, "ss")
            # Freshly decoded, writable arrays: the tensors share them, no copy.
            return {k: torch.from_numpy(out[k]) for k in ("x0", "cond", VIEWS_COLUMN) if k in out}

    return SSCollate() if manifest is None else SSDecodeCollate(dataclasses.replace(manifest, shards=[]))


def torch_batches(source, batch_size: int, *, device: Any = "cpu", drop_last: bool = True,
                  local_shuffle_buffer: int = 0, seed: Optional[int] = None,
                  prefetch_batches: int = 1, manifest: Optional[Manifest] = None) -> Iterator[dict[str, Any]]:
    """Batches {"x0": (B, 8, 16, 16, 16), "cond": (B, T, C)} float32 tensors on `device`; from an
    image corpus, "views" (B, V, S, S, 3) uint8 in place of "cond".

    `source` is what `ray.train.get_dataset_shard("train")` returns, or a Dataset. Rows pass
    through a local shuffle buffer of `local_shuffle_buffer` rows when it is > 0 (it must hold at
    least one batch). For a dataset made with make_dataset(decode="collate"), pass its
    `manifest`: each batch is then validated and decoded here.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if local_shuffle_buffer < 0:
        raise ValueError(f"local_shuffle_buffer must be >= 0, got {local_shuffle_buffer}")
    if 0 < local_shuffle_buffer < batch_size:
        raise ValueError(
            f"local_shuffle_buffer ({local_shuffle_buffer}) must be 0 or at least batch_size ({batch_size})"
        )
    return _plain_errors(
        source.iter_torch_batches(
            batch_size=batch_size,
            device=device,
            drop_last=drop_last,
            local_shuffle_buffer_size=local_shuffle_buffer or None,
            local_shuffle_seed=seed,
            prefetch_batches=prefetch_batches,
            collate_fn=_collate(manifest),
        )
    )


def slat_batches(source, batch_size: int, *, device: Any = "cpu", drop_last: bool = True,
                 local_shuffle_buffer: int = 0, seed: Optional[int] = None,
                 manifest: Optional[Manifest] = None) -> Iterator[dict[str, Any]]:
    """Stage-2 batches in TRELLIS's sparse layout.

    Yields {"coords": (N, 4) int32 rows [b, x, y, z], "feats": (N, C) float32, "cond": (B, T, C)
    float32, "counts": (B,) voxels per asset}, with the rows of asset b contiguous and in stored
    order. For make_dataset(stage="slat", decode="collate") rows, pass the corpus `manifest`.
    """
    import torch

    if 0 < local_shuffle_buffer < batch_size:
        raise ValueError(
            f"local_shuffle_buffer ({local_shuffle_buffer}) must be 0 or at least batch_size ({batch_size})"
        )
    slim = dataclasses.replace(manifest, shards=[]) if manifest is not None else None
    batches = source.iter_batches(batch_size=batch_size, batch_format="pyarrow" if slim else "numpy",
                                  drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer or None,
                                  local_shuffle_seed=seed)
    for batch in _plain_errors(batches):
        if slim is not None:
            if "slat_coords" not in batch.column_names:
                raise CorpusError(f"slat_batches(manifest=...) decodes stored stage-'slat' rows; the batch has {batch.column_names}")
            batch = decode_table(batch, slim, "slat")
        elif _PATH in batch:  # only undecoded rows still carry the shard path
            raise CorpusError(
                "the rows hold the stored columns (make_dataset(decode='collate')): pass the corpus "
                "manifest to slat_batches(..., manifest=read_manifest(uri))"
            )
        elif "slat_coords" not in batch:
            raise CorpusError(f"slat_batches needs stage-'slat' rows; the batch has {sorted(batch)}")
        coords = [np.asarray(c, dtype=np.int32).reshape(-1, 3) for c in batch["slat_coords"]]
        feats = [np.asarray(f, dtype=np.float32) for f in batch["slat_feats"]]
        counts = np.array([len(c) for c in coords], dtype=np.int64)
        index = np.repeat(np.arange(len(coords), dtype=np.int32), counts)
        flat = np.concatenate(coords) if coords else np.zeros((0, 3), np.int32)
        yield {
            "coords": torch.from_numpy(np.concatenate([index[:, None], flat], axis=1)).to(device),
            "feats": torch.from_numpy(np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)).to(device),
            "counts": torch.from_numpy(counts),
            **({VIEWS_COLUMN: torch.from_numpy(np.require(batch[VIEWS_COLUMN], np.uint8, ["C", "W"])).to(device)}
               if VIEWS_COLUMN in batch else
               {"cond": torch.from_numpy(np.require(batch["cond"], np.float32, ["C", "W"])).to(device)}),
        }
