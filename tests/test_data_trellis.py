"""TRELLIS import on a small dataset root written here with numpy and PIL in TRELLIS's own file
formats (metadata.csv, ss_latents/<model>/<sha256>.npz `mean`, latents/<model>/<sha256>.npz
`feats`, `coords`, renders_cond/<sha256>/transforms.json + NNN.png RGBA frames), with TRELLIS's
filters."""

import argparse
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from mdt_ray.cli import corpus as corpus_cli
from mdt_ray.conditioning import view_pixels
from mdt_ray.data.pipeline import load_local
from mdt_ray.data.schema import CorpusError, read_manifest
from mdt_ray.data.trellis_import import TrellisImportError, import_trellis

SS = "ss_enc_conv3d_16l8_fp16"
SLAT = "dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16"
T, C = 10, 16


def sha(i: int) -> str:
    return hashlib.sha256(f"asset-{i}".encode()).hexdigest()


def write_frames(render_dir: Path, n: int, rng) -> list[Path]:
    """What render_cond.py leaves for one asset: transforms.json and n RGBA PNG frames (small
    here, 1024² there), each a soft-edged disc somewhere on a transparent background."""
    render_dir.mkdir(parents=True, exist_ok=True)
    frames, paths = [], []
    for i in range(n):
        side = 64
        yy, xx = np.mgrid[0:side, 0:side]
        cy, cx, r = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(3, 20)
        alpha = np.clip(r - np.hypot(yy - cy, xx - cx) + 0.5, 0, 1)
        rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        rgba = np.concatenate([rgb, np.rint(alpha * 255).astype(np.uint8)[..., None]], axis=2)
        name = f"{i:03d}.png"
        Image.fromarray(rgba, "RGBA").save(render_dir / name)
        paths.append(render_dir / name)
        fov = float(rng.uniform(0.2, 1.2))
        frames.append({"file_path": name, "camera_angle_x": fov,
                       "transform_matrix": np.eye(4).tolist()})
    with open(render_dir / "transforms.json", "w") as f:
        json.dump({"aabb": [[-0.5] * 3, [0.5] * 3], "scale": 1.0, "offset": [0.0, 0.0, 0.0], "frames": frames}, f,
                  indent=4)
    return paths


def write_root(root: Path, *, stats: bool = False, views: int = 0, frames: int = 6) -> dict:
    """Eight assets; three of them fail one of TRELLIS's filters each. Returns what was written."""
    rng = np.random.default_rng(0)
    for d in (root / "ss_latents" / SS, root / "latents" / SLAT, root / "cond_tokens"):
        d.mkdir(parents=True, exist_ok=True)
    rows, data = [], {}
    for i in range(8):
        h = sha(i)
        n = int(rng.integers(20, 200))
        flat = rng.choice(64**3, size=n, replace=False)
        coords = np.stack(np.unravel_index(flat, (64, 64, 64)), axis=1).astype(np.uint8)
        feats = rng.normal(0.0, 2.0, (n, 8)).astype(np.float32)
        mean = rng.normal(0.0, 1.0, (8, 16, 16, 16)).astype(np.float32)
        cond = rng.normal(0.0, 1.0, (views, T, C) if views else (T, C)).astype(np.float32)
        np.savez_compressed(root / "ss_latents" / SS / f"{h}.npz", mean=mean)
        np.savez_compressed(root / "latents" / SLAT / f"{h}.npz", feats=feats, coords=coords)
        if i % 2:
            np.save(root / "cond_tokens" / f"{h}.npy", cond)
        else:
            np.savez(root / "cond_tokens" / f"{h}.npz", tokens=cond)
        frame_paths = write_frames(root / "renders_cond" / h, frames, rng)
        row = {
            "sha256": h, "file_identifier": f"https://example.invalid/{i}.glb", "aesthetic_score": 5.0 + i / 10,
            "captions": json.dumps([f"shape {i}"]), "local_path": f"raw/{h}.glb", "rendered": True,
            "voxelized": True, "num_voxels": n, "cond_rendered": True, "feature_dinov2_vitl14_reg": True,
            f"latent_{SLAT}": True, f"ss_latent_{SS}": True,
        }
        if i == 1:
            row["aesthetic_score"] = 3.9  # below MDT-dist's 4.5
        if i == 4:
            row["num_voxels"] = 40000  # above TRELLIS's 32768
        if i == 6:
            row[f"latent_{SLAT}"] = False  # SLAT not encoded
        rows.append(row)
        data[h] = {"mean": mean, "coords": coords, "feats": feats, "cond": cond, "frames": frame_paths}
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if stats:
        with open(root / "latents" / SLAT / "stats.json", "w") as f:
            json.dump({"mean": [0.5] * 8, "std": [2.0] * 8}, f)
    return data


KEPT = [0, 2, 3, 5, 7]


def test_import_keeps_values_and_applies_trellis_filters(tmp_path):
    data = write_root(tmp_path / "root")
    out = str(tmp_path / "corpus")
    manifest, report = import_trellis(str(tmp_path / "root"), out, cond="tokens", rows_per_shard=2, workers=1,
                                      progress=False)
    assert report["kept"] == 5 and report["candidates"] == 8
    assert report["filtered"] == {"aesthetic_score < 4.5": 1, "num_voxels > 32768": 1, "slat latent not encoded": 1}
    m = read_manifest(out)
    assert m.num_rows == 5 and len(m.shards) == 3 and m.cond_shape == (T, C)
    assert m.slat_resolution == 64 and m.stages == ("ss", "slat")
    assert m.source["kind"] == "trellis" and m.source["filtered"] == report["filtered"]
    assert m.slat_stats_from == "corpus"
    ss = load_local(out)
    slat = load_local(out, stage="slat", normalize_slat=False)
    assert ss["asset_id"] == [sha(i) for i in KEPT] == slat["asset_id"]
    for k, i in enumerate(KEPT):
        d = data[sha(i)]
        np.testing.assert_array_equal(ss["x0"][k], d["mean"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(ss["cond"][k], d["cond"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(slat["slat_coords"][k], d["coords"].astype(np.int32))
        np.testing.assert_array_equal(slat["slat_feats"][k], d["feats"].astype(np.float16).astype(np.float32))
    # stats over the imported assets, TRELLIS's recipe (stat_latent.py): mean of per-asset means
    f16 = [data[sha(i)]["feats"].astype(np.float16).astype(np.float64) for i in KEPT]
    mean = np.mean([f.mean(0) for f in f16], axis=0)
    std = np.sqrt(np.mean([(f**2).mean(0) for f in f16], axis=0) - mean**2)
    np.testing.assert_allclose(m.slat_mean, mean, atol=1e-6)
    np.testing.assert_allclose(m.slat_std, std, atol=1e-6)


def test_stats_json_views_and_stage_subsets(tmp_path):
    data = write_root(tmp_path / "root", stats=True, views=3)
    out = str(tmp_path / "all_views")
    import_trellis(str(tmp_path / "root"), out, cond="tokens", token_views="all", workers=1, progress=False)
    m = read_manifest(out)
    assert m.slat_mean == [0.5] * 8 and m.slat_std == [2.0] * 8 and m.slat_stats_from.endswith("stats.json")
    rows = load_local(out)
    assert rows["asset_id"][:3] == [f"{sha(0)}:0", f"{sha(0)}:1", f"{sha(0)}:2"] and m.num_rows == 15
    np.testing.assert_array_equal(rows["cond"][2], data[sha(0)]["cond"][2].astype(np.float16).astype(np.float32))
    assert np.array_equal(rows["x0"][0], rows["x0"][2])  # the same latent beside each view
    normed = load_local(out, stage="slat", limit=1)["slat_feats"][0]
    raw = data[sha(0)]["feats"].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(normed, (raw - 0.5) / 2.0, atol=1e-6)
    # stage 1 only: no SLAT filter (asset 4 and 6 come back), no stage-2 data to read
    ss_only = str(tmp_path / "ss_only")
    _, report = import_trellis(str(tmp_path / "root"), ss_only, cond="tokens", stages=("ss",), workers=1,
                                 progress=False)
    assert report["kept"] == 7 and report["filtered"] == {"aesthetic_score < 4.5": 1}
    assert read_manifest(ss_only).stages == ("ss",)
    with pytest.raises(CorpusError, match="holds no stage-'slat' data"):
        load_local(ss_only, stage="slat")


def test_bad_inputs_name_the_asset_and_file(tmp_path):
    root = tmp_path / "root"
    write_root(root, frames=0)
    missing = root / "latents" / SLAT / f"{sha(3)}.npz"
    missing.unlink()
    with pytest.raises(TrellisImportError, match=rf"asset {sha(3)} passes the filters but its file\(s\) are missing or unusable: .*{sha(3)}.npz"):
        import_trellis(str(root), str(tmp_path / "a"), cond="tokens", workers=1, progress=False)
    _, report = import_trellis(str(root), str(tmp_path / "b"), cond="tokens", skip_missing=True, workers=1, progress=False)
    assert report["missing"] == [sha(3)] and report["filtered"]["files missing"] == 1 and report["kept"] == 4

    bad_mean = root / "ss_latents" / SS / f"{sha(5)}.npz"
    np.savez_compressed(bad_mean, mean=np.zeros((8, 16, 16, 15), np.float32))
    with pytest.raises(TrellisImportError, match=rf"asset {sha(5)}: .*{sha(5)}.npz `mean` has shape \(8, 16, 16, 15\)"):
        import_trellis(str(root), str(tmp_path / "c"), cond="tokens", skip_missing=True, workers=1, progress=False)
    np.savez_compressed(bad_mean, mean=np.zeros((8, 16, 16, 16), np.float32))

    np.save(root / "cond_tokens" / f"{sha(7)}.npy", np.zeros((T + 1, C), np.float32))
    with pytest.raises(TrellisImportError, match=rf"asset {sha(7)}: cond tokens .* are \(11, 16\) per view; the first asset's were \(10, 16\)"):
        import_trellis(str(root), str(tmp_path / "d"), cond="tokens", skip_missing=True, workers=1, progress=False)

    with pytest.raises(TrellisImportError, match="no metadata.csv"):
        import_trellis(str(tmp_path), str(tmp_path / "e"), cond="tokens", progress=False)


def test_import_views_from_renders_cond(tmp_path):
    data = write_root(tmp_path / "root", frames=6)
    out = str(tmp_path / "views")
    manifest, report = import_trellis(str(tmp_path / "root"), out, views=3, image_format="png", rows_per_shard=2,
                                      workers=1, progress=False)
    m = read_manifest(out)
    assert report["kept"] == 5 and m.num_rows == 5 and len(m.shards) == 3
    assert (m.views, m.image_size, m.image_format, m.cond_shape) == (3, 518, "png", (0, 0))
    assert m.source["cond"] == "views" and m.source["views"] == 3
    ss, slat = load_local(out), load_local(out, stage="slat", normalize_slat=False)
    assert ss["asset_id"] == [sha(i) for i in KEPT] == slat["asset_id"] and "cond" not in ss
    assert ss["views"].shape == (5, 3, 518, 518, 3) and ss["views"].dtype == np.uint8
    for k, i in enumerate(KEPT):
        d = data[sha(i)]
        np.testing.assert_array_equal(ss["x0"][k], d["mean"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(slat["slat_coords"][k], d["coords"].astype(np.int32))
        for v, frame in enumerate((0, 2, 4)):  # 3 of 6 frames, evenly spaced
            with Image.open(d["frames"][frame]) as im:
                np.testing.assert_array_equal(ss["views"][k, v], view_pixels(im))
        np.testing.assert_array_equal(slat["views"][k], ss["views"][k])
    # lossy storage, on request: its bytes decode to the same size
    lossy = str(tmp_path / "webp")
    import_trellis(str(tmp_path / "root"), lossy, views=1, image_format="webp", image_quality=90, stages=("ss",),
                   limit=2, workers=1, progress=False)
    m2 = read_manifest(lossy)
    assert m2.image_format == "webp" and m2.views == 1 and m2.num_rows == 2 and m2.source["image_quality"] == 90
    assert load_local(lossy)["views"].shape == (2, 1, 518, 518, 3)


def test_bad_views_name_the_asset_and_file(tmp_path):
    root = tmp_path / "root"
    write_root(root, frames=2)
    folder = {i: root / "renders_cond" / sha(i) for i in KEPT}

    def no_alpha(p):
        Image.new("RGB", (64, 64), (50, 60, 70)).save(p)

    breaks = [(0, "transforms.json", lambda p: p.unlink(), "transforms.json is missing"),
              (2, "transforms.json", lambda p: p.write_text("{not json"), "transforms.json is malformed"),
              (3, "001.png", no_alpha, "001.png has mode RGB, no alpha channel"),
              (5, "000.png", lambda p: p.write_bytes(b"\x89PNG garbage"), "000.png is unreadable")]
    for i, name, damage, why in breaks:
        path = folder[i] / name
        original = path.read_bytes()
        damage(path)
        with pytest.raises(TrellisImportError, match=rf"asset {sha(i)} passes the filters .*{why}"):
            import_trellis(str(root), str(tmp_path / "a"), views=2, workers=1, progress=False)
        path.write_bytes(original)
    with pytest.raises(TrellisImportError, match=rf"asset {sha(0)} .*lists 2 frames, fewer than --views 3"):
        import_trellis(str(root), str(tmp_path / "c"), views=3, workers=1, progress=False)
    for i, name, damage, _ in breaks:
        damage(folder[i] / name)
    _, report = import_trellis(str(root), str(tmp_path / "b"), views=2, skip_missing=True, workers=1, progress=False)
    assert report["missing"] == [sha(i) for i in (0, 2, 3, 5)] and report["filtered"]["files missing"] == 4
    assert report["kept"] == 1 and read_manifest(str(tmp_path / "b")).num_rows == 1
    # An empty alpha mask shows only in the pixels: found while the shard is written, and named.
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(folder[7] / "001.png")
    with pytest.raises(TrellisImportError, match=rf"asset {sha(7)}: frame .*{sha(7)}/001.png: the alpha channel is empty"):
        import_trellis(str(root), str(tmp_path / "d"), views=2, skip_missing=True, workers=1, progress=False)


def test_cli_import_to_s3(s3_server, s3_bucket, tmp_path):
    write_root(tmp_path / "root")
    parser = argparse.ArgumentParser()
    corpus_cli.register(parser.add_subparsers())
    uri = f"s3://{s3_bucket}/trellis"
    args = parser.parse_args(["corpus", "import-trellis", str(tmp_path / "root"), "--out", uri,
                              "--min-aesthetic", "none", "--views", "2", "--no-ray", "--workers", "1", "--quiet"])
    assert args.func(args) == 0
    m = read_manifest(uri)
    assert m.num_rows == 6 and m.source["min_aesthetic"] is None  # asset 1 is back, 4 and 6 still out
    assert m.views == 2 and m.image_format == "webp-lossless" and "image_quality" not in m.source
    rows = load_local(uri)
    assert rows["asset_id"] == [sha(i) for i in (0, 1, 2, 3, 5, 7)] and rows["views"].shape == (6, 2, 518, 518, 3)
