"""The render grid of `mdt-ray eval`: one row per sampler, one column per held-out asset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# Two views per rendered shape: the conditioning camera (what the model saw) and the opposite
# side (what it had to infer).
RENDER_VIEWS: tuple[tuple[float, float], ...] = ((45.0, 30.0), (225.0, 30.0))
RENDER_CELL = 64
_LABEL_W, _HEADER_H, _GAP = 132, 14, 4


def grid_size(n_rows: int, n_cols: int, *, cell: int = RENDER_CELL, views: int = len(RENDER_VIEWS)) -> tuple[int, int]:
    """(width, height) in pixels of the `render_grid` image."""
    return (_LABEL_W + n_cols * (views * cell + _GAP), _HEADER_H + n_rows * (cell + _GAP))


def _check_rows(rows: Sequence[tuple[str, np.ndarray]]) -> int:
    if not rows:
        raise ValueError("render_grid needs at least one row")
    n_cols = rows[0][1].shape[0]
    for label, occ in rows:
        if occ.shape[0] != n_cols or occ.dtype != np.bool_:
            raise ValueError(f"render_grid row {label!r}: expected ({n_cols}, 32, 32, 32) bool occupancy, "
                             f"got {occ.shape} {occ.dtype}")
    return n_cols


def render_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, *, cell: int = RENDER_CELL,
                views: Sequence[tuple[float, float]] = RENDER_VIEWS, column_labels: Optional[Sequence[str]] = None
                ) -> Path:
    """Write a PNG: one row per (label, occupancy (N, 32, 32, 32)), one column per asset, each
    cell the shape rendered from every view in `views`, side by side."""
    from PIL import Image, ImageDraw

    from mdt_ray.data.synthetic import render_view

    n_cols = _check_rows(rows)
    width, height = grid_size(len(rows), n_cols, cell=cell, views=len(views))
    canvas = np.full((height, width), 40, dtype=np.uint8)  # dark grey separates black backgrounds
    for r, (_, occ) in enumerate(rows):
        top = _HEADER_H + r * (cell + _GAP)
        for v, (az, el) in enumerate(views):
            imgs = render_view(occ, size=cell, azimuth=az, elevation=el)
            for c in range(n_cols):
                left = _LABEL_W + c * (len(views) * cell + _GAP) + v * cell
                canvas[top : top + cell, left : left + cell] = np.clip(imgs[c] * 255.0, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    for r, (label, _) in enumerate(rows):
        draw.text((4, _HEADER_H + r * (cell + _GAP) + cell // 2 - 6), label, fill=(255, 255, 255))
    for c in range(n_cols):
        text = column_labels[c] if column_labels is not None else f"#{c}"
        draw.text((_LABEL_W + c * (len(views) * cell + _GAP) + 2, 1), text, fill=(200, 200, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
