"""The embedded default corpus: procedural 3D shapes, encoded exactly in TRELLIS's latent formats.

Every asset is a union of one to three primitives (sphere, ellipsoid, rounded box, cylinder,
cone, torus, capsule, octahedron) with a random rotation, scale and position, described by signed
distance functions and voxelised at 32³ (a voxel is occupied when the SDF at its centre is <= 0).

- Stage 1: the 32³ occupancy is folded into TRELLIS's (8, 16, 16, 16) latent by space-to-depth:
  channel `4a + 2b + c` of latent cell (i, j, k) is voxel (2i+a, 2j+b, 2k+c), as +1 (occupied) or
  -1 (empty). Decoding (threshold at 0, depth-to-space) is exact, so a generated latent can be
  scored as a shape.
- Stage 2: the shape's surface voxels (occupied, with an empty 6-neighbour) as (L, 3) coordinates
  in [0, 32), each with 8 features: outward normal (3), a colour field (3, in [-1, 1]), depth of
  the voxel centre below the surface (1) and a per-primitive material value (1).
- Conditioning: a 64×64 depth-and-Lambert shaded orthographic view from a fixed camera, cut into
  an 8×8 grid of 8×8 patches and mapped to 64 tokens × 64 dims by a frozen patch encoder (see
  `encode_cond`). It plays DINOv2's part with the same interface: T tokens × C dims per image.
  An image corpus (`views` > 0 at build) stores instead V such views (the first from the default
  camera, the others turned about the vertical axis by 360°/V each) as grey RGB images, so that
  training runs the image path: decode, per-step view draw and a frozen encoder on the worker.

Reproducibility: asset `i` of a corpus with seed `s` is drawn from `numpy.random.default_rng([s,
i])`, so it does not depend on the shard count, the worker count or the order of generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Union

import numpy as np

GRID = 32
LATENT_SHAPE = (8, 16, 16, 16)
IMAGE_SIZE = 64
PATCH = 8
COND_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 64
COND_DIM = 64
COND_SHAPE = (COND_TOKENS, COND_DIM)
SLAT_CHANNELS = 8
SLAT_RESOLUTION = GRID
ENCODER_SEED = 0x5EED_C0DE  # fixes the frozen patch encoder; changing it changes every corpus
GENERATOR_VERSION = 1  # bump when a change alters the assets a (seed, index) pair produces

FAMILIES = ("sphere", "ellipsoid", "box", "cylinder", "cone", "torus", "capsule", "octahedron")
DEFAULT_AZIMUTH = 45.0
DEFAULT_ELEVATION = 30.0
_MIN_VOXELS = 24  # redraw shapes thinner than this: they carry almost no signal at 32³

Array = np.ndarray


# -- stage-1 latent: space-to-depth and back -----------------------------------------------------
def encode_ss(occ: Array) -> Array:
    """Occupancy (..., 32, 32, 32) bool -> latent (..., 8, 16, 16, 16) float32 in {-1, +1}."""
    occ = np.asarray(occ)
    if occ.shape[-3:] != (GRID,) * 3:
        raise ValueError(f"encode_ss expects (..., {GRID}, {GRID}, {GRID}) occupancy, got {occ.shape}")
    lead = occ.shape[:-3]
    h = GRID // 2
    x = occ.astype(bool).reshape(*lead, h, 2, h, 2, h, 2)
    n = len(lead)
    # (..., i, a, j, b, k, c) -> (..., a, b, c, i, j, k)
    x = x.transpose(*range(n), n + 1, n + 3, n + 5, n, n + 2, n + 4)
    x = x.reshape(*lead, 8, h, h, h)
    return np.where(x, np.float32(1.0), np.float32(-1.0))


def decode_ss(latent: Any) -> Any:
    """Latent (..., 8, 16, 16, 16) -> occupancy (..., 32, 32, 32) bool (threshold at 0).

    Takes a numpy array or a torch tensor (any float dtype, any device) and returns the same
    kind, so evaluation can decode a whole batch of generated latents where they are.
    """
    if tuple(latent.shape[-4:]) != LATENT_SHAPE:
        raise ValueError(f"decode_ss expects (..., 8, 16, 16, 16) latents, got {tuple(latent.shape)}")
    lead = tuple(latent.shape[:-4])
    n = len(lead)
    h = GRID // 2
    x = (latent > 0).reshape(*lead, 2, 2, 2, h, h, h)
    order = (*range(n), n + 3, n, n + 4, n + 1, n + 5, n + 2)  # -> (..., i, a, j, b, k, c)
    x = x.permute(*order) if hasattr(x, "permute") else x.transpose(*order)
    return x.reshape(*lead, GRID, GRID, GRID)


# -- procedural shapes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Primitive:
    family: str
    center: Array  # (3,)
    rotation: Array  # (3, 3); local = (p - center) @ rotation
    params: tuple[float, ...]
    color: Array  # (3,) in [0, 1]
    material: float  # in [-1, 1]


def _len(v: Array) -> Array:
    return np.sqrt(np.sum(v * v, axis=-1))


def _sdf_local(family: str, q: Array, params: tuple[float, ...]) -> Array:
    """Signed distance (exact or a sign-correct bound) of a primitive at local points q (N, 3)."""
    if family == "sphere":
        (r,) = params
        return _len(q) - r
    if family == "ellipsoid":
        radii = np.asarray(params, dtype=q.dtype)
        k0 = _len(q / radii)
        k1 = _len(q / (radii * radii))
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)
    if family == "box":
        *half, round_r = params
        d = np.abs(q) - (np.asarray(half, dtype=q.dtype) - round_r)
        outside = _len(np.maximum(d, 0.0))
        inside = np.minimum(np.max(d, axis=-1), 0.0)
        return outside + inside - round_r
    if family == "cylinder":
        r, h = params
        d = np.stack([_len(q[:, :2]) - r, np.abs(q[:, 2]) - h], axis=-1)
        return np.minimum(np.max(d, axis=-1), 0.0) + _len(np.maximum(d, 0.0))
    if family == "cone":
        r, h = params  # base radius r at z = -h, apex at z = +h
        radius_at = r * (h - q[:, 2]) / (2 * h)
        side = (_len(q[:, :2]) - radius_at) * (2 * h) / math.hypot(2 * h, r)
        return np.maximum(side, np.abs(q[:, 2]) - h)
    if family == "torus":
        big, small = params
        ring = np.stack([_len(q[:, :2]) - big, q[:, 2]], axis=-1)
        return _len(ring) - small
    if family == "capsule":
        r, h = params
        nearest = np.zeros_like(q)
        nearest[:, 2] = np.clip(q[:, 2], -h, h)
        return _len(q - nearest) - r
    if family == "octahedron":
        (s,) = params
        return (np.sum(np.abs(q), axis=-1) - s) * np.float32(1 / math.sqrt(3))
    raise ValueError(f"unknown primitive family {family!r}; known: {FAMILIES}")


def _bounding_radius(family: str, params: tuple[float, ...]) -> float:
    if family in ("sphere", "octahedron"):
        return params[0]
    if family == "ellipsoid":
        return max(params)
    if family == "box":
        return math.sqrt(sum(p * p for p in params[:3]))
    if family in ("cylinder", "cone"):
        return math.hypot(*params)
    if family == "torus":
        return params[0] + params[1]
    if family == "capsule":
        return params[0] + params[1]
    raise ValueError(f"unknown primitive family {family!r}")


def _random_rotation(rng: np.random.Generator) -> Array:
    # A normalised Gaussian quaternion is a uniformly random rotation.
    w, x, y, z = rng.standard_normal(4) / 1.0
    n = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=np.float32,
    )


def _random_params(family: str, size: float, rng: np.random.Generator) -> tuple[float, ...]:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if family == "sphere":
        return (size,)
    if family == "ellipsoid":
        return (size, size * u(0.45, 1.0), size * u(0.3, 0.8))
    if family == "box":
        half = (size * u(0.5, 1.0), size * u(0.4, 1.0), size * u(0.3, 0.9))
        return (*half, min(half) * u(0.0, 0.4))
    if family == "cylinder":
        return (size * u(0.35, 0.8), size * u(0.5, 1.0))
    if family == "cone":
        return (size * u(0.5, 0.9), size * u(0.6, 1.0))
    if family == "torus":
        big = size * u(0.6, 0.9)
        return (big, max(0.05, big * u(0.2, 0.45)))
    if family == "capsule":
        return (size * u(0.25, 0.5), size * u(0.4, 0.8))
    if family == "octahedron":
        return (size * u(0.9, 1.3),)
    raise ValueError(f"unknown primitive family {family!r}")


def random_shape(rng: np.random.Generator) -> list[Primitive]:
    """One to three primitives that overlap or touch, all inside a ball of radius 0.47."""
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    prims: list[Primitive] = []
    for n in range(count):
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
        size = float(rng.uniform(0.2, 0.34) if n == 0 else rng.uniform(0.12, 0.26))
        params = _random_params(family, size, rng)
        radius = _bounding_radius(family, params)
        if radius > 0.45:  # keep every primitive inside the grid
            scale = 0.45 / radius
            params = tuple(p * scale for p in params)
            radius = 0.45
        if n == 0:
            center = rng.uniform(-1, 1, 3) * 0.06
        else:
            # Attach to a previous part: a point near its surface, so the union is one object.
            anchor = prims[int(rng.integers(len(prims)))]
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction) or 1.0
            reach = _bounding_radius(anchor.family, anchor.params) * rng.uniform(0.4, 0.9)
            center = anchor.center + direction * reach
        room = 0.47 - radius
        dist = float(np.linalg.norm(center))
        if dist > room:
            center = center * (max(room, 0.0) / dist)
        prims.append(
            Primitive(
                family=family,
                center=np.asarray(center, dtype=np.float32),
                rotation=_random_rotation(rng),
                params=params,
                color=rng.uniform(0.05, 1.0, 3).astype(np.float32),
                material=float(rng.uniform(-1, 1)),
            )
        )
    return prims


def sdf(prims: list[Primitive], points: Array) -> tuple[Array, Array]:
    """Union SDF at points (N, 3) and the index of the primitive that attains it."""
    values = np.stack(
        [_sdf_local(p.family, (points - p.center) @ p.rotation, p.params) for p in prims], axis=0
    )
    which = np.argmin(values, axis=0)
    return np.take_along_axis(values, which[None], axis=0)[0], which


@lru_cache(maxsize=None)
def voxel_centers() -> Array:
    """(32³, 3) float32 centres of the grid cells in [-0.5, 0.5]³, (x, y, z) in C order."""
    c = (np.arange(GRID, dtype=np.float32) + 0.5) / GRID - 0.5
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    out = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    out.flags.writeable = False
    return out


def voxelize(prims: list[Primitive]) -> Array:
    values, _ = sdf(prims, voxel_centers())
    return (values <= 0).reshape(GRID, GRID, GRID)


def surface_voxels(occ: Array) -> Array:
    """(L, 3) int coordinates of occupied voxels with an empty 6-neighbour (or on the border)."""
    padded = np.pad(occ, 1, constant_values=False)
    inner = padded[1:-1, 1:-1, 1:-1]
    all_full = (
        padded[:-2, 1:-1, 1:-1] & padded[2:, 1:-1, 1:-1]
        & padded[1:-1, :-2, 1:-1] & padded[1:-1, 2:, 1:-1]
        & padded[1:-1, 1:-1, :-2] & padded[1:-1, 1:-1, 2:]
    )
    return np.argwhere(inner & ~all_full)


def slat_features(prims: list[Primitive], coords: Array, stripes: Array) -> Array:
    """(L, 8) float32 per-voxel features for surface voxels `coords` (L, 3)."""
    centers = (coords.astype(np.float32) + 0.5) / GRID - 0.5
    value, which = sdf(prims, centers)
    eps = np.float32(0.5 / GRID)
    grad = np.empty_like(centers)
    for axis in range(3):
        step = np.zeros(3, dtype=np.float32)
        step[axis] = eps
        grad[:, axis] = sdf(prims, centers + step)[0] - sdf(prims, centers - step)[0]
    normal = grad / np.maximum(_len(grad), 1e-8)[:, None]
    base = np.stack([p.color for p in prims])[which]
    # A smooth stripe pattern over the surface, so colour varies within a part, not only between.
    freq, phase = stripes[:3], stripes[3]
    shade = 0.75 + 0.25 * np.sin(centers @ freq + phase)
    color = np.clip(base * shade[:, None], 0.0, 1.0) * 2.0 - 1.0
    depth = np.clip(-value * GRID, 0.0, 2.0) - 1.0  # 0..2 voxels below the surface -> [-1, 1]
    material = np.asarray([p.material for p in prims], dtype=np.float32)[which]
    return np.concatenate(
        [normal, color, depth[:, None], material[:, None]], axis=1
    ).astype(np.float32)


# -- rendering -----------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _camera_lookup(size: int, azimuth: float, elevation: float, extent: float):
    """Per pixel and ray sample: the flat voxel index (-1 outside the grid) and the shade of the
    voxel face the ray enters there; plus each sample's depth in [0, 1].

    Orthographic camera on a sphere around the origin, looking at it; samples every half voxel.
    Faces are flat-shaded by a light fixed relative to the camera (upper right, in front), so
    every view of every shape is lit the same way.
    """
    az, el = math.radians(azimuth), math.radians(elevation)
    eye = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = -eye
    world_up = np.array([0.0, 0.0, 1.0]) if abs(eye[2]) < 0.999 else np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, world_up)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    px = ((np.arange(size) + 0.5) / size - 0.5) * extent
    s, t = np.meshgrid(px, -px, indexing="xy")  # row 0 is the top of the image
    half_diag = math.sqrt(3) / 2
    steps = np.arange(-half_diag, half_diag, 0.5 / GRID)
    pos = s[..., None, None] * right + t[..., None, None] * up + steps[:, None] * forward
    idx = np.floor((pos + 0.5) * GRID).astype(np.int64).reshape(size * size, len(steps), 3)
    inside = np.all((idx >= 0) & (idx < GRID), axis=-1)
    flat = np.where(inside, (idx[..., 0] * GRID + idx[..., 1]) * GRID + idx[..., 2], -1)
    # The face a ray enters through is across the axis whose index changed since the previous
    # sample; the very first sample enters across the axis the ray runs along the most.
    change = np.diff(idx, axis=1)
    axis = np.argmax(np.abs(change), axis=-1)
    sign = np.take_along_axis(change, axis[..., None], axis=-1)[..., 0]
    axis0 = int(np.argmax(np.abs(forward)))
    axis = np.concatenate([np.full((size * size, 1), axis0), axis], axis=1)
    sign = np.concatenate([np.full((size * size, 1), np.sign(forward[axis0])), sign], axis=1)
    light = 0.35 * right + 0.55 * up + 0.75 * eye
    light /= np.linalg.norm(light)
    # Entering along +axis means the face's outward normal is -axis.
    face_light = np.clip(-np.sign(sign) * light[axis], 0.0, 1.0)
    depth = (steps + half_diag) / (2 * half_diag)  # 0 nearest, 1 farthest
    return flat, face_light.astype(np.float32), depth.astype(np.float32)


def render_view(
    occ: Array,
    *,
    size: int = IMAGE_SIZE,
    azimuth: float = DEFAULT_AZIMUTH,
    elevation: float = DEFAULT_ELEVATION,
    extent: float = 1.0,
) -> Array:
    """Grey image (..., size, size) float32 in [0, 1] of occupancy (..., 32, 32, 32).

    Orthographic view from (azimuth, elevation) degrees; the image side spans `extent` grid
    widths. A pixel that sees the shape shows the first voxel face its ray enters, flat-shaded
    (ambient + Lambert) and darkened with depth; the background is 0. The cond images use the
    default camera; evaluation renders may pass any other view or size.
    """
    occ = np.asarray(occ, dtype=bool)
    if occ.shape[-3:] != (GRID,) * 3:
        raise ValueError(f"render_view expects (..., {GRID}, {GRID}, {GRID}) occupancy, got {occ.shape}")
    lead = occ.shape[:-3]
    flat, face_light, depth = _camera_lookup(int(size), float(azimuth), float(elevation), float(extent))
    vox = occ.reshape(-1, GRID**3)
    # One extra, always-empty cell, so that index -1 (outside the grid) reads "empty".
    vox = np.concatenate([vox, np.zeros((vox.shape[0], 1), dtype=bool)], axis=1)
    hits = vox[:, flat]  # (B, P, K)
    seen = hits.any(axis=-1)
    first = np.argmax(hits, axis=-1)  # (B, P)
    pixel = np.arange(flat.shape[0])
    shade = face_light[pixel, first]
    img = (0.25 + 0.75 * shade) * (1.0 - 0.45 * depth[first])
    img = np.where(seen, img, 0.0).astype(np.float32)
    return img.reshape(*lead, size, size)


def view_images(occ: Array, views: int) -> list[Array]:
    """`views` renders of one asset as (64, 64, 3) uint8 grey RGB: the cond view first, then the
    camera turned about the vertical axis by 360°/views each time."""
    out = []
    for k in range(views):
        grey = render_view(occ, azimuth=DEFAULT_AZIMUTH + 360.0 * k / views)
        level = np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)
        out.append(np.repeat(level[..., None], 3, axis=2))
    return out


# -- the frozen patch encoder --------------------------------------------------------------------
@lru_cache(maxsize=1)
def _encoder_weights() -> tuple[Array, Array, Array]:
    rng = np.random.default_rng(ENCODER_SEED)
    pix = PATCH * PATCH
    weight = (rng.standard_normal((pix, COND_DIM)) * (2.0 / math.sqrt(pix))).astype(np.float32)
    bias = (rng.standard_normal(COND_DIM) * 0.1).astype(np.float32)
    # Fixed 2-D sinusoidal position code, so equal patches at different places differ (DINOv2's
    # tokens carry position too); half the dims encode the row, half the column.
    g = IMAGE_SIZE // PATCH
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    freqs = np.exp(-math.log(100.0) * np.arange(COND_DIM // 4) / (COND_DIM // 4))
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        arg = coord[:, None] * freqs[None]
        parts += [np.sin(arg), np.cos(arg)]
    pos = np.concatenate(parts, axis=1).astype(np.float32)  # (T, C)
    for a in (weight, bias, pos):
        a.flags.writeable = False
    return weight, bias, pos


def encode_cond(images: Array) -> Array:
    """Images (..., 64, 64) in [0, 1] -> tokens (..., 64, 64) float32: the frozen patch encoder.

    Each 8×8 patch (row-major over the 8×8 patch grid) is flattened, centred, projected by a
    fixed random matrix (seed ENCODER_SEED), offset by a fixed 2-D position code, passed through
    tanh, and layer-normalised over the channel axis without affine parameters (TRELLIS applies
    the same parameter-free layer norm to DINOv2's tokens).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"encode_cond expects (..., {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {images.shape}")
    lead = images.shape[:-2]
    g = IMAGE_SIZE // PATCH
    patches = images.reshape(*lead, g, PATCH, g, PATCH)
    patches = np.moveaxis(patches, -3, -2).reshape(*lead, g * g, PATCH * PATCH)
    weight, bias, pos = _encoder_weights()
    h = np.tanh((patches - 0.5) @ weight + bias + pos)
    mean = h.mean(axis=-1, keepdims=True)
    var = h.var(axis=-1, keepdims=True)
    return ((h - mean) / np.sqrt(var + 1e-5)).astype(np.float32)


# -- assets --------------------------------------------------------------------------------------
@dataclass
class Asset:
    asset_id: str
    occupancy: Array  # (32, 32, 32) bool
    ss_latent: Array  # (8, 16, 16, 16) float32, ±1
    slat_coords: Array  # (L, 3) int16 in [0, 32)
    slat_feats: Array  # (L, 8) float32
    image: Array  # (64, 64) float32
    cond: Array  # (64, 64) float32
    families: tuple[str, ...]


def asset_id(seed: int, index: int) -> str:
    return f"synthetic-s{seed}-{index:08d}"


def make_shape(seed: int, index: int) -> tuple[list[Primitive], Array, Array]:
    """The primitives, occupancy and stripe parameters of asset `index` of corpus `seed`."""
    if index < 0:
        raise ValueError(f"asset index must be >= 0, got {index}")
    rng = np.random.default_rng([GENERATOR_VERSION, int(seed), int(index)])
    for _ in range(64):
        prims = random_shape(rng)
        occ = voxelize(prims)
        if occ.sum() >= _MIN_VOXELS:
            stripes = np.concatenate([rng.normal(0.0, 8.0, 3), rng.uniform(0, 2 * math.pi, 1)])
            return prims, occ, stripes.astype(np.float32)
    raise RuntimeError(f"asset {asset_id(seed, index)}: no shape with >= {_MIN_VOXELS} voxels in 64 draws")


def make_asset(seed: int, index: int, *, with_cond: bool = True) -> Asset:
    """Asset `index` of the synthetic corpus with seed `seed` (pure function of both)."""
    prims, occ, stripes = make_shape(seed, index)
    coords = surface_voxels(occ)
    feats = slat_features(prims, coords, stripes)
    image = render_view(occ)
    cond = encode_cond(image) if with_cond else np.zeros(COND_SHAPE, np.float32)
    return Asset(
        asset_id=asset_id(seed, index),
        occupancy=occ,
        ss_latent=encode_ss(occ),
        slat_coords=coords.astype(np.int16),
        slat_feats=feats,
        image=image,
        cond=cond,
        families=tuple(p.family for p in prims),
    )


def make_assets(seed: int, start: int, stop: int,
                progress: Optional[Callable[[int], None]] = None) -> list[Asset]:
    """Assets start..stop-1; the cond encoder runs once over the whole batch of images."""
    assets = [make_asset(seed, i, with_cond=False) for i in range(start, stop)]
    if assets:
        tokens = encode_cond(np.stack([a.image for a in assets]))
        for a, t in zip(assets, tokens):
            a.cond = t
    if progress is not None:
        progress(len(assets))
    return assets


def voxels_to_coords(occ: Union[Array, Any]) -> Array:
    """(L, 3) int coordinates of the occupied cells of one (32, 32, 32) grid."""
    return np.argwhere(np.asarray(occ))
