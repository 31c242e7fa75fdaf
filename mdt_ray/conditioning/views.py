"""Condition views: TRELLIS's crop of a rendered RGBA view, and the compressed bytes a corpus stores.

TRELLIS's image-conditioned datasets (trellis/datasets/components.py, ImageConditionedMixin) turn
a `renders_cond` frame into the DINOv2 input in four steps, reproduced exactly here:

1. the bounding box of the pixels whose alpha is > 0 (inclusive min and max, in pixels);
2. a square around its centre with half-size 1.2 × half the longer side, its corners truncated
   toward zero by `int()`; PIL's crop fills whatever lies outside the image with transparent black;
3. a Lanczos resize of the RGBA crop to 518 × 518 (PIL resamples RGBA premultiplied);
4. RGB / 255 multiplied by alpha / 255: the object over black.

The crop is deterministic, so an import applies it once and stores the result, (518, 518, 3)
uint8, compressed as one of FORMATS.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch

IMAGE_SIZE = 518
CROP_RATIO = 1.2  # TRELLIS's aug_size_ratio
# name: (PIL format, save options, lossless)
FORMATS = {
    "png": ("PNG", {"compress_level": 6}, True),
    # Lossless effort: method 1 / quality 20 encodes ~9× faster than 4 / 80 for 2% more bytes.
    "webp-lossless": ("WEBP", {"lossless": True, "quality": 20, "method": 1}, True),
    "webp": ("WEBP", {"method": 4}, False),
    "jpeg": ("JPEG", {"subsampling": 0}, False),
}
DEFAULT_QUALITY = 95
_ALPHA_MODES = ("RGBA", "LA", "RGBa", "La", "PA")


class ViewError(ValueError):
    """A condition view that cannot be used (no alpha, nothing visible, unreadable bytes)."""


def has_alpha(image) -> bool:
    """Whether a PIL image carries an alpha channel (or a palette transparency)."""
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def crop_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """TRELLIS's square crop (left, top, right, bottom) around the visible pixels of `alpha`."""
    rows, cols = np.nonzero(alpha > 0)
    if rows.size == 0:
        raise ViewError("the alpha channel is empty: no pixel has alpha > 0")
    left, top, right, bottom = cols.min(), rows.min(), cols.max(), rows.max()
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half = max(right - left, bottom - top) / 2 * CROP_RATIO
    return int(cx - half), int(cy - half), int(cx + half), int(cy + half)


def preprocess_view(image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A PIL RGBA view as TRELLIS renders it -> float32 (3, size, size) in [0, 1], alpha-premultiplied."""
    return torch.from_numpy(_premultiplied(image, size)).permute(2, 0, 1).contiguous()


def _premultiplied(image, size: int) -> np.ndarray:
    from PIL import Image

    if not has_alpha(image):
        raise ViewError(f"the image has mode {image.mode}, without an alpha channel")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    box = crop_box(np.asarray(rgba.getchannel("A")))
    resized = np.asarray(rgba.crop(box).resize((size, size), Image.Resampling.LANCZOS))
    rgb = resized[..., :3].astype(np.float32) / 255.0
    alpha = resized[..., 3:].astype(np.float32) / 255.0
    return rgb * alpha


def view_pixels(image, size: int = IMAGE_SIZE) -> np.ndarray:
    """preprocess_view as the (size, size, 3) uint8 a corpus stores (rounded to the nearest level)."""
    return np.clip(np.rint(_premultiplied(image, size) * 255.0), 0, 255).astype(np.uint8)


def encode_view(pixels: np.ndarray, fmt: str = "webp", quality: int = DEFAULT_QUALITY) -> bytes:
    """(H, W, 3) uint8 -> compressed bytes in format `fmt` (FORMATS; `quality` for the lossy ones)."""
    from PIL import Image

    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; known: {sorted(FORMATS)}")
    kind, options, lossless = FORMATS[fmt]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(
        buf, kind, **options, **({} if lossless else {"quality": int(quality)}))
    return buf.getvalue()


def decode_view(data: bytes, size: Optional[int] = None) -> np.ndarray:
    """Compressed bytes -> (H, W, 3) uint8; `size` checks the side length."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several kinds for damaged bytes
        raise ViewError(f"the stored view does not decode ({type(e).__name__}: {e})") from None
    if size is not None and pixels.shape[:2] != (size, size):
        raise ViewError(f"the stored view is {pixels.shape[1]}×{pixels.shape[0]}, the manifest says {size}×{size}")
    return pixels
