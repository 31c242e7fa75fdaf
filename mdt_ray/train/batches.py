"""From a corpus batch to the objective's inputs, and its split into micro-batches.

Stage 1 batches are dense tensors and split by rows. Stage 2 batches are sparse: a variable
number of voxels per asset, so the split balances voxel counts across micro-batches (TRELLIS's
greedy longest-first), which is what bounds a micro-batch's memory.
"""

from __future__ import annotations

from typing import Any

import torch


def balanced_groups(counts: list[int], n: int) -> list[list[int]]:
    """Asset indices in `n` groups of near-equal total voxel count (longest first, into the
    lightest group); each group keeps its assets in their original order."""
    if n > len(counts):
        raise ValueError(f"cannot split {len(counts)} assets into {n} micro-batches")
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        g = min(range(n), key=lambda g: (load[g], len(groups[g])))
        groups[g].append(i)
        load[g] += counts[i]
    return [sorted(g) for g in groups]


def micro_batches(batch: dict[str, Any], n: int, stage: str) -> list[tuple[Any, torch.Tensor]]:
    """[(x0, cond)] × n: x0 a dense tensor (stage "ss") or a SparseBatch (stage "slat")."""
    if stage == "ss":
        x0, cond = batch["x0"], batch["cond"]
        size = x0.shape[0] // n
        return [(x0[i * size : (i + 1) * size], cond[i * size : (i + 1) * size]) for i in range(n)]
    from mdt_ray.models.sparse import SparseBatch

    counts = [int(c) for c in batch["counts"]]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    coords, feats, cond = batch["coords"][:, 1:], batch["feats"], batch["cond"]
    out = []
    for group in balanced_groups(counts, n):
        x = SparseBatch.from_list([coords[starts[i] : starts[i + 1]] for i in group],
                                  [feats[starts[i] : starts[i + 1]] for i in group])
        out.append((x, cond[group]))
    return out
