"""The benchmark corpus: a conditional distribution over shapes that is known exactly.

Each condition is a top-down silhouette (a binary image of the shape's projection along z); each
is consistent with three clearly different shapes that project to it — different primitives and
heights — and the shapes come with known weights. The data are Dirac masses: shape m of
condition k is the ±1 stage-1 latent of its voxelisation (mdt_ray.data.synthetic's encoding, so
it decodes exactly), drawn with probability prior[k]·w[k][m]. The modes of a condition sit at
disjoint heights, so their latents disagree on every voxel either occupies, and the mean of the
modes (what a sampler that averages them produces) decodes to no valid shape at all.

Asset `i` of a corpus with seed `s` draws its (condition, mode) from
`numpy.random.default_rng([VERSION, s, i])`, like the synthetic corpus, so a corpus is the same
whatever the shard or worker count. Built with `mdt-ray corpus build --kind multimodal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mdt_ray.data import synthetic as syn

VERSION = 1  # bump when a change alters the shapes, weights or conditions
KIND = "multimodal"
HEIGHTS = (-0.27, 0.0, 0.27)  # shape centres along z: far enough apart that no two modes overlap
_I = np.eye(3, dtype=np.float32)
_ALONG_X = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float32)  # local z = world x


@dataclass(frozen=True)
class Mode:
    name: str
    family: str
    params: tuple[float, ...]
    z: float
    along_x: bool = False  # lie the primitive's axis (local z) along world x

    def primitive(self) -> syn.Primitive:
        rotation = _ALONG_X if self.along_x else _I
        return syn.Primitive(self.family, np.array([0.0, 0.0, self.z], np.float32), rotation, self.params,
                             np.ones(3, np.float32), 0.0)


@dataclass(frozen=True)
class Condition:
    name: str
    modes: tuple[Mode, ...]
    weights: tuple[float, ...]


CONDITIONS: tuple[Condition, ...] = (
    Condition("disk", (
        Mode("ellipsoid-low", "ellipsoid", (0.24, 0.24, 0.11), HEIGHTS[0]),
        Mode("cylinder-mid", "cylinder", (0.24, 0.11), HEIGHTS[1]),
        Mode("cone-high", "cone", (0.24, 0.11), HEIGHTS[2]),
    ), (0.45, 0.35, 0.20)),
    Condition("square", (
        Mode("slab-high", "box", (0.22, 0.22, 0.11, 0.0), HEIGHTS[2]),
        Mode("slab-mid", "box", (0.22, 0.22, 0.11, 0.0), HEIGHTS[1]),
        Mode("slab-low", "box", (0.22, 0.22, 0.11, 0.0), HEIGHTS[0]),
    ), (0.40, 0.35, 0.25)),
    Condition("ring", (
        Mode("torus-low", "torus", (0.22, 0.09), HEIGHTS[0]),
        Mode("torus-mid", "torus", (0.22, 0.09), HEIGHTS[1]),
        Mode("torus-high", "torus", (0.22, 0.09), HEIGHTS[2]),
    ), (0.50, 0.30, 0.20)),
    Condition("bar", (
        Mode("capsule-low", "capsule", (0.11, 0.22), HEIGHTS[0], True),
        Mode("capsule-mid", "capsule", (0.11, 0.22), HEIGHTS[1], True),
        Mode("capsule-high", "capsule", (0.11, 0.22), HEIGHTS[2], True),
    ), (1 / 3, 1 / 3, 1 / 3)),
)
PRIOR = tuple(1.0 / len(CONDITIONS) for _ in CONDITIONS)


@dataclass(frozen=True)
class Distribution:
    """Everything the exact teacher and the scorer need, as arrays.

    occupancy (M, 32, 32, 32) bool and latents (M, 8, 16, 16, 16) ±1 of every mode (all
    conditions, in order); cond (K, 64, 64) tokens; components[k] the mode indices of condition k;
    weights[k] their probabilities; mode_names (M,)."""

    occupancy: np.ndarray
    latents: np.ndarray
    cond: np.ndarray
    images: np.ndarray
    components: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    prior: tuple[float, ...]
    mode_names: tuple[str, ...]
    condition_names: tuple[str, ...]

    @property
    def num_modes(self) -> int:
        return self.latents.shape[0]

    def joint(self) -> np.ndarray:
        """P(mode) of every mode over the whole corpus (M,)."""
        p = np.zeros(self.num_modes)
        for k, (idx, w) in enumerate(zip(self.components, self.weights)):
            p[list(idx)] += self.prior[k] * np.asarray(w)
        return p

    def condition_of_mode(self) -> np.ndarray:
        out = np.zeros(self.num_modes, dtype=np.int64)
        for k, idx in enumerate(self.components):
            out[list(idx)] = k
        return out

    def exact_teacher(self, sigma_min: float = 1e-5):
        from mdt_ray.benchmark.exact import ExactTeacher

        return ExactTeacher(torch.tensor(self.latents), torch.tensor(self.cond), self.components,
                            self.weights, prior=self.prior, sigma=0.0, sigma_min=sigma_min)

    def sample(self, conditions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Mode indices drawn exactly from each given condition's weights (N,)."""
        out = np.empty(len(conditions), dtype=np.int64)
        for k, (idx, w) in enumerate(zip(self.components, self.weights)):
            rows = np.nonzero(conditions == k)[0]
            out[rows] = rng.choice(np.asarray(idx), size=len(rows), p=np.asarray(w))
        return out


def silhouette(occ: np.ndarray) -> np.ndarray:
    """The (64, 64) top-down silhouette image of occupancy (32, 32, 32): projection along z,
    each voxel column as a 2×2 pixel block, row 0 at +y (north up)."""
    top = occ.any(axis=2).T[::-1]  # (y, x) with y increasing upward
    return np.kron(top, np.ones((2, 2), dtype=bool)).astype(np.float32)


@lru_cache(maxsize=1)
def distribution() -> Distribution:
    occs, comps, names = [], [], []
    images = []
    for cond in CONDITIONS:
        idx = []
        for mode in cond.modes:
            occ = syn.voxelize([mode.primitive()])
            if occ.sum() < 64:
                raise RuntimeError(f"benchmark mode {cond.name}/{mode.name}: only {int(occ.sum())} voxels")
            idx.append(len(occs))
            occs.append(occ)
            names.append(f"{cond.name}/{mode.name}")
        comps.append(tuple(idx))
        # The condition's image is its first mode's silhouette; the others match it up to a ring
        # of boundary pixels (docs/benchmark.md gives the counts), and are the same shape in 2D.
        images.append(silhouette(occs[idx[0]]))
    occupancy = np.stack(occs)
    images_arr = np.stack(images)
    d = Distribution(
        occupancy=occupancy, latents=syn.encode_ss(occupancy), cond=syn.encode_cond(images_arr), images=images_arr,
        components=tuple(comps), weights=tuple(tuple(float(x) for x in c.weights) for c in CONDITIONS),
        prior=PRIOR, mode_names=tuple(names), condition_names=tuple(c.name for c in CONDITIONS))
    for a in (d.occupancy, d.latents, d.cond, d.images):
        a.flags.writeable = False
    return d


def draw(seed: int, index: int) -> tuple[int, int]:
    """(condition, mode index) of asset `index` of the corpus with seed `seed`."""
    if index < 0:
        raise ValueError(f"asset index must be >= 0, got {index}")
    d = distribution()
    rng = np.random.default_rng([VERSION, 0xBE7C, int(seed), int(index)])
    k = int(rng.choice(len(d.prior), p=np.asarray(d.prior)))
    m = int(rng.choice(np.asarray(d.components[k]), p=np.asarray(d.weights[k])))
    return k, m


def asset_id(seed: int, index: int, mode: int) -> str:
    return f"{KIND}-s{seed}-{index:08d}-m{mode:02d}"


# -- corpus build (the same Parquet / Ray Data / S3 path as every corpus) -------------------------
CHUNK = 256


def rows(*, seed: int, start: int, stop: int) -> Iterator[dict[str, Any]]:
    d = distribution()
    empty_c, empty_f = np.zeros((0, 3), np.int16), np.zeros((0, syn.SLAT_CHANNELS), np.float32)
    for lo in range(start, stop, CHUNK):
        drawn = [draw(seed, i) for i in range(lo, min(stop, lo + CHUNK))]
        ks = np.array([k for k, _ in drawn])
        ms = np.array([m for _, m in drawn])
        yield {
            "asset_id": [asset_id(seed, lo + j, m) for j, m in enumerate(ms)],
            "ss_latent": d.latents[ms],
            # Stage 1 only: the rows carry no SLAT (the manifest says stages ["ss"]).
            "slat_coords": [empty_c] * len(ms),
            "slat_feats": [empty_f] * len(ms),
            "cond": d.cond[ks],
        }


def plan(num_assets: int, *, seed: int = 0, rows_per_shard: Optional[int] = None,
         num_shards: Optional[int] = None):
    from mdt_ray.data.corpus import ROW_GROUP_BYTES, BuildPlan, ShardTask, row_bytes, shard_counts
    from mdt_ray.data.schema import Manifest

    if num_assets < 1:
        raise ValueError(f"--num-assets must be >= 1, got {num_assets}")
    d = distribution()
    manifest = Manifest(
        latent_shape=syn.LATENT_SHAPE, cond_shape=syn.COND_SHAPE, slat_channels=syn.SLAT_CHANNELS,
        slat_resolution=syn.SLAT_RESOLUTION, stages=("ss",),
        source={"kind": KIND, "seed": int(seed), "num_assets": int(num_assets), "version": VERSION,
                "encoder_seed": syn.ENCODER_SEED, "conditions": list(d.condition_names),
                "modes": list(d.mode_names), "weights": [list(w) for w in d.weights]},
    )
    nbytes = row_bytes(manifest, mean_voxels=0)
    counts = shard_counts(num_assets, rows_per_shard=rows_per_shard, num_shards=num_shards, row_nbytes=nbytes)
    tasks, start = [], 0
    for k, n in enumerate(counts):
        tasks.append(ShardTask(index=k, num_rows=n, produce=rows,
                               spec={"seed": int(seed), "start": start, "stop": start + n}))
        start += n
    return BuildPlan(manifest=manifest, tasks=tasks, rows_per_group=max(1, ROW_GROUP_BYTES // nbytes))


def build(target, num_assets: int, *, seed: int = 0, rows_per_shard: Optional[int] = None,
          num_shards: Optional[int] = None, workers: Optional[int] = None, use_ray: Optional[bool] = None,
          overwrite: bool = False, progress: bool = True):
    from mdt_ray.data.corpus import run_plan

    p = plan(num_assets, seed=seed, rows_per_shard=rows_per_shard, num_shards=num_shards)
    return run_plan(p, target, workers=workers, use_ray=use_ray, overwrite=overwrite, progress=progress)
