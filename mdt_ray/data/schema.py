"""The corpus schema (DESIGN §3) as an Arrow schema, and its manifest.

A corpus is a folder (local or `s3://`) of Parquet shards `part-NNNNN.parquet` plus a schema-only
Parquet file `_common_metadata` (the Parquet convention for a dataset's shared schema; readers
that list the folder skip names starting with `_`). Both carry JSON under the schema metadata key
`mdt_ray.manifest`:

- in each shard, the *header*: format version, shapes, stages present, source, and the shard's
  index. It is known before the first row is written, so a shard is self-describing on its own;
- in `_common_metadata`, the *corpus manifest*: the header plus the row count, the shard list
  (rows, bytes, per-shard sums for the statistics) and the normalisation statistics. It is written
  last, so a corpus without it is an unfinished build, never a silently partial one.

Readers compare every shard's header and column types with the corpus manifest and refuse a
mismatch, naming the shard.

The condition is either `cond`, float16 tokens (T, C) per asset, or, in an image corpus, `views`:
V compressed condition images per asset (the manifest's `views`, `image_size`, `image_format`),
which a frozen encoder on each training worker turns into tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from mdt_ray.data.storage import StorageTarget

FORMAT_VERSION = 1
MANIFEST_KEY = b"mdt_ray.manifest"
MANIFEST_FILE = "_common_metadata"
SHARD_PATTERN = "part-{index:05d}.parquet"

LATENT_SHAPE = (8, 16, 16, 16)  # C×D×H×W of TRELLIS's sparse-structure latent
SLAT_CHANNELS = 8
COLUMNS = ("asset_id", "ss_latent", "slat_coords", "slat_feats", "cond")
STAGE_COLUMNS = {"ss": ("ss_latent", "cond"), "slat": ("slat_coords", "slat_feats", "cond")}
# An image corpus stores, instead of `cond` tokens, `views`: V compressed condition images per
# asset (TRELLIS's crop already applied), which a frozen encoder on the worker turns into tokens.
VIEWS_COLUMN = "views"

# TRELLIS's published SLAT normalisation (spec §1.2: configs/generation/slat_flow_img_dit_L_64l8p2
# and the MDT-dist config give the same numbers). Used when an import has no stats.json.
TRELLIS_SLAT_MEAN = (
    -2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
    -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826,
)
TRELLIS_SLAT_STD = (
    2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695,
    2.663944721221924, 2.371192216873169, 2.6217446327209473, 2.684523105621338,
)


class CorpusError(ValueError):
    """The corpus or one of its shards disagrees with the manifest; the message names where."""


def corpus_schema(
    cond_shape: Sequence[int],
    *,
    latent_shape: Sequence[int] = LATENT_SHAPE,
    header: Optional[dict[str, Any]] = None,
    views: int = 0,
) -> pa.Schema:
    """The Arrow schema of a shard; `header` (JSON-able) goes under MANIFEST_KEY. `views` > 0:
    an image corpus, whose `views` column replaces `cond`."""
    latent_size = math.prod(latent_shape)
    cond_size = math.prod(cond_shape)
    last = (pa.field(VIEWS_COLUMN, pa.list_(pa.binary(), views), nullable=False) if views
            else pa.field("cond", pa.list_(pa.float16(), cond_size), nullable=False))
    schema = pa.schema(
        [
            pa.field("asset_id", pa.string(), nullable=False),
            pa.field("ss_latent", pa.list_(pa.float16(), latent_size), nullable=False),
            pa.field("slat_coords", pa.list_(pa.int16()), nullable=False),
            pa.field("slat_feats", pa.list_(pa.float16()), nullable=False),
            last,
        ]
    )
    if header is not None:
        schema = schema.with_metadata({MANIFEST_KEY: json.dumps(header, sort_keys=True).encode()})
    return schema


@dataclass
class ShardInfo:
    path: str  # file name, relative to the corpus folder
    num_rows: int
    num_bytes: int
    # Sums over the shard's assets of each asset's per-channel mean and mean square; the corpus
    # statistics are merged from these (spec §1.2's recipe, which weights every asset equally).
    ss_sum: list[float] = field(default_factory=list)
    ss_sumsq: list[float] = field(default_factory=list)
    slat_assets: int = 0
    slat_sum: list[float] = field(default_factory=list)
    slat_sumsq: list[float] = field(default_factory=list)
    num_voxels: int = 0  # total stage-2 voxels in the shard


@dataclass
class Manifest:
    latent_shape: tuple[int, ...]
    cond_shape: tuple[int, int]
    slat_channels: int = SLAT_CHANNELS
    slat_resolution: int = 64  # stage-2 coordinates lie in [0, slat_resolution)
    stages: tuple[str, ...] = ("ss", "slat")  # which stages' columns hold data
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    num_rows: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    ss_mean: list[float] = field(default_factory=list)
    ss_std: list[float] = field(default_factory=list)
    slat_mean: list[float] = field(default_factory=list)
    slat_std: list[float] = field(default_factory=list)
    slat_stats_from: str = "corpus"  # "corpus" (computed here) or where they came from
    # Image corpora: views stored per asset (0: a token corpus), their side and format
    # (mdt_ray.conditioning.FORMATS). Their cond_shape is (0, 0): the encoder makes the tokens.
    views: int = 0
    image_size: int = 0
    image_format: str = ""
    uri: str = ""  # where it was read from; not stored

    # -- derived -------------------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def cond_size(self) -> int:
        return math.prod(self.cond_shape)

    @property
    def holds_images(self) -> bool:
        return self.views > 0

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(VIEWS_COLUMN if c == "cond" and self.holds_images else c for c in COLUMNS)

    def stage_columns(self, stage: str) -> tuple[str, ...]:
        """The stored columns a stage reads: its latents and `cond` (tokens) or `views` (images)."""
        cols = STAGE_COLUMNS[stage]
        return tuple(VIEWS_COLUMN if c == "cond" and self.holds_images else c for c in cols)

    def shard_uris(self) -> list[str]:
        from mdt_ray.data.storage import join

        return [join(self.uri, s.path) for s in self.shards]

    def header(self) -> dict[str, Any]:
        """The part every shard carries (everything known before the first row)."""
        header = {
            "format_version": self.format_version,
            "latent_shape": list(self.latent_shape),
            "cond_shape": list(self.cond_shape),
            "slat_channels": self.slat_channels,
            "slat_resolution": self.slat_resolution,
            "stages": list(self.stages),
            "source": self.source,
        }
        if self.holds_images:  # token corpora keep the header they always had
            header.update(views=self.views, image_size=self.image_size, image_format=self.image_format)
        return header

    def schema(self, *, with_manifest: bool = False) -> pa.Schema:
        meta = self.to_json_dict() if with_manifest else self.header()
        return corpus_schema(self.cond_shape, latent_shape=self.latent_shape, header=meta, views=self.views)

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("uri")
        d["latent_shape"] = list(self.latent_shape)
        d["cond_shape"] = list(self.cond_shape)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], *, where: str) -> "Manifest":
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("format_version", "latent_shape", "cond_shape") if k not in d]
        if missing:
            raise CorpusError(f"{where}: manifest lacks {missing}")
        version = d["format_version"]
        if version != FORMAT_VERSION:
            raise CorpusError(
                f"{where}: corpus format version {version}, this mdt-ray reads version "
                f"{FORMAT_VERSION}; rebuild or re-import the corpus"
            )
        unknown = sorted(set(d) - known)
        if unknown:
            raise CorpusError(f"{where}: manifest has unknown keys {unknown}")
        d = dict(d)
        d["latent_shape"] = tuple(int(x) for x in d["latent_shape"])
        d["cond_shape"] = tuple(int(x) for x in d["cond_shape"])
        d["stages"] = tuple(d.get("stages", ("ss", "slat")))
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)

    # -- statistics ------------------------------------------------------------------------------
    def finalize(self, shards: list[ShardInfo]) -> "Manifest":
        """Fill the row count and the normalisation statistics from the shards' sums."""
        self.shards = list(shards)
        self.num_rows = sum(s.num_rows for s in shards)
        c = self.latent_shape[0]
        if self.num_rows:
            s = np.sum([sh.ss_sum for sh in shards if sh.num_rows], axis=0)
            q = np.sum([sh.ss_sumsq for sh in shards if sh.num_rows], axis=0)
            self.ss_mean, self.ss_std = _mean_std(s, q, self.num_rows)
        else:
            self.ss_mean, self.ss_std = [0.0] * c, [1.0] * c
        if self.slat_stats_from == "corpus":
            n = sum(sh.slat_assets for sh in shards)
            if n:
                s = np.sum([sh.slat_sum for sh in shards if sh.slat_assets], axis=0)
                q = np.sum([sh.slat_sumsq for sh in shards if sh.slat_assets], axis=0)
                self.slat_mean, self.slat_std = _mean_std(s, q, n)
            else:
                self.slat_mean = [0.0] * self.slat_channels
                self.slat_std = [1.0] * self.slat_channels
        return self


def _mean_std(s: np.ndarray, q: np.ndarray, n: int) -> tuple[list[float], list[float]]:
    mean = np.asarray(s, dtype=np.float64) / n
    var = np.maximum(np.asarray(q, dtype=np.float64) / n - mean**2, 0.0)
    # A constant channel would make (x - mean) / std divide by zero downstream.
    std = np.where(var > 0, np.sqrt(var), 1.0)
    return [float(x) for x in mean], [float(x) for x in std]


def header_of(schema: pa.Schema, *, where: str) -> dict[str, Any]:
    meta = schema.metadata or {}
    if MANIFEST_KEY not in meta:
        raise CorpusError(
            f"{where}: no {MANIFEST_KEY.decode()} entry in the Parquet schema metadata; "
            "not an mdt-ray corpus shard (write it with `mdt-ray corpus build|import-trellis`)"
        )
    try:
        return json.loads(meta[MANIFEST_KEY])
    except ValueError as e:
        raise CorpusError(f"{where}: the manifest JSON is unreadable: {e}") from None


def expected_types(manifest: Manifest) -> dict[str, pa.DataType]:
    return {
        "asset_id": pa.string(),
        "ss_latent": pa.list_(pa.float16(), manifest.latent_size),
        "slat_coords": pa.list_(pa.int16()),
        "slat_feats": pa.list_(pa.float16()),
        "cond": pa.list_(pa.float16(), manifest.cond_size),
        VIEWS_COLUMN: pa.list_(pa.binary(), max(manifest.views, 1)),
    }


def schema_problems(schema: pa.Schema, manifest: Manifest, columns: Optional[Sequence[str]] = None) -> list[str]:
    """What is wrong with a shard's column types for `columns` (default: all the manifest's), as
    sentences (empty: fine)."""
    want = expected_types(manifest)
    if columns is None:
        columns = manifest.columns
    problems = []
    for name in columns:
        idx = schema.get_field_index(name)
        if idx < 0:
            problems.append(f"column {name!r} is missing")
        elif schema.field(idx).type != want[name]:
            problems.append(f"column {name!r} has type {schema.field(idx).type}, expected {want[name]}")
    return problems


def check_header(header: dict[str, Any], manifest: Manifest, *, where: str) -> None:
    """Refuse a shard whose header disagrees with the corpus manifest."""
    mine = manifest.header()
    theirs = {k: header.get(k) for k in mine}
    if theirs.get("format_version") != FORMAT_VERSION:
        raise CorpusError(
            f"{where}: shard format version {theirs.get('format_version')}, expected {FORMAT_VERSION}"
        )
    diffs = [f"{k}: shard has {theirs[k]!r}, manifest has {mine[k]!r}" for k in mine if theirs[k] != mine[k]]
    if diffs:
        raise CorpusError(f"{where}: shard does not belong to this corpus ({'; '.join(diffs)})")


def read_shard_footer(fs: Any, path: str, where: str, manifest: Manifest, *,
                      size: Optional[int] = None) -> tuple[Any, pa.Schema]:
    """(Parquet metadata, Arrow schema) of a shard the manifest lists, its header checked against
    the manifest. `where` names the shard in errors: a missing file, a file that is not Parquet
    or is cut short, a foreign header all raise CorpusError; transient storage errors are retried.
    `size`: the file's current size in bytes, when a listing gave it (not the manifest's, which a
    rewrite makes stale)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from mdt_ray.data import storage

    def footer():
        if size is not None:
            # With the size known the footer is one ranged read: on S3 no HEAD request first,
            # which halves the requests of a check over thousands of shards.
            return pads.ParquetFileFormat().make_fragment(path, filesystem=fs, file_size=size).metadata
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata

    try:
        meta = storage.retry(footer, what=f"reading the footer of shard {where}")
    except FileNotFoundError:
        raise CorpusError(f"shard {where} is listed in the manifest but missing") from None
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, storage.StorageError):
            raise
        raise CorpusError(f"shard {where} is corrupt or not a Parquet file ({e})") from None
    schema = meta.schema.to_arrow_schema()
    check_header(header_of(schema, where=f"shard {where}"), manifest, where=f"shard {where}")
    return meta, schema


# -- reading -------------------------------------------------------------------------------------
def read_schema(target: str | StorageTarget) -> pa.Schema:
    """The Arrow schema (with metadata) of one Parquet file, read from its footer only.

    A file that is not Parquet, or is cut short, raises CorpusError naming it.
    """
    import pyarrow.parquet as pq

    from mdt_ray.data import storage

    target = storage.as_target(target)
    fs, path = target.pyarrow_fs()
    where = target.describe()

    def _read() -> pa.Schema:
        with fs.open_input_file(path) as f:
            return pq.read_schema(f)

    try:
        return storage.retry(_read, what=f"reading the Parquet footer of {where}")
    except FileNotFoundError:
        raise CorpusError(f"{where}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        if isinstance(e, storage.StorageError):
            raise
        raise CorpusError(f"{where}: corrupt or not a Parquet file ({e})") from None


def read_manifest(target: str | StorageTarget) -> Manifest:
    """The corpus manifest of a corpus folder (or of a single shard file, as a one-shard corpus)."""
    import pyarrow.fs as pafs

    from mdt_ray.data import storage

    target = storage.as_target(target)
    uri = target.uri
    target.check_bucket()
    fs, path = target.pyarrow_fs()
    where = target.describe()
    info = storage.retry(lambda: fs.get_file_info(path), what=f"looking up {where}")
    if info.type == pafs.FileType.File:
        # One shard given on its own: its header is the whole manifest, statistics unknown.
        header = header_of(read_schema(target), where=where)
        manifest = Manifest.from_json_dict(header, where=where)
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if target.is_s3:
            folder, name = uri.rsplit("/", 1)
        else:
            folder, name = os.path.split(os.path.abspath(uri))
        manifest.shards = [ShardInfo(path=name, num_rows=rows, num_bytes=info.size)]
        manifest.num_rows = rows
        manifest.uri = folder
        return manifest
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"no corpus at {where}: the path does not exist")
    manifest_uri = storage.join(uri, MANIFEST_FILE)
    minfo = storage.retry(lambda: fs.get_file_info(f"{path}/{MANIFEST_FILE}"), what=f"looking up {manifest_uri}")
    if minfo.type != pafs.FileType.File:
        listing = storage.retry(
            lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)),
            what=f"listing {where}",
        )
        parts = [i for i in listing if i.path.endswith(".parquet")]
        if parts:
            raise CorpusError(
                f"{where} holds {len(parts)} shard(s) but no {MANIFEST_FILE}: the build or import "
                "did not finish; run it again (with --overwrite)"
            )
        raise CorpusError(f"no corpus at {where}: no {MANIFEST_FILE} and no shards")
    schema = read_schema(target.with_uri(manifest_uri))
    manifest = Manifest.from_json_dict(header_of(schema, where=manifest_uri), where=manifest_uri)
    problems = schema_problems(schema, manifest)
    if problems:
        raise CorpusError(f"{manifest_uri}: {'; '.join(problems)}")
    manifest.uri = uri
    return manifest
