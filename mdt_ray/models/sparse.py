"""Sparse voxel batches for the stage-2 (SLAT) model and the sparse ops TRELLIS runs on them.

A `SparseBatch` is TRELLIS's `SparseTensor` without spconv: `coords` (N, 4) int32 rows
[batch, x, y, z] grouped by batch index in ascending order, and `feats` (N, C). Samples may hold
different voxel counts. Everything computed from one coords table (per-sample slices, the
batch index per row, neighbour maps of the 3³ convolution) lives in a shared `_Layout`, so the
batches derived from it (`replace`, arithmetic, the model's output) reuse that work.

The ops are plain PyTorch: a submanifold 3³ convolution by hashed-coordinate neighbour lookup,
TRELLIS's 2× average-pool downsample and its nearest upsample, and per-sample ("varlen")
attention.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdt_ray.models.modules import attention

Tensor = torch.Tensor


class _Layout:
    """Per-coords bookkeeping, shared by every batch on the same coords."""

    __slots__ = ("batch_size", "counts", "offsets", "batch_index", "cache", "parts", "_counts_t")

    def __init__(self, batch_size: int, counts: list[int], batch_index: Tensor,
                 parts: Optional[tuple[tuple[Tensor, "_Layout"], ...]] = None):
        self.batch_size = batch_size
        self.counts = counts
        self.offsets = [0, *itertools.accumulate(counts)]
        self.batch_index = batch_index  # (N,) int64
        # Neighbour maps and the pooling map back to the finer level; keyed by op.
        self.cache: dict[str, Any] = {}
        # (coords, layout) of the batches `SparseBatch.cat` joined, so that `split` of a model
        # output hands back batches on the very same layouts (cheap identity checks downstream).
        self.parts = parts
        self._counts_t: Optional[Tensor] = None

    @property
    def slices(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def counts_tensor(self) -> Tensor:
        if self._counts_t is None:
            self._counts_t = torch.tensor(self.counts, dtype=torch.long, device=self.batch_index.device)
        return self._counts_t

    def to(self, device: torch.device) -> "_Layout":
        return _Layout(self.batch_size, self.counts, self.batch_index.to(device))


def _layout_from_batch_column(batch: Tensor, batch_size: int) -> _Layout:
    b = batch.long()
    return _Layout(batch_size, torch.bincount(b, minlength=batch_size).tolist(), b)


class SparseBatch:
    """A batch of sparse voxel sets: `coords` (N, 4) int32 [batch, x, y, z], `feats` (N, C).

    Rows must be grouped by batch index in ascending order (`from_list` and `cat` build them
    so); the order within a sample is free and every op keeps it. `batch_size` defaults to
    max batch index + 1; pass it to allow trailing empty samples.
    """

    __slots__ = ("coords", "feats", "_layout")

    def __init__(self, coords: Tensor, feats: Tensor, batch_size: Optional[int] = None):
        if not isinstance(coords, Tensor) or coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be an (N, 4) tensor [batch, x, y, z], got "
                             f"{tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__}")
        if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
            raise TypeError(f"coords must be integers, got {coords.dtype}")
        if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats must be (N={coords.shape[0]}, C), got "
                             f"{tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__}")
        if coords.device != feats.device:
            raise ValueError(f"coords on {coords.device} but feats on {feats.device}")
        coords = coords.to(torch.int32)
        n = coords.shape[0]
        if n:
            if int(coords.min()) < 0:
                raise ValueError("coords must be non-negative (batch index and voxel indices)")
            if n > 1 and bool((coords[1:, 0] < coords[:-1, 0]).any()):
                raise ValueError("coords rows must be grouped by batch index in ascending order "
                                 "(sort by coords[:, 0] with a stable sort, or use SparseBatch.from_list)")
        inferred = int(coords[-1, 0]) + 1 if n else 0
        if batch_size is None:
            batch_size = inferred
        elif batch_size < inferred:
            raise ValueError(f"batch_size {batch_size} but coords hold batch index {inferred - 1}")
        self.coords = coords
        self.feats = feats
        self._layout = _layout_from_batch_column(coords[:, 0], batch_size)

    @classmethod
    def _make(cls, coords: Tensor, feats: Tensor, layout: _Layout) -> "SparseBatch":
        # Trusted path (no validation, no device sync): coords and layout come from a checked batch.
        out = object.__new__(cls)
        out.coords, out.feats, out._layout = coords, feats, layout
        return out

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_list(cls, coords_list: Sequence[Tensor], feats_list: Sequence[Tensor]) -> "SparseBatch":
        """One sample per asset: coords (L_i, 3) voxel indices (any integer dtype, e.g. the uint8
        of TRELLIS's latent files) and feats (L_i, C)."""
        if len(coords_list) != len(feats_list):
            raise ValueError(f"{len(coords_list)} coords tensors but {len(feats_list)} feats tensors")
        if not coords_list:
            raise ValueError("from_list needs at least one sample")
        rows = []
        for i, (c, f) in enumerate(zip(coords_list, feats_list)):
            if c.dim() != 2 or c.shape[1] != 3:
                raise ValueError(f"sample {i}: coords must be (L, 3), got {tuple(c.shape)}")
            if f.dim() != 2 or f.shape[0] != c.shape[0]:
                raise ValueError(f"sample {i}: feats must be (L={c.shape[0]}, C), got {tuple(f.shape)}")
            c = c.to(device=f.device, dtype=torch.int32)
            rows.append(torch.cat([torch.full_like(c[:, :1], i), c], dim=1))
        return cls(torch.cat(rows), torch.cat(list(feats_list)), batch_size=len(coords_list))

    def to_list(self) -> list[tuple[Tensor, Tensor]]:
        """Per sample (coords (L_i, 3), feats (L_i, C)), views into this batch."""
        return [(self.coords[s, 1:], self.feats[s]) for s in self._layout.slices]

    def replace(self, feats: Tensor) -> "SparseBatch":
        """New features on the same coordinates, row for row."""
        if feats.dim() < 1 or feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"replacement feats must have {self.coords.shape[0]} rows, got {tuple(feats.shape)}")
        return SparseBatch._make(self.coords, feats, self._layout)

    def randn_like(self, generator: Optional[torch.Generator] = None) -> "SparseBatch":
        """Gaussian noise on the same coordinates."""
        f = self.feats
        return self.replace(torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype))

    @classmethod
    def cat(cls, batches: Sequence["SparseBatch"]) -> "SparseBatch":
        """Join along the batch dimension; sample j of batch i becomes sample (Σ_{<i} B) + j."""
        batches = list(batches)
        if not batches or not all(isinstance(b, SparseBatch) for b in batches):
            raise TypeError("SparseBatch.cat needs a non-empty sequence of SparseBatch")
        if len(batches) == 1:
            return batches[0]
        tail = batches[0].feats.shape[1:]
        for i, b in enumerate(batches):
            if b.feats.shape[1:] != tail:
                raise ValueError(f"cannot cat: batch {i} has feats {tuple(b.feats.shape)}, batch 0 has (N, {tuple(tail)})")
        coords, index, counts, offset = [], [], [], 0
        for b in batches:
            c = b.coords
            coords.append(torch.cat([c[:, :1] + offset, c[:, 1:]], dim=1) if offset else c)
            index.append(b._layout.batch_index + offset if offset else b._layout.batch_index)
            counts.extend(b._layout.counts)
            offset += b.batch_size
        layout = _Layout(offset, counts, torch.cat(index), parts=tuple((b.coords, b._layout) for b in batches))
        return cls._make(torch.cat(coords), torch.cat([b.feats for b in batches]), layout)

    def split(self, n: int) -> list["SparseBatch"]:
        """Inverse of `cat` of `n` batches of equal batch size."""
        lay = self._layout
        if n < 1 or lay.batch_size % n:
            raise ValueError(f"cannot split a batch of {lay.batch_size} samples into {n} equal parts")
        m = lay.batch_size // n
        out = []
        reuse = lay.parts is not None and len(lay.parts) == n and all(p[1].batch_size == m for p in lay.parts)
        for k in range(n):
            rows = slice(lay.offsets[k * m], lay.offsets[(k + 1) * m])
            feats = self.feats[rows]
            if reuse:
                coords, part = lay.parts[k]
            else:
                c = self.coords[rows]
                coords = torch.cat([c[:, :1] - k * m, c[:, 1:]], dim=1) if k else c
                part = _Layout(m, lay.counts[k * m:(k + 1) * m], lay.batch_index[rows] - k * m)
            out.append(SparseBatch._make(coords, feats, part))
        return out

    # ------------------------------------------------------------------ info

    @property
    def batch_size(self) -> int:
        return self._layout.batch_size

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def counts(self) -> list[int]:
        """Voxels per sample."""
        return list(self._layout.counts)

    @property
    def layout(self) -> list[slice]:
        """Row slice of each sample."""
        return self._layout.slices

    @property
    def batch_index(self) -> Tensor:
        """(N,) int64 sample index of each row."""
        return self._layout.batch_index

    @property
    def shape(self) -> torch.Size:
        """(batch_size, C), TRELLIS's `SparseTensor.shape`; the feature table is `feats.shape`."""
        return torch.Size((self.batch_size, *self.feats.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def __repr__(self) -> str:
        return (f"SparseBatch(batch_size={self.batch_size}, voxels={self.counts}, "
                f"feats={tuple(self.feats.shape)}, dtype={self.dtype}, device={self.device})")

    # ------------------------------------------------------------------ per-sample reductions

    def per_voxel(self, values: Tensor) -> Tensor:
        """(B, ...) per-sample values gathered to (N, ...) rows, dtype unchanged."""
        if values.shape[0] != self.batch_size:
            raise ValueError(f"per-sample values need {self.batch_size} rows, got {tuple(values.shape)}")
        return values.index_select(0, self._layout.batch_index)

    def map_samples(self, fn: Callable[..., Tensor], feats: Tensor, *per_sample: Tensor) -> Tensor:
        """`fn(rows_i, *values_i)` for each sample i, concatenated back into (N, ...) rows.

        Broadcasts per-sample (B, ...) values (adaLN scales, gates) against each sample's rows
        without gathering them to (N, ...) first: at TRELLIS-L width that gather would be the
        largest activation autograd keeps per transformer block.
        """
        if len(self._layout.counts) == 1:
            return fn(feats, *(v[0] for v in per_sample))
        # split (not slicing) so that the backward is one concatenation, not B zero-filled tensors
        rows = feats.split(self._layout.counts)
        return torch.cat([fn(r, *(v[i] for v in per_sample)) for i, r in enumerate(rows)])

    def expand_per_sample(self, t: Tensor) -> Tensor:
        """(B,) → (N, 1), (B, K) → (N, K), in the feature dtype: broadcasts against `feats`."""
        v = self.per_voxel(t.reshape(-1, 1) if t.dim() == 1 else t)
        return v.to(self.feats.dtype) if v.is_floating_point() else v

    def _segment_sum(self, rows: Tensor) -> Tensor:
        return rows.new_zeros(self.batch_size).index_add_(0, self._layout.batch_index, rows)

    def per_sample_norm(self) -> Tensor:
        """(B,) L2 norm over each sample's voxels × channels; fp32 accumulation for half dtypes."""
        f = _wide(self.feats)
        return self._segment_sum(f.pow(2).sum(dim=1)).sqrt()

    def per_sample_mean(self) -> Tensor:
        """(B,) mean over each sample's voxels × channels (0 for an empty sample)."""
        f = _wide(self.feats)
        n = (self._layout.counts_tensor() * f.shape[1]).clamp(min=1)
        return self._segment_sum(f.sum(dim=1)) / n

    # ------------------------------------------------------------------ dtype / device

    def to(self, *args, **kwargs) -> "SparseBatch":
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        return SparseBatch._make(self.coords.to(feats.device), feats, self._layout.to(feats.device))

    def float(self) -> "SparseBatch":
        return self.replace(self.feats.float())

    def half(self) -> "SparseBatch":
        return self.replace(self.feats.half())

    def detach(self) -> "SparseBatch":
        return self.replace(self.feats.detach())

    def clone(self) -> "SparseBatch":
        return self.replace(self.feats.clone())

    # ------------------------------------------------------------------ arithmetic

    def same_coords(self, other: "SparseBatch") -> bool:
        if other._layout is self._layout or other.coords is self.coords:
            return True
        return (other.coords.shape == self.coords.shape and other.batch_size == self.batch_size
                and other.coords.device == self.coords.device and torch.equal(other.coords, self.coords))

    def _operand(self, other: Any, op: str) -> Any:
        if isinstance(other, SparseBatch):
            if not self.same_coords(other):
                raise ValueError(f"cannot {op} sparse batches on different coordinates "
                                 f"({self.num_voxels} voxels in {self.counts} vs {other.num_voxels} in {other.counts})")
            return other.feats
        if isinstance(other, Tensor) and other.dim() > 0:
            try:
                shape = torch.broadcast_shapes(other.shape, self.feats.shape)
            except RuntimeError:
                shape = None
            if shape != self.feats.shape:
                raise ValueError(f"cannot {op} a tensor of shape {tuple(other.shape)} with sparse feats "
                                 f"{tuple(self.feats.shape)}; per-sample values go through expand_per_sample")
            return other
        if isinstance(other, (int, float, bool, Tensor)):
            return other
        return NotImplemented

    def _binary(self, other: Any, op: str, fn: Callable[[Tensor, Any], Tensor]) -> "SparseBatch":
        o = self._operand(other, op)
        if o is NotImplemented:
            return NotImplemented
        return self.replace(fn(self.feats, o))

    def __add__(self, other):
        return self._binary(other, "add", lambda a, b: a + b)

    def __radd__(self, other):
        return self._binary(other, "add", lambda a, b: b + a)

    def __sub__(self, other):
        return self._binary(other, "subtract", lambda a, b: a - b)

    def __rsub__(self, other):
        return self._binary(other, "subtract", lambda a, b: b - a)

    def __mul__(self, other):
        return self._binary(other, "multiply", lambda a, b: a * b)

    def __rmul__(self, other):
        return self._binary(other, "multiply", lambda a, b: b * a)

    def __truediv__(self, other):
        return self._binary(other, "divide", lambda a, b: a / b)

    def __rtruediv__(self, other):
        return self._binary(other, "divide", lambda a, b: b / a)

    def __neg__(self):
        return self.replace(-self.feats)

    def __pow__(self, exponent):
        return self._binary(exponent, "raise", lambda a, b: a ** b)


def _wide(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------------------------------------
# Submanifold 3×3×3 convolution

# Slot (i, j, k) of a (out, 3, 3, 3, in) spconv weight reads the neighbour at
# (x + i − 1, y + j − 1, z + k − 1): spconv's SubMConv3d is a cross-correlation like
# torch's conv3d, with the three kernel axes in the coords' column order. The golden TRELLIS
# fixture (tests/test_models_slat.py) fails for the mirrored convention.
_OFFSETS = [(i - 1, j - 1, k - 1) for i in range(3) for j in range(3) for k in range(3)]
_CENTRE = 13


def _keys(coords: Tensor, span: int) -> Tensor:
    """Row-major int64 code of [batch, x, y, z] with spatial coords in [0, span)."""
    b, x, y, z = coords.unbind(dim=1)
    return ((b * span + x) * span + y) * span + z


def neighbour_pairs(x: SparseBatch) -> list[tuple[Tensor, Tensor]]:
    """For each of the 27 kernel slots, (out_rows, in_rows): voxel in_rows[i] is the slot's
    neighbour of voxel out_rows[i]. Computed once per coords table and cached on its layout."""
    cached = x._layout.cache.get("subm3")
    if cached is not None:
        return cached
    c = x.coords.long()
    n = c.shape[0]
    # Shift by one so that every neighbour coordinate stays in [0, span): codes never alias.
    c = torch.cat([c[:, :1], c[:, 1:] + 1], dim=1)
    span = int(c[:, 1:].max()) + 2 if n else 1
    sorted_keys, order = _keys(c, span).sort()
    rows = torch.arange(n, device=c.device)
    pairs = []
    for d in _OFFSETS:
        if d == (0, 0, 0):
            pairs.append((rows, rows))
            continue
        step = torch.tensor((0, *d), device=c.device)
        q = _keys(c + step, span)
        pos = torch.searchsorted(sorted_keys, q).clamp_(max=max(n - 1, 0))
        hit = sorted_keys[pos] == q
        out_rows = rows[hit]
        pairs.append((out_rows, order[pos[hit]]))
    x._layout.cache["subm3"] = pairs
    return pairs


class _ConvMap:
    """The 3³ neighbour structure in the form the convolution consumes, built once per coords.

    Products table layout: rows [0, N) hold each voxel's centre-slot product (+ bias), then for
    each slot s ≠ centre its pairs' products from row N + `offsets[s]`, in the order of
    `in_rows[s]` / `out_rows[s]` (out rows ascending); one last zero row. `table` (27, N): the
    row of voxel i's slot-s product, or the zero row where that neighbour is inactive.
    `sum_matrix(dtype)`: the same as a CSR (N, rows) 0/1 matrix, each row's entries centre
    first, then slots in order.
    """

    __slots__ = ("n", "in_rows", "out_rows", "offsets", "rows", "table", "_csr")

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], n: int, device: torch.device):
        self.n = n
        self.out_rows = [o for o, _ in pairs]
        self.in_rows = [i for _, i in pairs]
        sizes = [0 if s == _CENTRE else o.numel() for s, o in enumerate(self.out_rows)]
        self.offsets = [0, *itertools.accumulate(sizes)]
        self.rows = n + self.offsets[-1] + 1
        self.table = torch.full((27, n), self.rows - 1, dtype=torch.long, device=device)
        self.table[_CENTRE] = torch.arange(n, device=device)
        for s, o in enumerate(self.out_rows):
            if s != _CENTRE:
                self.table[s, o] = torch.arange(n + self.offsets[s], n + self.offsets[s + 1], device=device)
        self._csr: dict[torch.dtype, Tensor] = {}

    def sum_matrix(self, dtype: torch.dtype) -> Tensor:
        m = self._csr.get(dtype)
        if m is None:
            by_row = self.table.t()
            hit = by_row < self.rows - 1
            crow = torch.zeros(self.n + 1, dtype=torch.long, device=by_row.device)
            crow[1:] = hit.sum(dim=1).cumsum(0)
            col = by_row[hit]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                m = torch.sparse_csr_tensor(crow, col, torch.ones(col.numel(), dtype=dtype, device=col.device),
                                            size=(self.n, self.rows), check_invariants=False)
            self._csr[dtype] = m
        return m


def neighbour_table(x: SparseBatch) -> _ConvMap:
    """The cached `_ConvMap` of `x`'s coordinates."""
    cached = x._layout.cache.get("subm3_map")
    if cached is None:
        cached = _ConvMap(neighbour_pairs(x), x.num_voxels, x.coords.device)
        x._layout.cache["subm3_map"] = cached
    return cached


def _csr_sums(t: Tensor) -> bool:
    # MKL's CSR × dense on CPU has no fp16/bf16 kernel. Half precision (the bf16 autocast of
    # GPU training) takes the gather sums everywhere, so no cuSPARSE path is in use untested.
    return t.dtype in (torch.float32, torch.float64)


def _gather_conv(feats: Tensor, slots: Tensor, cmap: _ConvMap, bias: Optional[Tensor]) -> Tensor:
    """Σ_s slot-s neighbour features · slots[s]ᵀ (+ bias), slots (27, out, in).

    One GEMM per slot over the pairs that exist (no wasted products on a thin surface, where a
    voxel has ~7 of 26 neighbours), written into one products table; each output row then sums
    its own products, centre (+ bias) first and the slots in order, by one CSR × dense product
    (or, where that has no kernel, by gathers through `cmap.table`). No scatter anywhere:
    deterministic at any thread count.
    """
    n = cmap.n
    products = feats.new_empty(cmap.rows, slots.shape[1])
    products[-1].zero_()
    if bias is None:
        torch.mm(feats, slots[_CENTRE].t(), out=products[:n])
    else:
        torch.addmm(bias, feats, slots[_CENTRE].t(), out=products[:n])
    for s in range(27):
        a, b = n + cmap.offsets[s], n + cmap.offsets[s + 1]
        if b > a:
            torch.mm(feats.index_select(0, cmap.in_rows[s]), slots[s].t(), out=products[a:b])
    if _csr_sums(products):
        return cmap.sum_matrix(products.dtype) @ products
    out = products[:n].clone()
    for s in range(27):
        if s != _CENTRE and cmap.offsets[s + 1] > cmap.offsets[s]:
            out += products.index_select(0, cmap.table[s])
    return out


class _SubMConv(torch.autograd.Function):
    """The convolution with gather-only backward and forward-mode rules.

    Autograd's own backward of the gathers would be scatter-adds (`index_add`), which on a
    contended 2-core CPU ran many times slower with 2 threads than with 1 (docs/performance.md),
    and it would keep every slot's gathered input alive. The submanifold neighbour relation is
    symmetric (slot s of voxel i is voxel j ⇔ slot 26 − s of voxel j is voxel i), so the input
    gradient is the same gather-GEMM with the mirrored, transposed kernel; the weight gradient
    regathers both sides of each slot's pairs.
    """

    @staticmethod
    def forward(feats, slots, bias, cmap):
        return _gather_conv(feats, slots, cmap, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats, slots, bias, cmap = inputs
        ctx.save_for_backward(feats, slots)
        ctx.save_for_forward(feats, slots)
        ctx.cmap = cmap
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        feats, slots = ctx.saved_tensors
        cmap = ctx.cmap
        grad_feats = grad_slots = grad_bias = None
        if ctx.needs_input_grad[0]:
            mirrored = slots.flip(0).transpose(1, 2).contiguous()
            grad_feats = _SubMConv.apply(grad, mirrored, None, cmap)
        if ctx.needs_input_grad[1]:
            grad_slots = slots.new_zeros(slots.shape)
            for s in range(27):
                if s == _CENTRE:
                    torch.mm(grad.t(), feats, out=grad_slots[s])
                elif cmap.in_rows[s].numel():
                    torch.mm(grad.index_select(0, cmap.out_rows[s]).t(), feats.index_select(0, cmap.in_rows[s]),
                             out=grad_slots[s])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)
        return grad_feats, grad_slots, grad_bias, None

    @staticmethod
    def jvp(ctx, feats_t, slots_t, bias_t, _cmap_t):
        feats, slots = ctx.saved_tensors
        # Bilinear in (feats, slots), affine in bias.
        out = None
        if feats_t is not None:
            out = _SubMConv.apply(feats_t, slots, None, ctx.cmap)
        if slots_t is not None:
            part = _SubMConv.apply(feats, slots_t, None, ctx.cmap)
            out = part if out is None else out + part
        if bias_t is not None:
            out = bias_t.expand(feats.shape[0], -1) if out is None else out + bias_t
        if out is None:
            out = feats.new_zeros(feats.shape[0], slots.shape[1])
        return out


def submanifold_conv3d(x: SparseBatch, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """3³ submanifold convolution (output sites = input sites), weight (out, 3, 3, 3, in) →
    feats (N, out). One GEMM per kernel slot over its pairs, summed per output row by
    gathers through the cached neighbour table; forward and backward are free of scatters and
    atomics (bit-identical at any CPU thread count, checked; fp32 on CUDA would use cuSPARSE's
    CSR product, whose repeatability is not yet checked)."""
    if weight.dim() != 5 or weight.shape[1:4] != (3, 3, 3):
        raise ValueError(f"weight must be (out, 3, 3, 3, in), got {tuple(weight.shape)}")
    if x.feats.shape[1] != weight.shape[4]:
        raise ValueError(f"conv expects {weight.shape[4]} input channels, feats have {x.feats.shape[1]}")
    cmap = neighbour_table(x)
    f = x.feats
    device_type = f.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom Function is opaque to autocast: cast here as F.linear would have.
        dtype = torch.get_autocast_dtype(device_type)
        f, weight = f.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    # (27, out, in), slot = 9i + 3j + k; contiguous so that each slot is a plain row-major GEMM operand
    slots = weight.flatten(1, 3).transpose(0, 1).contiguous()
    with torch.autocast(device_type, enabled=False):
        return _SubMConv.apply(f, slots, bias, cmap)


class SubMConv3d(nn.Module):
    """The weights of a 3³ submanifold convolution in spconv's KRSC layout (out, 3, 3, 3, in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size != 3:
            raise ValueError(f"only 3³ submanifold convolutions are implemented, got kernel_size={kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's Conv3d default, fan-in = 27·in.
        fan_in = 27 * self.in_channels
        bound = 1 / fan_in**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseBatch) -> Tensor:
        return submanifold_conv3d(x, self.weight, self.bias)


class SparseConv3d(nn.Module):
    """TRELLIS's wrapper around spconv's module: the checkpoint keys are `<name>.conv.weight`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = SubMConv3d(in_channels, out_channels, kernel_size)

    def forward(self, x: SparseBatch) -> SparseBatch:
        return x.replace(self.conv(x))


# ---------------------------------------------------------------------------------------------
# 2× down / up sampling


def sparse_downsample(x: SparseBatch, factor: int = 2) -> SparseBatch:
    """TRELLIS's `SparseDownsample`: voxels merge into cell coords // factor.

    TRELLIS pools with `scatter_reduce(zeros, reduce="mean")`, whose default `include_self=True`
    counts the zero it starts from: a cell holding n voxels gets sum / (n + 1). Reproduced as is
    (the released weights were trained with it; the golden fixture checks it). The result
    remembers the mapping, which `sparse_upsample` uses to go back.
    """
    c = x.coords.long()
    coarse = torch.cat([c[:, :1], c[:, 1:] // factor], dim=1)
    span = int(coarse[:, 1:].max()) + 1 if c.shape[0] else 1
    # Sorted unique codes keep the batch index as the most significant digit: rows stay grouped.
    codes, inverse = torch.unique(_keys(coarse, span), return_inverse=True)
    m = codes.shape[0]
    f = x.feats
    sums = f.new_zeros(m, f.shape[1]).index_add(0, inverse, f)
    counts = torch.bincount(inverse, minlength=m)
    feats = sums / (counts + 1).to(sums.dtype).unsqueeze(1)
    xyz = [codes // span**2 % span, codes // span % span, codes % span]
    batch = codes // span**3
    new_coords = torch.stack([batch, *xyz], dim=1).to(torch.int32)
    layout = _layout_from_batch_column(batch, x.batch_size)
    layout.cache["upsample"] = (factor, x.coords, x._layout, inverse)
    return SparseBatch._make(new_coords, feats, layout)


def sparse_upsample(x: SparseBatch, factor: int = 2) -> SparseBatch:
    """Nearest upsampling back to the voxels a `sparse_downsample` merged, in their order."""
    entry = x._layout.cache.get("upsample")
    if entry is None or entry[0] != factor:
        raise ValueError(f"sparse_upsample(factor={factor}) needs a batch produced by sparse_downsample(factor={factor})")
    _, fine_coords, fine_layout, inverse = entry
    return SparseBatch._make(fine_coords, x.feats.index_select(0, inverse), fine_layout)


# ---------------------------------------------------------------------------------------------
# Per-sample attention
#
# One SDPA call per sample rather than zero padding with a key-padding mask or nested (jagged)
# tensors. Measured on 2 CPU threads, 4 samples of 2000/600/1200/300 tokens, 8 heads × 64:
# self-attention forward 93 ms looping vs 2.6 s padded+masked (a mask pushes SDPA off its
# fused kernel onto the math path, B·H·L_max² scores) vs 8.1 s nested; forward+backward 0.35 s
# vs 6.5 s vs 9.2 s. Cross-attention to 1374 cond tokens: 0.41 s looping vs 0.76 s padding the
# queries (no mask needed, but padded queries are wasted work). The loop also keeps each
# sample on the fused kernels on GPU, and the memory of the math path under torch.func.jvp
# at Σ L_i² instead of B·L_max².


def varlen_self_attention(q: Tensor, k: Tensor, v: Tensor, x: SparseBatch) -> Tensor:
    """Full attention within each sample: q, k, v (N, H, D) packed like `x` → (N, H, D)."""
    slices = x._layout.slices
    if len(slices) == 1:
        return attention(q[None], k[None], v[None])[0]
    return torch.cat([attention(q[s][None], k[s][None], v[s][None])[0] for s in slices])


def varlen_cross_attention(q: Tensor, k: Tensor, v: Tensor, x: SparseBatch) -> Tensor:
    """Each sample's voxels q (N, H, D) attend to that sample's dense context k, v (B, T, H, D)."""
    slices = x._layout.slices
    if k.shape[0] != len(slices):
        raise ValueError(f"context has batch {k.shape[0]} but the sparse batch has {len(slices)} samples")
    if len(slices) == 1:
        return attention(q[None], k, v)[0]
    return torch.cat([attention(q[s][None], k[i:i + 1], v[i:i + 1])[0] for i, s in enumerate(slices)])
