import math

import numpy as np
import pytest
import torch

from mdt_ray.metrics import (coverage, frechet_distance, frechet_distance_from_stats, iou,
                             latent_features, mmd, one_nna, pairwise_iou, shape_metrics)


def _with_exact_moments(rng, n, mean, cov):
    """n samples whose sample mean and (N-1) sample covariance equal mean and cov exactly."""
    d = len(mean)
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    # Whitening by the sample covariance's Cholesky factor makes the sample covariance I.
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T
    return z @ np.linalg.cholesky(np.asarray(cov, dtype=np.float64)).T + np.asarray(mean)


def _dist_1d(x, y):
    return np.abs(np.asarray(x, float)[:, None] - np.asarray(y, float)[None, :])


def _nna_1d(gen, ref):
    return one_nna(_dist_1d(gen, gen), _dist_1d(ref, ref), _dist_1d(gen, ref))


# ----------------------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("n,d", [(300, 20), (64, 512)])  # full-rank and rank-deficient Σ
def test_fd_identical_sets_is_zero(n, d):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
    trace = np.trace(np.cov(f, rowvar=False))
    assert frechet_distance(f, f.copy()) <= 1e-8 * trace


def test_fd_shifted_copy_is_squared_shift():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 16)) * rng.uniform(0.1, 3.0, 16)
    c = rng.standard_normal(16)
    expected = float(c @ c)
    assert frechet_distance(a, a + c) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a + c, a) == pytest.approx(expected, rel=1e-9)


def test_fd_1d_closed_form_with_different_variances():
    rng = np.random.default_rng(2)
    m1, s1, m2, s2 = 1.5, 0.5, -0.5, 2.0
    a = _with_exact_moments(rng, 50, [m1], [[s1 ** 2]])
    b = _with_exact_moments(rng, 70, [m2], [[s2 ** 2]])
    assert frechet_distance(a, b) == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-10)


def test_fd_2d_non_commuting_covariances_closed_form():
    # For 2x2 M with positive eigenvalues, Tr(M^½) = sqrt(Tr M + 2 sqrt(det M)).
    rng = np.random.default_rng(3)
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    cov_a = np.array([[2.0, 0.8], [0.8, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    m = cov_a @ cov_b
    cross = math.sqrt(np.trace(m) + 2.0 * math.sqrt(np.linalg.det(m)))
    expected = 8.0 + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-12)
    a = _with_exact_moments(rng, 40, mu_a, cov_a)
    b = _with_exact_moments(rng, 90, mu_b, cov_b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_fd_accepts_torch_and_is_symmetric():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((30, 5)), rng.standard_normal((40, 5)) * 2 + 1
    fd = frechet_distance(a, b)
    assert fd > 0
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-10)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == \
        pytest.approx(fd, rel=1e-5)


def test_fd_errors():
    ok = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"N >= 2.*\(1, 3\)"):
        frechet_distance(np.zeros((1, 3)), ok)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
        frechet_distance(ok, np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(N, D\).*\(4,\)"):
        frechet_distance(np.zeros(4), ok)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), ok)
    with pytest.raises(ValueError, match=r"cov_b has shape \(2, 2\), expected \(3, 3\)"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_latent_features_pools_to_4_cubed():
    rng = np.random.default_rng(5)
    blocks = rng.standard_normal((3, 8, 4, 4, 4))
    # Each 4³ block of the latent holds one constant, so pooling must return those constants.
    lat = blocks.repeat(4, axis=2).repeat(4, axis=3).repeat(4, axis=4)
    feats = latent_features(torch.from_numpy(lat))
    assert feats.shape == (3, 512) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, blocks.reshape(3, 512), rtol=0, atol=1e-12)
    noisy = lat + rng.standard_normal(lat.shape)
    np.testing.assert_array_equal(latent_features(noisy), latent_features(noisy.copy()))


def test_latent_features_errors():
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\).*\(2, 8, 16, 16\)"):
        latent_features(np.zeros((2, 8, 16, 16)))
    with pytest.raises(ValueError, match=r"multiples of 4.*\(2, 8, 16, 16, 6\)"):
        latent_features(np.zeros((2, 8, 16, 16, 6)))


# ----------------------------------------------------------------------------- IoU

def _box(lo, hi, res=32):
    g = np.zeros((res, res, res), dtype=bool)
    g[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return g


def test_iou_hand_made_grids():
    a = _box((0, 0, 0), (16, 32, 32))
    b = _box((8, 0, 0), (24, 32, 32))        # overlaps a on 8 of 24 slabs
    empty = np.zeros_like(a)
    got = iou(np.stack([a, a, empty, empty]), np.stack([b, a, empty, a]))
    np.testing.assert_allclose(got, [1 / 3, 1.0, 1.0, 0.0])


def test_pairwise_iou_matches_per_pair_iou():
    rng = np.random.default_rng(6)
    a = rng.random((7, 32, 32, 32)) < 0.3
    b = rng.random((5, 32, 32, 32)) < 0.5
    a[0] = False
    b[1] = False
    pw = pairwise_iou(torch.from_numpy(a), b)
    assert pw.shape == (7, 5) and pw.dtype == np.float64
    for i in range(7):
        np.testing.assert_allclose(pw[i], iou(np.repeat(a[i:i + 1], 5, axis=0), b), rtol=1e-12)
    assert pw[0, 1] == 1.0


def test_iou_errors():
    g = np.zeros((2, 4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\).*\(3, 4, 4, 4\)"):
        iou(g, np.zeros((3, 4, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\).*\(2, 4, 4, 5\)"):
        pairwise_iou(g, np.zeros((2, 4, 4, 5), dtype=bool))
    with pytest.raises(TypeError, match="boolean.*float32"):
        pairwise_iou(g, np.zeros((2, 4, 4, 4), dtype=np.float32))


# ----------------------------------------------------------------------------- COV / MMD / 1-NNA

def test_cov_mmd_on_hand_matrix():
    d = np.array([[0.1, 0.5, 0.9],
                  [0.3, 0.2, 0.4]])
    assert mmd(d) == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert coverage(d) == pytest.approx(2 / 3)     # both generated pick refs 0 and 1


def test_coverage_mode_collapse():
    rng = np.random.default_rng(7)
    ref = rng.random((10, 8, 8, 8)) < 0.4
    gen = np.repeat(ref[3:4], 6, axis=0)          # every sample is the same training shape
    out = shape_metrics(gen, ref)
    assert out["cov"] == pytest.approx(1 / 10)
    assert out["mmd"] > 0.3


def test_shape_metrics_three_shape_example():
    # 1 − IoU by hand: g0 → (1/2, 1, 3/4), g1 → (1, 0, 1/2); per-ref minima 1/2, 0, 1/2.
    ref = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=bool)
    gen = np.array([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    out = shape_metrics(gen, ref)
    assert out["mmd"] == pytest.approx(1 / 3)
    assert out["cov"] == pytest.approx(2 / 3)


def test_identical_distinct_sets():
    rng = np.random.default_rng(8)
    shapes = rng.random((12, 8, 8, 8)) < 0.5
    out = shape_metrics(shapes, shapes.copy())
    assert out["cov"] == 1.0 and out["mmd"] == 0.0
    # Each shape's nearest neighbour is its exact twin in the other set: the memorisation end of
    # the scale, not 0.5 (see one_nna's docstring).
    assert out["nna"] == 0.0


def test_nna_identical_sets_with_duplicates_is_half():
    # Same multiset on both sides, each shape twice per set: every shape has a same-set and an
    # other-set neighbour at distance 0, so each is a tie worth 0.5 under the documented rule.
    rng = np.random.default_rng(9)
    shapes = np.repeat(rng.random((5, 8, 8, 8)) < 0.5, 2, axis=0)
    out = shape_metrics(shapes, shapes[rng.permutation(10)])
    assert out["nna"] == 0.5 and out["mmd"] == 0.0
    # COV's tie rule (lowest reference index) credits one reference of each duplicate pair.
    assert out["cov"] == 0.5
    assert _nna_1d([1.0] * 4, [1.0] * 7) == 0.5    # every shape identical


def test_nna_separated_sets_is_one():
    rng = np.random.default_rng(10)
    assert _nna_1d(rng.random(6), rng.random(9) + 100.0) == 1.0
    # Variations of a left-half box vs variations of a right-half box: close within a set,
    # IoU 0 across sets.
    gen = np.zeros((4, 16, 16, 16), dtype=bool)
    ref = np.zeros((5, 16, 16, 16), dtype=bool)
    gen[:, :8] = True
    ref[:, 8:] = True
    for i in range(4):
        gen[i, 0, 0, i] = False
    for i in range(5):
        ref[i, 15, 15, i] = False
    assert shape_metrics(gen, ref)["nna"] == 1.0


def test_nna_half_without_ties_and_tie_rule():
    # Cluster pairs (0, 0.1) and (10, 10.1) are labelled correctly, the mixed ones near 100 and
    # 200 wrongly: 4 of 8.
    assert _nna_1d([0.0, 0.1, 100.0, 200.0], [10.0, 10.1, 100.1, 200.1]) == 0.5
    # g0: same 2 < other 4 → 1; g2: 2 == 2 → 0.5; r4: 6 > 2 → 0; r10: 6 < 8 → 1.
    assert _nna_1d([0.0, 2.0], [4.0, 10.0]) == pytest.approx(2.5 / 4)


def test_nna_ignores_diagonal_and_checks_shapes():
    gg, rr, gr = _dist_1d([0, 1], [0, 1]), _dist_1d([5, 6], [5, 6]), _dist_1d([0, 1], [5, 6])
    base = one_nna(gg, rr, gr)
    np.fill_diagonal(gg, 42.0)
    assert one_nna(gg, rr, gr) == base == 1.0
    with pytest.raises(ValueError, match=r"dist_rr.*2x2.*\(3, 3\)"):
        one_nna(gg, np.zeros((3, 3)), gr)
    with pytest.raises(ValueError, match=r"at least 2 shapes per set.*\(1, 2\)"):
        one_nna(np.zeros((1, 1)), rr, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="dist_gen_ref.*NaN"):
        mmd(np.array([[np.nan]]))
