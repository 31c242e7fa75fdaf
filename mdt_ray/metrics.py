"""Sample-quality metrics for generated stage-1 latents and their 32³ occupancy grids.

Two families, both pure functions on numpy arrays or torch tensors (results are float64 numpy):

* Fréchet distance between Gaussians fitted to feature sets (`frechet_distance`), computed on
  `latent_features` of the latents.
* The point-cloud generative-model metrics of Achlioptas et al. 2018 (COV, MMD) and Yang et al.
  2019 (1-NNA), with the distance between two voxel grids d = 1 − IoU (`shape_metrics`).

Every distance-matrix argument is laid out (rows, columns) as its name says: `dist_gen_ref[i, j]`
is the distance from generated shape i to reference shape j.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Output grid of `latent_features`, per spatial axis.
FEATURE_GRID = 4


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf values")


# --------------------------------------------------------------------------- Fréchet distance

def latent_features(latents: Any) -> np.ndarray:
    """Embed latents (B, C, X, Y, Z) as (B, C·4³) float64 vectors for `frechet_distance`.

    Each channel is average-pooled to a 4×4×4 grid (non-overlapping blocks, X, Y and Z divisible
    by 4) and flattened channel-major. For the benchmark's (B, 8, 16, 16, 16) latents that is
    D = 512: one value per channel per 4³ latent block (an 8³ block of the 32³ occupancy grid),
    so the features keep the coarse spatial layout of a shape and what each channel encodes there.
    Finer pooling (8³ → 4096 dims) would need thousands of samples before the covariance is even
    full rank; coarser (2³ → 64 dims) sees only octants. With fewer than D+1 samples the covariance
    is rank-deficient and FD is biased upward, so compare FD values only at equal sample counts.
    No learned network is involved, so the embedding is exactly reproducible across runs.
    """
    x = _to_numpy(latents).astype(np.float64, copy=False)
    if x.ndim != 5:
        raise ValueError(f"latents must be (B, C, X, Y, Z), got shape {tuple(x.shape)}")
    b, c, *spatial = x.shape
    if any(s % FEATURE_GRID for s in spatial) or min(spatial) == 0:
        raise ValueError(f"latent spatial dims {tuple(spatial)} must be positive multiples of "
                         f"{FEATURE_GRID} (latents shape {tuple(x.shape)})")
    _check_finite(x, "latents")
    g = FEATURE_GRID
    kx, ky, kz = (s // g for s in spatial)
    pooled = x.reshape(b, c, g, kx, g, ky, g, kz).mean(axis=(3, 5, 7))
    return pooled.reshape(b, c * g ** 3)


def _gaussian_stats(feats: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    f = _to_numpy(feats).astype(np.float64, copy=False)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs N >= 2 samples to estimate a covariance, got shape "
                         f"{tuple(f.shape)}")
    _check_finite(f, name)
    mu = f.mean(axis=0)
    centred = f - mu
    cov = centred.T @ centred / (f.shape[0] - 1)
    return mu, cov


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    # Eigenvalues of a numerically singular covariance come back as ±(eps·λmax) noise; their
    # square roots would be ~1e-8·sqrt(λmax), large enough to leak into the cross term, so
    # everything below the same tolerance numpy's matrix_rank uses is treated as exactly zero.
    tol = w.max(initial=0.0) * cov.shape[0] * np.finfo(np.float64).eps
    root = np.sqrt(np.where(w > tol, w, 0.0))
    return (v * root) @ v.T


def frechet_distance_from_stats(mu_a: Any, cov_a: Any, mu_b: Any, cov_b: Any) -> float:
    """FD between N(mu_a, cov_a) and N(mu_b, cov_b); lets a caller cache reference statistics."""
    mu_a, mu_b, cov_a, cov_b = (_to_numpy(x).astype(np.float64)
                                for x in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.ndim != 1:
        raise ValueError(f"mu_a must be a (D,) vector, got shape {tuple(mu_a.shape)}")
    d = mu_a.shape[0]
    for name, arr, want in (("mu_a", mu_a, (d,)), ("mu_b", mu_b, (d,)),
                            ("cov_a", cov_a, (d, d)), ("cov_b", cov_b, (d, d))):
        if arr.shape != want:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {want} (mu_a "
                             f"{tuple(mu_a.shape)}, mu_b {tuple(mu_b.shape)}, cov_a "
                             f"{tuple(cov_a.shape)}, cov_b {tuple(cov_b.shape)})")
        _check_finite(arr, name)
    sa, sb = _psd_sqrt(cov_a), _psd_sqrt(cov_b)
    # Tr((Σa Σb)^½) equals the nuclear norm of Σa^½ Σb^½ (its squared singular values are the
    # eigenvalues of Σa^½ Σb Σa^½). SVD gets small singular values right to eps·‖·‖, where taking
    # square roots of eigenvalues would amplify eps-level noise to sqrt(eps).
    cross = np.linalg.svd(sa @ sb, compute_uv=False).sum()
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    # Rounding can leave a tiny negative number for (near-)identical distributions.
    return max(fd, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """FD = ‖mu_a − mu_b‖² + Tr(Σa + Σb − 2(Σa Σb)^½) between Gaussians fitted to (N, D) sets.

    Covariances are unbiased (divide by N − 1); everything runs in float64.
    """
    fa, fb = _to_numpy(feats_a), _to_numpy(feats_b)
    mu_a, cov_a = _gaussian_stats(fa, "feats_a")
    mu_b, cov_b = _gaussian_stats(fb, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dims differ: feats_a is {tuple(fa.shape)}, feats_b is "
                         f"{tuple(fb.shape)}")
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)


# --------------------------------------------------------------------------- IoU

def _as_bool_grids(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean occupancy grid, got dtype {arr.dtype} "
                        f"(threshold it first)")
    if arr.ndim < 2:
        raise ValueError(f"{name} must be (B, ...) with at least one grid axis, got shape "
                         f"{tuple(arr.shape)}")
    return arr


def iou(a: Any, b: Any) -> np.ndarray:
    """Per-pair IoU of boolean grids a[i], b[i], shapes (B, ...) → (B,) float64.

    Two empty grids have IoU 1.0: they are the same shape, so their distance 1 − IoU is 0.
    """
    a, b = _as_bool_grids(a, "a"), _as_bool_grids(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    inter = np.logical_and(a2, b2).sum(axis=1).astype(np.float64)
    union = np.logical_or(a2, b2).sum(axis=1).astype(np.float64)
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def pairwise_iou(a: Any, b: Any) -> np.ndarray:
    """IoU of every a[i] with every b[j]: (Na, ...) × (Nb, ...) → (Na, Nb) float64."""
    a, b = _as_bool_grids(a, "a"), _as_bool_grids(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"grid shapes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    voxels = int(np.prod(a.shape[1:]))
    # A 0/1 dot product sums integers no larger than the voxel count, which float32 holds
    # exactly up to 2^24 in any summation order, so the BLAS matmul gives exact counts.
    dtype = torch.float32 if voxels <= 2 ** 24 else torch.float64
    ta = torch.from_numpy(a.reshape(a.shape[0], voxels).astype(np.float32)).to(dtype)
    tb = torch.from_numpy(b.reshape(b.shape[0], voxels).astype(np.float32)).to(dtype)
    inter = (ta @ tb.T).double().numpy()
    union = ta.sum(1).double().numpy()[:, None] + tb.sum(1).double().numpy()[None, :] - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


# --------------------------------------------------------------------------- COV / MMD / 1-NNA

def _dist_matrix(d: Any, name: str, shape: tuple[int | None, int | None] = (None, None)
                 ) -> np.ndarray:
    m = _to_numpy(d).astype(np.float64, copy=False)
    if m.ndim != 2 or 0 in m.shape or any(w is not None and w != s for w, s in zip(shape, m.shape)):
        want = "x".join("?" if w is None else str(w) for w in shape)
        raise ValueError(f"{name} must be a non-empty {want} distance matrix, got shape "
                         f"{tuple(m.shape)}")
    _check_finite(m, name)
    return m


def coverage(dist_gen_ref: Any) -> float:
    """Fraction of reference shapes that are the nearest reference of at least one generated one.

    A generated shape equidistant to several references covers only the lowest-index one
    (np.argmin). Crediting all of them would be order-free but wrong for IoU distances, which
    saturate at 1: a generated shape disjoint from every reference (an empty grid, say) would tie
    at distance 1 with all of them and "cover" the whole set. The cost is that exact duplicates
    in the reference set can never all be covered.
    """
    d = _dist_matrix(dist_gen_ref, "dist_gen_ref")
    return float(np.unique(d.argmin(axis=1)).size / d.shape[1])


def mmd(dist_gen_ref: Any) -> float:
    """Minimum matching distance: mean over references of the distance to the closest generated."""
    return float(_dist_matrix(dist_gen_ref, "dist_gen_ref").min(axis=0).mean())


def one_nna(dist_gg: Any, dist_rr: Any, dist_gr: Any) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of telling generated from reference shapes.

    Each shape is labelled by its nearest neighbour in the union of both sets minus itself; the
    result is the fraction labelled correctly. 0.5 means the sets are indistinguishable, 1.0 that
    they are fully separated, and well below 0.5 that generated shapes sit on top of reference
    ones (an exact copy of a set of distinct shapes scores 0.0: each shape's nearest neighbour is
    its twin in the other set).

    Tie rule: when a shape's nearest same-set and nearest other-set distances are equal, it scores
    0.5 (the expected accuracy of breaking the tie by a fair coin), never depending on index
    order. So sets that cannot be told apart even with ties - e.g. the same multiset on both
    sides where every shape also has a duplicate inside its own set, or every shape identical -
    score exactly 0.5. Diagonals of dist_gg and dist_rr are ignored.
    """
    gr = _dist_matrix(dist_gr, "dist_gr")
    ng, nr = gr.shape
    gg = _dist_matrix(dist_gg, "dist_gg", (ng, ng))
    rr = _dist_matrix(dist_rr, "dist_rr", (nr, nr))
    if ng < 2 or nr < 2:
        raise ValueError(f"1-NNA needs at least 2 shapes per set, got dist_gr shape {(ng, nr)}")

    def nearest_same(d: np.ndarray) -> np.ndarray:
        d = d.copy()
        np.fill_diagonal(d, np.inf)
        return d.min(axis=1)

    same = np.concatenate([nearest_same(gg), nearest_same(rr)])
    other = np.concatenate([gr.min(axis=1), gr.min(axis=0)])
    score = (same < other) + 0.5 * (same == other)
    return float(score.mean())


def shape_metrics(gen_occ: Any, ref_occ: Any) -> dict[str, float]:
    """COV, MMD and 1-NNA of generated vs reference boolean grids, distance 1 − IoU."""
    gen, ref = _as_bool_grids(gen_occ, "gen_occ"), _as_bool_grids(ref_occ, "ref_occ")
    if gen.shape[1:] != ref.shape[1:]:
        raise ValueError(f"grid shapes differ: gen_occ is {tuple(gen.shape)}, ref_occ is "
                         f"{tuple(ref.shape)}")
    d_gr = 1.0 - pairwise_iou(gen, ref)
    return {
        "cov": coverage(d_gr),
        "mmd": mmd(d_gr),
        "nna": one_nna(1.0 - pairwise_iou(gen, gen), 1.0 - pairwise_iou(ref, ref), d_gr),
    }
