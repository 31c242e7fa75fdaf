"""The synthetic corpus generator: exact latent round trip, reproducibility, renders, cond tokens."""

import numpy as np
import pytest
import torch

from mdt_ray.data import synthetic as S


def test_encode_decode_is_exact_on_random_and_generated_grids():
    rng = np.random.default_rng(0)
    random_occ = rng.random((5, 32, 32, 32)) < 0.3
    shapes = np.stack([S.make_asset(3, i).occupancy for i in range(4)])
    for occ in (random_occ, shapes):
        latent = S.encode_ss(occ)
        assert latent.shape == (len(occ), 8, 16, 16, 16) and latent.dtype == np.float32
        assert set(np.unique(latent)) <= {-1.0, 1.0}
        assert np.array_equal(S.decode_ss(latent), occ)
        # torch in, torch out, any float dtype
        back = S.decode_ss(torch.from_numpy(latent).half())
        assert isinstance(back, torch.Tensor) and back.dtype == torch.bool
        assert np.array_equal(back.numpy(), occ)


def test_space_to_depth_layout():
    occ = np.zeros((32, 32, 32), bool)
    occ[2 * 3 + 1, 2 * 5 + 0, 2 * 7 + 1] = True  # cell (3, 5, 7), sub-voxel (a, b, c) = (1, 0, 1)
    latent = S.encode_ss(occ)
    assert latent[4 * 1 + 2 * 0 + 1, 3, 5, 7] == 1.0
    assert (latent == 1.0).sum() == 1
    assert S.encode_ss(occ[None])[0].tolist() == latent.tolist()


def test_decode_thresholds_generated_latents_at_zero():
    lat = np.full((8, 16, 16, 16), -0.3, np.float32)
    lat[0, 0, 0, 0] = 0.2
    lat[1, 0, 0, 0] = 0.0  # not occupied: strictly greater than zero
    occ = S.decode_ss(lat)
    assert occ.sum() == 1 and occ[0, 0, 0]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="32, 32, 32"):
        S.encode_ss(np.zeros((16, 16, 16), bool))
    with pytest.raises(ValueError, match="8, 16, 16, 16"):
        S.decode_ss(np.zeros((4, 16, 16, 16)))
    with pytest.raises(ValueError, match="64, 64"):
        S.encode_cond(np.zeros((32, 32)))


def test_assets_are_a_pure_function_of_seed_and_index():
    a = S.make_asset(7, 11)
    b = S.make_asset(7, 11)
    for name in ("occupancy", "ss_latent", "slat_coords", "slat_feats", "image", "cond"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # batch generation (shared cond encoding) gives the same assets as one at a time
    batch = S.make_assets(7, 9, 13)
    assert [x.asset_id for x in batch] == [S.asset_id(7, i) for i in range(9, 13)]
    np.testing.assert_allclose(batch[2].cond, a.cond, rtol=0, atol=1e-6)
    assert np.array_equal(batch[2].ss_latent, a.ss_latent)
    # another seed or index gives another shape
    assert not np.array_equal(S.make_asset(8, 11).occupancy, a.occupancy)
    assert not np.array_equal(S.make_asset(7, 12).occupancy, a.occupancy)


def test_shapes_cover_every_family_and_stay_inside_the_grid():
    assets = S.make_assets(0, 0, 120)
    families = {f for a in assets for f in a.families}
    assert families == set(S.FAMILIES)
    assert any(len(a.families) > 1 for a in assets) and any(len(a.families) == 1 for a in assets)
    for a in assets:
        occ = a.occupancy
        assert occ.sum() >= 24
        # nothing touches the grid's faces: the shape is whole, not clipped
        assert not (occ[0].any() or occ[-1].any() or occ[:, 0].any() or occ[:, -1].any()
                    or occ[:, :, 0].any() or occ[:, :, -1].any())


def test_stage2_form_is_the_surface_with_unit_normals():
    a = S.make_asset(1, 2)
    coords = a.slat_coords.astype(int)
    assert coords.dtype != object and coords.shape[1] == 3 and len(coords) > 0
    assert coords.min() >= 0 and coords.max() < S.SLAT_RESOLUTION
    assert a.occupancy[tuple(coords.T)].all()  # every surface voxel is occupied
    interior = a.occupancy.sum() - len(coords)
    assert interior >= 0
    feats = a.slat_feats
    assert feats.shape == (len(coords), 8) and np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats[:, :3], axis=1), 1.0, atol=1e-4)
    assert feats[:, 3:].min() >= -1.0 and feats[:, 3:].max() <= 1.0
    # normals point outward: stepping along the normal leaves the shape more often than not
    step = np.round(coords + 1.5 * feats[:, :3]).astype(int).clip(0, 31)
    assert (~a.occupancy[tuple(step.T)]).mean() > 0.8


def test_render_and_cond_tokens():
    assets = S.make_assets(2, 0, 6)
    occ = np.stack([a.occupancy for a in assets])
    imgs = S.render_view(occ)
    assert imgs.shape == (6, 64, 64) and imgs.dtype == np.float32
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0
    assert all((im > 0).mean() > 0.01 for im in imgs)  # every shape is seen
    assert np.array_equal(imgs[3], assets[3].image)
    assert not np.array_equal(imgs[0], imgs[1])
    other = S.render_view(occ[0], size=96, azimuth=200.0, elevation=-10.0)
    assert other.shape == (96, 96) and not np.allclose(other[:64, :64], imgs[0])
    empty = S.render_view(np.zeros((32, 32, 32), bool))
    assert not empty.any()

    tokens = S.encode_cond(imgs)
    assert tokens.shape == (6, S.COND_TOKENS, S.COND_DIM) == (6, 64, 64)
    np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-4)  # parameter-free layer norm
    np.testing.assert_allclose(tokens, S.encode_cond(imgs), rtol=0, atol=0)
    # different views give different tokens; equal images equal tokens, wherever they are in a batch
    assert not np.allclose(tokens[0], tokens[1])
    np.testing.assert_allclose(S.encode_cond(imgs[3]), tokens[3], atol=1e-6)
    # tokens carry position: a blank image still gives distinct tokens per patch
    blank = S.encode_cond(np.zeros((64, 64), np.float32))
    assert len({tuple(np.round(t, 4)) for t in blank}) == 64
