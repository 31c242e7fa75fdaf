"""Writing and reading corpora without Ray: manifest, statistics, shard layout, damaged and foreign
shards, overwrite protection, TRELLIS-size shapes, and the `mdt-ray corpus` commands."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdt_ray.cli import corpus as corpus_cli
from mdt_ray.data import synthetic
from mdt_ray.data.corpus import build_synthetic, inspect_corpus
from mdt_ray.data.pipeline import load_local
from mdt_ray.data.schema import MANIFEST_FILE, MANIFEST_KEY, CorpusError, Manifest, read_manifest
from mdt_ray.data.storage import StorageTarget

REPO = Path(__file__).resolve().parents[1]


# -- helpers shared with the pipeline tests ------------------------------------------------------
def shard_rows(manifest: Manifest, shard_uri: str) -> pa.Table:
    fs, path = StorageTarget(shard_uri).pyarrow_fs()
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def write_raw(shard_uri: str, table: pa.Table) -> None:
    fs, path = StorageTarget(shard_uri).pyarrow_fs()
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def replace_with_wrong_shape_row(manifest: Manifest, shard_uri: str, row: int) -> str:
    """Rewrite a shard as another tool might: ss_latent as a plain list, one row cut short.

    Returns the asset id of the damaged row."""
    table = shard_rows(manifest, shard_uri)
    lat = table.column("ss_latent").combine_chunks()
    values = [np.asarray(v, dtype=np.float16) for v in lat.to_numpy(zero_copy_only=False)]
    values[row] = values[row][:-512]
    bad = pa.array(values, type=pa.list_(pa.float16()))
    idx = table.schema.get_field_index("ss_latent")
    schema = table.schema.set(idx, pa.field("ss_latent", pa.list_(pa.float16()), nullable=False))
    write_raw(shard_uri, pa.Table.from_arrays([*table.columns[:idx], bad, *table.columns[idx + 1:]], schema=schema))
    return table.column("asset_id")[row].as_py()


def damage_column_pages(shard_uri: str, column: str) -> None:
    """Flip bytes in the middle of one column chunk; the footer stays intact."""
    fs, path = StorageTarget(shard_uri).pyarrow_fs()
    with fs.open_input_file(path) as f:
        data = bytearray(f.read())
    meta = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata
    for c in range(meta.num_columns):
        chunk = meta.row_group(0).column(c)
        if chunk.path_in_schema.split(".")[0] == column:
            start = chunk.data_page_offset + chunk.total_compressed_size // 2
            for i in range(start, start + 48):
                data[i] ^= 0x5A
            break
    with fs.open_output_stream(path) as f:
        f.write(bytes(data))


def truncate(shard_uri: str) -> None:
    fs, path = StorageTarget(shard_uri).pyarrow_fs()
    with fs.open_input_file(path) as f:
        data = f.read()
    with fs.open_output_stream(path) as f:
        f.write(data[: len(data) // 2])


# -- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "c")
    build_synthetic(out, 30, seed=5, num_shards=3, workers=1, progress=False)
    return out


def test_manifest_and_statistics(corpus):
    m = read_manifest(corpus)
    assert m.latent_shape == (8, 16, 16, 16) and m.cond_shape == (64, 64)
    assert m.slat_channels == 8 and m.slat_resolution == 32 and m.stages == ("ss", "slat")
    assert m.num_rows == 30 and [s.num_rows for s in m.shards] == [10, 10, 10]
    assert [s.path for s in m.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert m.source["kind"] == "synthetic" and m.source["seed"] == 5
    assert all(s.num_bytes > 0 for s in m.shards)
    # the manifest is JSON in the Parquet schema metadata of _common_metadata
    fs, path = StorageTarget(corpus).pyarrow_fs()
    raw = json.loads(pq.read_schema(f"{path}/{MANIFEST_FILE}").metadata[MANIFEST_KEY])
    assert raw["num_rows"] == 30 and raw["cond_shape"] == [64, 64]
    # statistics: ss per channel over all elements; slat as TRELLIS computes it (mean of per-asset means)
    ss = load_local(corpus)
    x = ss["x0"].transpose(1, 0, 2, 3, 4).reshape(8, -1)
    np.testing.assert_allclose(m.ss_mean, x.mean(1), atol=1e-6)
    np.testing.assert_allclose(m.ss_std, x.std(1), atol=1e-6)
    raw_slat = load_local(corpus, stage="slat", normalize_slat=False)
    per_asset_mean = np.stack([f.mean(0) for f in raw_slat["slat_feats"]])
    per_asset_sq = np.stack([(f.astype(np.float64) ** 2).mean(0) for f in raw_slat["slat_feats"]])
    mean = per_asset_mean.mean(0)
    np.testing.assert_allclose(m.slat_mean, mean, atol=1e-5)
    np.testing.assert_allclose(m.slat_std, np.sqrt(per_asset_sq.mean(0) - mean**2), atol=1e-5)
    # one shard on its own reads as a one-shard corpus (no statistics)
    single = read_manifest(f"{corpus}/part-00001.parquet")
    assert single.num_rows == 10 and single.uri == corpus and [s.path for s in single.shards] == ["part-00001.parquet"]
    assert load_local(f"{corpus}/part-00001.parquet")["asset_id"] == ss["asset_id"][10:20]
    normed = load_local(corpus, stage="slat")
    np.testing.assert_allclose(normed["slat_feats"][0], (raw_slat["slat_feats"][0] - m.slat_mean) / m.slat_std, atol=1e-5)


def test_rows_equal_the_generator_and_the_shard_count_does_not_matter(corpus, tmp_path):
    one = str(tmp_path / "one")
    build_synthetic(one, 30, seed=5, num_shards=1, workers=1, progress=False)
    # two local processes writing four shards
    four = str(tmp_path / "four")
    build_synthetic(four, 30, seed=5, num_shards=4, workers=2, progress=False)
    assert [s.num_rows for s in read_manifest(four).shards] == [8, 8, 7, 7]
    ref = load_local(corpus)
    assert ref["asset_id"] == [synthetic.asset_id(5, i) for i in range(30)]
    for other in (one, four):
        got = load_local(other)
        assert got["asset_id"] == ref["asset_id"]
        assert np.array_equal(got["x0"], ref["x0"]) and np.array_equal(got["cond"], ref["cond"])
    asset = synthetic.make_asset(5, 17)
    assert np.array_equal(ref["x0"][17], asset.ss_latent)
    np.testing.assert_array_equal(ref["cond"][17], asset.cond.astype(np.float16).astype(np.float32))
    assert np.array_equal(synthetic.decode_ss(ref["x0"][17]), asset.occupancy)
    slat = load_local(four, stage="slat", normalize_slat=False)
    assert np.array_equal(slat["slat_coords"][17], asset.slat_coords.astype(np.int32))
    np.testing.assert_array_equal(slat["slat_feats"][17], asset.slat_feats.astype(np.float16).astype(np.float32))
    assert len(load_local(corpus, limit=12)["asset_id"]) == 12


def test_inspect_reports_sizes_per_column(corpus, capsys):
    info = inspect_corpus(corpus)
    assert info["num_rows"] == 30 and info["num_shards"] == 3
    assert set(info["columns"]) == {"asset_id", "ss_latent", "slat_coords", "slat_feats", "cond"}
    # decoded float16 sizes are exact for the fixed-size columns (plus Parquet's level bytes)
    assert info["columns"]["ss_latent"]["uncompressed_per_asset"] >= 8 * 16**3 * 2 * 0.01
    assert info["bytes_per_asset"] == pytest.approx(info["total_bytes"] / 30)
    parser = argparse.ArgumentParser()
    corpus_cli.register(parser.add_subparsers())
    args = parser.parse_args(["corpus", "inspect", corpus])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "rows          30 in 3 shard(s)" in text and "ss_latent" in text and "part-00002.parquet" in text


def test_refuses_to_overwrite_and_detects_unfinished_builds(corpus, tmp_path):
    with pytest.raises(CorpusError, match="already holds a corpus .*--overwrite"):
        build_synthetic(corpus, 4, seed=5, progress=False)
    out = str(tmp_path / "c")
    build_synthetic(out, 6, seed=1, num_shards=2, workers=1, progress=False)
    build_synthetic(out, 4, seed=2, num_shards=1, workers=1, progress=False, overwrite=True)
    m = read_manifest(out)
    assert m.num_rows == 4 and len(m.shards) == 1 and m.source["seed"] == 2
    assert sorted(p.name for p in Path(out).iterdir()) == [MANIFEST_FILE, "part-00000.parquet"]
    (Path(out) / MANIFEST_FILE).unlink()
    with pytest.raises(CorpusError, match="1 shard.* but no _common_metadata: the build or import did not finish"):
        read_manifest(out)


def _copy_corpus(src: str, dst: Path) -> str:
    dst.mkdir()
    for p in Path(src).iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return str(dst)


def test_bad_shards_are_named(corpus, tmp_path):
    m = read_manifest(corpus)
    # a row whose ss_latent is 512 values short
    c1 = _copy_corpus(corpus, tmp_path / "wrong_shape")
    bad_id = replace_with_wrong_shape_row(m, f"{c1}/part-00001.parquet", row=3)
    with pytest.raises(CorpusError, match=rf"shard {c1}/part-00001.parquet, asset '{bad_id}': column 'ss_latent' "
                                          r"holds 32256 values, the manifest says 8×16×16×16 = 32768"):
        load_local(c1)
    # a shard cut in half
    c2 = _copy_corpus(corpus, tmp_path / "truncated")
    truncate(f"{c2}/part-00002.parquet")
    with pytest.raises(CorpusError, match=rf"shard {c2}/part-00002.parquet is corrupt or not a Parquet file"):
        load_local(c2)
    with pytest.raises(CorpusError, match=rf"shard {c2}/part-00002.parquet is corrupt or not a Parquet file"):
        inspect_corpus(c2)
    # damaged pages behind an intact footer
    c3 = _copy_corpus(corpus, tmp_path / "damaged")
    damage_column_pages(f"{c3}/part-00000.parquet", "cond")
    with pytest.raises(CorpusError, match=rf"shard {c3}/part-00000.parquet could not be read"):
        load_local(c3)
    # a shard of another corpus put in place of one of ours
    other = str(tmp_path / "other")
    build_synthetic(other, 10, seed=6, num_shards=1, workers=1, progress=False)
    c4 = _copy_corpus(corpus, tmp_path / "foreign")
    (Path(c4) / "part-00001.parquet").write_bytes((Path(other) / "part-00000.parquet").read_bytes())
    with pytest.raises(CorpusError, match=r"part-00001.parquet: shard does not belong to this corpus \(source"):
        load_local(c4)
    # a shard listed in the manifest but gone
    c5 = _copy_corpus(corpus, tmp_path / "missing")
    (Path(c5) / "part-00001.parquet").unlink()
    with pytest.raises(CorpusError, match="part-00001.parquet is listed in the manifest but missing"):
        load_local(c5)


def test_writer_checks_rows_against_the_manifest():
    from mdt_ray.data.corpus import synthetic_plan, to_record_batch

    m = synthetic_plan(4).manifest
    a = synthetic.make_asset(0, 0)
    good = {"asset_id": [a.asset_id], "ss_latent": a.ss_latent[None], "slat_coords": [a.slat_coords],
            "slat_feats": [a.slat_feats], "cond": a.cond[None]}
    assert to_record_batch(good, m, where="t").num_rows == 1
    with pytest.raises(CorpusError, match=r"t: column 'cond' has shape \(64, 32\) per row .*manifest says \(64, 64\)"):
        to_record_batch({**good, "cond": a.cond[None, :, :32]}, m, where="t")
    with pytest.raises(CorpusError, match=rf"asset '{a.asset_id}' slat_feats has shape"):
        to_record_batch({**good, "slat_feats": [a.slat_feats[:-1]]}, m, where="t")
    with pytest.raises(CorpusError, match=rf"asset '{a.asset_id}' has slat coordinates outside \[0, 32\)"):
        to_record_batch({**good, "slat_coords": [a.slat_coords + 40]}, m, where="t")
    nan = a.ss_latent.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(CorpusError, match=rf"asset '{a.asset_id}' has non-finite values in 'ss_latent'"):
        to_record_batch({**good, "ss_latent": nan[None]}, m, where="t")


def test_cli_build_and_inspect_on_s3(s3_server, s3_bucket, tmp_path, capsys):
    uri = f"s3://{s3_bucket}/cli-corpus"
    parser = argparse.ArgumentParser()
    corpus_cli.register(parser.add_subparsers())
    args = parser.parse_args(["corpus", "build", "--num-assets", "12", "--out", uri, "--shards", "2",
                              "--workers", "1", "--no-ray", "--quiet"])
    assert args.func(args) == 0
    m = read_manifest(uri)
    assert m.num_rows == 12 and m.uri == uri
    # the installed console script, as a user runs it
    exe = Path(sys.executable).parent / "mdt-ray"
    done = subprocess.run([str(exe), "corpus", "inspect", uri, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["num_rows"] == 12 and info["num_shards"] == 2 and info["uri"] == uri
    # a missing bucket is one clear line and exit status 2 (in-process: the command's start-up
    # imports every sub-command's dependencies, seconds each time on a busy machine)
    args = parser.parse_args(["corpus", "inspect", "s3://no-such-bucket-xyz/c"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket-xyz' does not exist" in err and "Traceback" not in err
