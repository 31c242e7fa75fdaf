"""Writing corpora: rows -> Arrow record batches -> Parquet shards -> manifest; and inspecting them.

A build is a list of shard tasks. Each task is independent (it produces its own rows and writes
its own shard), so the same plan runs in this process, in a local process pool, or as Ray tasks
across a cluster, and shard `k` holds the same rows whichever ran it. The manifest
(`_common_metadata`) is written last, from the shards' returned summaries.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mdt_ray.data import storage
from mdt_ray.data.storage import StorageTarget
from mdt_ray.data.schema import (
    MANIFEST_FILE,
    SHARD_PATTERN,
    VIEWS_COLUMN,
    CorpusError,
    Manifest,
    ShardInfo,
    read_manifest,
)

# Row groups of about this many uncompressed bytes: small enough that a reader streams a shard in
# pieces (a row group is the smallest unit Parquet decodes), big enough to keep per-group overhead
# and S3 request counts low.
ROW_GROUP_BYTES = 32 * 2**20
# Shards of about this many uncompressed bytes (DESIGN §3: 128–512 MB).
SHARD_BYTES = 256 * 2**20
COMPRESSION = "zstd"

Columns = dict[str, Any]  # asset_id: list[str], ss_latent: (n, *latent), slat_*: lists, cond: (n, T, C)


# -- rows -> Arrow -------------------------------------------------------------------------------
def row_bytes(manifest: Manifest, mean_voxels: float, view_bytes: int = 0) -> int:
    """Uncompressed bytes of one row: float16 latent and cond, int16 coords, float16 feats, and
    `view_bytes` per stored view."""
    per_voxel = 3 * 2 + manifest.slat_channels * 2
    return int(manifest.latent_size * 2 + manifest.cond_size * 2 + mean_voxels * per_voxel + 64
               + manifest.views * view_bytes)


def to_record_batch(cols: Columns, manifest: Manifest, *, where: str) -> pa.RecordBatch:
    """Check every row's shapes against the manifest and convert to the corpus schema."""
    ids = [str(a) for a in cols["asset_id"]]
    n = len(ids)
    latent = np.asarray(cols["ss_latent"])
    if manifest.holds_images:
        views = _views_array(cols[VIEWS_COLUMN], ids, manifest, where)
        cond = np.zeros((n, *manifest.cond_shape), np.float16)
    else:
        cond = np.asarray(cols["cond"])
    for name, arr, shape in (("ss_latent", latent, manifest.latent_shape), ("cond", cond, manifest.cond_shape)):
        if arr.shape != (n, *shape):
            bad = ids[0] if n else "?"
            raise CorpusError(
                f"{where}: column {name!r} has shape {arr.shape[1:]} per row (first asset "
                f"{bad!r}), the manifest says {tuple(shape)}"
            )
        if not np.isfinite(arr).all():
            row = int(np.nonzero(~np.isfinite(arr.reshape(n, -1)).all(axis=1))[0][0])
            raise CorpusError(f"{where}: asset {ids[row]!r} has non-finite values in {name!r}")
    coords_list, feats_list = cols["slat_coords"], cols["slat_feats"]
    if len(coords_list) != n or len(feats_list) != n:
        raise CorpusError(f"{where}: {n} asset ids but {len(coords_list)} slat_coords and {len(feats_list)} slat_feats")
    lengths = np.zeros(n + 1, dtype=np.int64)
    for i, (c, f) in enumerate(zip(coords_list, feats_list)):
        c, f = np.asarray(c), np.asarray(f)
        if c.ndim != 2 or c.shape[1] != 3:
            raise CorpusError(f"{where}: asset {ids[i]!r} slat_coords has shape {c.shape}, expected (L, 3)")
        if f.shape != (c.shape[0], manifest.slat_channels):
            raise CorpusError(
                f"{where}: asset {ids[i]!r} slat_feats has shape {f.shape}, expected "
                f"({c.shape[0]}, {manifest.slat_channels}) to match its {c.shape[0]} coordinates"
            )
        if c.size and (c.min() < 0 or c.max() >= manifest.slat_resolution):
            raise CorpusError(
                f"{where}: asset {ids[i]!r} has slat coordinates outside [0, {manifest.slat_resolution})"
            )
        if not np.isfinite(f).all():
            raise CorpusError(f"{where}: asset {ids[i]!r} has non-finite values in 'slat_feats'")
        lengths[i + 1] = c.shape[0]
    offsets = np.cumsum(lengths)
    if offsets[-1] * manifest.slat_channels >= 2**31:
        raise CorpusError(f"{where}: a record batch holds too many voxels ({offsets[-1]}); write smaller batches")

    def flat(values: list, dtype) -> np.ndarray:
        parts = [np.asarray(v, dtype=dtype).reshape(-1) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    coords = flat(coords_list, np.int16)
    feats = flat(feats_list, np.float16)
    arrays = [
        pa.array(ids, type=pa.string()),
        pa.FixedSizeListArray.from_arrays(
            pa.array(latent.astype(np.float16, copy=False).reshape(-1)), manifest.latent_size
        ),
        pa.ListArray.from_arrays(pa.array((offsets * 3).astype(np.int32)), pa.array(coords)),
        pa.ListArray.from_arrays(
            pa.array((offsets * manifest.slat_channels).astype(np.int32)), pa.array(feats)
        ),
        views if manifest.holds_images else pa.FixedSizeListArray.from_arrays(
            pa.array(cond.astype(np.float16, copy=False).reshape(-1)), manifest.cond_size
        ),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=manifest.schema())


def _views_array(rows: Sequence[Sequence[bytes]], ids: Sequence[str], manifest: Manifest, where: str) -> pa.Array:
    """The `views` column: exactly manifest.views non-empty compressed images per row."""
    for i, row in enumerate(rows):
        if len(row) != manifest.views or not all(isinstance(b, bytes) and b for b in row):
            raise CorpusError(f"{where}: asset {ids[i]!r} has {len(row)} views (or an empty one), "
                              f"the manifest says {manifest.views}")
    flat = pa.array([b for row in rows for b in row], type=pa.binary())
    return pa.FixedSizeListArray.from_arrays(flat, manifest.views)


# -- one shard -----------------------------------------------------------------------------------
class ShardWriter:
    """Streams record batches into one Parquet shard in row groups of about ROW_GROUP_BYTES.

    Also sums the per-asset channel statistics the manifest needs, from the stored (float16)
    values, so the statistics describe exactly what readers will see.
    """

    def __init__(self, target: str | StorageTarget, manifest: Manifest, *, rows_per_group: int):
        target = storage.as_target(target)
        self.uri = target.uri
        self.manifest = manifest
        self.rows_per_group = max(1, int(rows_per_group))
        fs, path = target.pyarrow_fs()
        if not target.is_s3:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._stream = fs.open_output_stream(path)
        self._writer = pq.ParquetWriter(
            self._stream,
            manifest.schema(),
            compression=COMPRESSION,
            # Plain encoding for the numeric lists: Ray Data sizes its read tasks and batches from
            # Parquet's "uncompressed" (decoded-page) sizes, and a dictionary-encoded ±1 latent
            # reports 1/60 of its real size there, so Ray would pack the whole corpus into one
            # read task and one block instead of streaming it. zstd still shrinks the file.
            use_dictionary=["asset_id"],
            write_page_checksum=True,
            write_statistics=["asset_id"],
        )
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.num_rows = 0
        c = manifest.latent_shape[0]
        self.ss_sum = np.zeros(c)
        self.ss_sumsq = np.zeros(c)
        self.slat_assets = 0
        self.slat_sum = np.zeros(manifest.slat_channels)
        self.slat_sumsq = np.zeros(manifest.slat_channels)
        self.num_voxels = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._accumulate(batch)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= self.rows_per_group:
            self._flush()

    def _accumulate(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        c = self.manifest.latent_shape[0]
        lat = batch.column("ss_latent").values.to_numpy(zero_copy_only=False).astype(np.float64)
        lat = lat.reshape(n, c, -1)
        self.ss_sum += lat.mean(axis=2).sum(axis=0)
        self.ss_sumsq += (lat * lat).mean(axis=2).sum(axis=0)
        feats_col = batch.column("slat_feats")
        offsets = feats_col.offsets.to_numpy()
        values = feats_col.values.to_numpy(zero_copy_only=False).astype(np.float64)
        k = self.manifest.slat_channels
        for i in range(n):
            f = values[offsets[i]:offsets[i + 1]].reshape(-1, k)
            if len(f):
                self.slat_assets += 1
                self.slat_sum += f.mean(axis=0)
                self.slat_sumsq += (f * f).mean(axis=0)
                self.num_voxels += len(f)
        self.num_rows += n

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending)
        self._writer.write_table(table, row_group_size=self.rows_per_group)
        self._pending, self._pending_rows = [], 0

    def close(self) -> ShardInfo:
        self._flush()
        self._writer.close()
        num_bytes = self._stream.tell()
        self._stream.close()
        return ShardInfo(
            path=self.uri.rsplit("/", 1)[-1],
            num_rows=self.num_rows,
            num_bytes=int(num_bytes),
            ss_sum=self.ss_sum.tolist(),
            ss_sumsq=self.ss_sumsq.tolist(),
            slat_assets=self.slat_assets,
            slat_sum=self.slat_sum.tolist(),
            slat_sumsq=self.slat_sumsq.tolist(),
            num_voxels=self.num_voxels,
        )

    def abort(self) -> None:
        try:
            self._writer.close()
            self._stream.close()
        except Exception:  # the original error is the one worth reporting
            pass


# -- building a corpus ---------------------------------------------------------------------------
@dataclass
class ShardTask:
    """Everything a worker needs to produce shard `index`; must pickle (it travels to Ray)."""

    index: int
    num_rows: int
    produce: Callable[..., Iterator[Columns]]  # module-level: produce(**spec) yields Columns
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildPlan:
    manifest: Manifest  # header fields set; statistics and shards are filled at the end
    tasks: list[ShardTask]
    rows_per_group: int


def write_shard(task: ShardTask, out: StorageTarget, manifest: Manifest, rows_per_group: int,
                progress: Optional[Callable[[int], None]] = None) -> ShardInfo:
    """Produce and write one shard of the corpus at `out`; a transient storage error reruns it whole."""
    shard = out.join(SHARD_PATTERN.format(index=task.index))
    where = shard.describe()

    def attempt() -> ShardInfo:
        writer = ShardWriter(shard, manifest, rows_per_group=rows_per_group)
        try:
            for cols in task.produce(**task.spec):
                writer.write(to_record_batch(cols, manifest, where=where))
                if progress is not None:
                    progress(len(cols["asset_id"]))
            info = writer.close()
        except BaseException:
            writer.abort()
            raise
        if info.num_rows != task.num_rows:
            raise CorpusError(f"{where}: wrote {info.num_rows} rows, the plan asked for {task.num_rows}")
        return info

    return storage.retry(attempt, what=f"writing shard {where}", attempts=3)


def prepare_output(target: str | StorageTarget, *, overwrite: bool) -> None:
    """Refuse to write over a corpus unless asked; with overwrite, remove its old files first."""
    target = storage.as_target(target)
    target.check_bucket()
    fs, path = target.pyarrow_fs()
    info = storage.retry(lambda: fs.get_file_info(path), what=f"looking up {target.uri}")
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.File:
        raise CorpusError(f"output {target.describe()} is a file, not a folder")
    listing = storage.retry(
        lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), what=f"listing {target.uri}"
    )
    ours = [i for i in listing if i.base_name == MANIFEST_FILE or
            (i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))]
    if not ours:
        return
    if not overwrite:
        raise CorpusError(
            f"output {target.describe()} already holds a corpus "
            f"({len(ours)} files); pass --overwrite to replace it"
        )
    for i in ours:  # the manifest first: a half-deleted corpus must not look complete
        if i.base_name == MANIFEST_FILE:
            fs.delete_file(i.path)
    for i in ours:
        if i.base_name != MANIFEST_FILE:
            storage.retry(lambda p=i.path: fs.delete_file(p), what=f"deleting {i.path}")


def finish_corpus(target: str | StorageTarget, manifest: Manifest, shards: Sequence[ShardInfo]) -> Manifest:
    target = storage.as_target(target)
    manifest.finalize(sorted(shards, key=lambda s: s.path))
    fs, path = target.pyarrow_fs()

    def _write() -> None:
        with fs.open_output_stream(f"{path}/{MANIFEST_FILE}") as f:
            pq.write_metadata(manifest.schema(with_manifest=True), f)

    storage.retry(_write, what=f"writing the manifest of {target.describe()}")
    manifest.uri = target.uri
    return manifest


class _Progress:
    """A tqdm bar on stderr when there is one to draw; silent otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # A log file (ray job logs) gets a line per update: update it rarely there.
            interval = 1.0 if sys.stderr.isatty() else 15.0
            self.bar = tqdm(total=total, desc=desc, unit="asset", mininterval=interval,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _shard_in_subprocess(task, out, manifest, rows_per_group, queue) -> ShardInfo:
    return write_shard(task, out, manifest, rows_per_group, progress=queue.put)


def _want_ray(use_ray: Optional[bool]) -> bool:
    if use_ray is not None:
        return use_ray
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def run_plan(plan: BuildPlan, target: str | StorageTarget, *, workers: Optional[int] = None,
             use_ray: Optional[bool] = None, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Write every shard of `plan` to `target`, then the manifest. Returns the final manifest.

    Ray is used when asked, or (use_ray=None) when a Ray session is up or RAY_ADDRESS names a
    cluster: one task per shard. Otherwise `workers` local processes (default: the CPU count,
    capped by the shard count), or this process alone when that is 1.
    """
    out = storage.as_target(target)
    prepare_output(out, overwrite=overwrite)
    total = sum(t.num_rows for t in plan.tasks)
    bar = _Progress(total, f"corpus -> {out.uri}", progress)
    start = time.monotonic()
    try:
        if _want_ray(use_ray):
            infos = _run_ray(plan, out, bar)
        else:
            n = workers if workers is not None else (os.cpu_count() or 1)
            n = max(1, min(n, len(plan.tasks)))
            infos = _run_local(plan, out, bar, n)
    finally:
        bar.close()
    manifest = finish_corpus(out, plan.manifest, infos)
    if progress:
        mb = sum(s.num_bytes for s in infos) / 2**20
        print(f"wrote {manifest.num_rows} assets in {len(infos)} shard(s), {mb:.1f} MiB, to {out.uri} "
              f"in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return manifest


def _run_local(plan: BuildPlan, out: StorageTarget, bar: _Progress, workers: int) -> list[ShardInfo]:
    if workers == 1:
        return [write_shard(t, out, plan.manifest, plan.rows_per_group, bar.update) for t in plan.tasks]
    # spawn, not fork: the parent may hold threads (pyarrow's pools, an S3 client) that a forked
    # child would inherit in a locked state.
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [
                pool.submit(_shard_in_subprocess, t, out, plan.manifest, plan.rows_per_group, queue)
                for t in plan.tasks
            ]
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                _drain(queue, bar)
                for f in done:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()
            _drain(queue, bar)
            return [f.result() for f in futures]


def _drain(queue, bar: _Progress) -> None:
    import queue as queue_mod

    while True:
        try:
            bar.update(queue.get_nowait())
        except queue_mod.Empty:
            return


def _run_ray(plan: BuildPlan, out: StorageTarget, bar: _Progress) -> list[ShardInfo]:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    refs = {remote.remote(t, out, plan.manifest, plan.rows_per_group): t for t in plan.tasks}
    infos: list[ShardInfo] = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                infos.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                # The task's own error (a bad row, a missing bucket) reads better than Ray's
                # wrapper with the worker's traceback.
                if isinstance(e.cause, (CorpusError, storage.StorageError)):
                    for other in pending:
                        ray.cancel(other)
                    raise e.cause from None
                raise
            bar.update(refs[ref].num_rows)
    return infos


def shard_counts(num_rows: int, *, rows_per_shard: Optional[int] = None,
                 num_shards: Optional[int] = None, row_nbytes: int = 1) -> list[int]:
    """Rows per shard: as even as possible, by an explicit count or size, else ~SHARD_BYTES each."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if num_shards is not None and rows_per_shard is not None:
        raise ValueError("give the shard count or the rows per shard, not both")
    if num_shards is None:
        per = rows_per_shard or max(1, SHARD_BYTES // max(1, row_nbytes))
        if per < 1:
            raise ValueError(f"rows per shard must be >= 1, got {per}")
        num_shards = max(1, math.ceil(num_rows / per))
    if num_shards < 1:
        raise ValueError(f"shard count must be >= 1, got {num_shards}")
    num_shards = min(num_shards, max(1, num_rows))
    base, extra = divmod(num_rows, num_shards)
    return [base + (1 if k < extra else 0) for k in range(num_shards)]


# -- synthetic corpus ----------------------------------------------------------------------------
SYNTHETIC_CHUNK = 64  # assets generated (and cond-encoded) together


def synthetic_rows(*, seed: int, start: int, stop: int, views: int = 0) -> Iterator[Columns]:
    from mdt_ray.data import synthetic

    for lo in range(start, stop, SYNTHETIC_CHUNK):
        assets = synthetic.make_assets(seed, lo, min(stop, lo + SYNTHETIC_CHUNK))
        cols = {
            "asset_id": [a.asset_id for a in assets],
            "ss_latent": np.stack([a.ss_latent for a in assets]),
            "slat_coords": [a.slat_coords for a in assets],
            "slat_feats": [a.slat_feats for a in assets],
        }
        if views:
            from mdt_ray.conditioning.views import encode_view

            cols[VIEWS_COLUMN] = [[encode_view(img, "png") for img in synthetic.view_images(a.occupancy, views)]
                                  for a in assets]
        else:
            cols["cond"] = np.stack([a.cond for a in assets])
        yield cols


def synthetic_plan(num_assets: int, *, seed: int = 0, rows_per_shard: Optional[int] = None,
                   num_shards: Optional[int] = None, views: int = 0) -> BuildPlan:
    """`views` > 0: an image corpus, that many rendered views per asset (PNG) instead of tokens."""
    from mdt_ray.data import synthetic

    if num_assets < 1:
        raise ValueError(f"--num-assets must be >= 1, got {num_assets}")
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    manifest = Manifest(
        views=views, image_size=synthetic.IMAGE_SIZE if views else 0, image_format="png" if views else "",
        latent_shape=synthetic.LATENT_SHAPE,
        cond_shape=(0, 0) if views else synthetic.COND_SHAPE,
        slat_channels=synthetic.SLAT_CHANNELS,
        slat_resolution=synthetic.SLAT_RESOLUTION,
        stages=("ss", "slat"),
        source={
            "kind": "synthetic",
            "seed": int(seed),
            "num_assets": int(num_assets),
            "generator_version": synthetic.GENERATOR_VERSION,
            "encoder_seed": synthetic.ENCODER_SEED,
            "families": list(synthetic.FAMILIES),
        },
    )
    nbytes = row_bytes(manifest, mean_voxels=600, view_bytes=3000)
    counts = shard_counts(num_assets, rows_per_shard=rows_per_shard, num_shards=num_shards, row_nbytes=nbytes)
    tasks, start = [], 0
    for k, n in enumerate(counts):
        tasks.append(ShardTask(index=k, num_rows=n, produce=synthetic_rows,
                               spec={"seed": int(seed), "start": start, "stop": start + n, "views": int(views)}))
        start += n
    return BuildPlan(manifest=manifest, tasks=tasks, rows_per_group=max(1, ROW_GROUP_BYTES // nbytes))


def build_synthetic(target: str | StorageTarget, num_assets: int, *, seed: int = 0,
                    rows_per_shard: Optional[int] = None, num_shards: Optional[int] = None,
                    workers: Optional[int] = None, use_ray: Optional[bool] = None, overwrite: bool = False,
                    progress: bool = True, views: int = 0) -> Manifest:
    plan = synthetic_plan(num_assets, seed=seed, rows_per_shard=rows_per_shard, num_shards=num_shards, views=views)
    return run_plan(plan, target, workers=workers, use_ray=use_ray, overwrite=overwrite, progress=progress)


# -- inspection ----------------------------------------------------------------------------------
def inspect_corpus(target: str | StorageTarget, *, check_shards: bool = True) -> dict[str, Any]:
    """Manifest, row count and sizes (per shard and per column, compressed and not) of a corpus."""
    from mdt_ray.data.schema import read_shard_footer, schema_problems

    target = storage.as_target(target)
    manifest = read_manifest(target)
    columns: dict[str, dict[str, int]] = {}
    shards = []
    for s, s_uri in zip(manifest.shards, manifest.shard_uris()):
        entry = {"path": s.path, "num_rows": s.num_rows, "num_bytes": s.num_bytes}
        if check_shards:
            shard = target.with_uri(s_uri)
            fs, path = shard.pyarrow_fs()
            where = shard.describe()
            meta, schema = read_shard_footer(fs, path, where, manifest)
            problems = schema_problems(schema, manifest)
            if problems:
                raise CorpusError(f"{where}: {'; '.join(problems)}")
            if meta.num_rows != s.num_rows:
                raise CorpusError(f"{where}: {meta.num_rows} rows, the manifest says {s.num_rows}")
            entry["row_groups"] = meta.num_row_groups
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    name = col.path_in_schema.split(".")[0]
                    acc = columns.setdefault(name, {"compressed": 0, "uncompressed": 0})
                    acc["compressed"] += col.total_compressed_size
                    acc["uncompressed"] += col.total_uncompressed_size
        shards.append(entry)
    n = max(1, manifest.num_rows)
    total = sum(s.num_bytes for s in manifest.shards)
    return {
        "uri": manifest.uri,
        "manifest": manifest.to_json_dict() | {"shards": len(manifest.shards)},
        "num_rows": manifest.num_rows,
        "num_shards": len(manifest.shards),
        "total_bytes": total,
        "bytes_per_asset": total / n,
        "mean_voxels": sum(s.num_voxels for s in manifest.shards) / n,
        "columns": {
            k: {**v, "compressed_per_asset": v["compressed"] / n, "uncompressed_per_asset": v["uncompressed"] / n}
            for k, v in columns.items()
        },
        "shards": shards,
    }
