"""The gather-only submanifold convolution: same forward bits as the pair-list scatter it
replaced, exact gradients and forward-mode derivatives, and no scatter op anywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.sparse_conv import pair_list_conv  # the formulation the gather replaced
from mdt_ray.models.sparse import (
    _CENTRE,
    SparseBatch,
    neighbour_pairs,
    neighbour_table,
    submanifold_conv3d,
)


def voxels(counts, res, seed, channels, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in counts:
        flat = torch.randperm(res**3, generator=g)[:n]
        coords.append(torch.stack([flat // res**2, flat // res % res, flat % res], dim=1))
        feats.append(torch.randn(n, channels, generator=g, dtype=dtype))
    return SparseBatch.from_list(coords, feats)


def close(a, b, tol):
    return ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


def test_forward_matches_the_pair_list_result_in_each_path():
    x = voxels([300, 120, 45], res=9, seed=0, channels=24)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(16, 3, 3, 3, 24, generator=g), torch.randn(16, generator=g)
    # fp32: the CSR row sums (MKL's order, not bit for bit the scatter's)
    assert close(submanifold_conv3d(x, w, b), pair_list_conv(x, w, b), 1e-6)
    assert close(submanifold_conv3d(x, w), pair_list_conv(x, w, None), 1e-6)
    # bf16 on CPU: the gather-sum path, in the scatter's own order, hence bit for bit
    xb, wb, bb = x.replace(x.feats.bfloat16()), w.bfloat16(), b.bfloat16()
    assert torch.equal(submanifold_conv3d(xb, wb, bb), pair_list_conv(xb, wb, bb))


def test_map_points_missing_neighbours_at_the_zero_row_and_is_symmetric():
    x = voxels([50, 30], res=6, seed=2, channels=4)
    cmap = neighbour_table(x)
    n = x.num_voxels
    assert cmap.table.shape == (27, n) and neighbour_table(x.replace(x.feats + 1)) is cmap
    zero = cmap.rows - 1
    assert torch.equal(cmap.table[_CENTRE], torch.arange(n))  # centre products come first
    pairs = neighbour_pairs(x)
    dense = cmap.sum_matrix(torch.float64).to_dense()
    assert dense.shape == (n, cmap.rows) and bool((dense[:, zero] == 0).all())
    for s in range(27):
        if s == _CENTRE:
            continue
        out_rows, in_rows = pairs[s]
        hit = cmap.table[s] < zero
        assert torch.equal(torch.arange(n)[hit], out_rows)
        rows = torch.arange(n + cmap.offsets[s], n + cmap.offsets[s + 1])
        assert torch.equal(cmap.table[s][out_rows], rows)
        assert bool((dense[out_rows, rows] == 1).all())
        # slot s of i is j  ⇔  slot 26 − s of j is i: what the input gradient relies on
        back_out, back_in = pairs[26 - s]
        assert sorted(zip(in_rows.tolist(), out_rows.tolist())) == sorted(zip(back_out.tolist(), back_in.tolist()))


def test_gradients_match_finite_differences():
    x = voxels([14, 9], res=4, seed=3, channels=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 3, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    f = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f_, w_, b_: submanifold_conv3d(x.replace(f_), w_, b_), (f, w, b),
                                    fast_mode=True)


def test_gradients_equal_autograd_of_the_pair_list():
    x = voxels([200, 80], res=8, seed=5, channels=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    w0, b0 = torch.randn(5, 3, 3, 3, 8, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    up = torch.randn(x.num_voxels, 5, generator=g, dtype=torch.float64)
    grads = []
    for conv in (submanifold_conv3d, pair_list_conv):
        f, w, b = (t.clone().requires_grad_() for t in (x.feats, w0, b0))
        (conv(x.replace(f), w, b) * up).sum().backward()
        grads.append((f.grad, w.grad, b.grad))
    for a, r in zip(*grads):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)


def test_jvp_in_feats_and_weight():
    x = voxels([40, 25], res=5, seed=7, channels=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    w, b = torch.randn(3, 3, 3, 3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    tf, tw = torch.randn_like(x.feats), torch.randn_like(w)
    fn = lambda f_, w_: submanifold_conv3d(x.replace(f_), w_, b)  # noqa: E731
    out, tan = torch.func.jvp(fn, (x.feats, w), (tf, tw))
    assert torch.equal(out, fn(x.feats, w))
    # bilinear: the derivative is exact, no finite-difference tolerance needed beyond rounding
    want = submanifold_conv3d(x.replace(tf), w) + submanifold_conv3d(x, tw)
    assert torch.allclose(tan, want, rtol=1e-12, atol=1e-12)
    # and the primal stays differentiable for the loss that follows the jvp
    f = x.feats.clone().requires_grad_()
    out, _ = torch.func.jvp(lambda f_: submanifold_conv3d(x.replace(f_), w, b), (f,), (tf,))
    out.sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_no_scatter_in_forward_or_backward_and_same_bits_at_any_thread_count():
    x = voxels([400, 200], res=10, seed=9, channels=16)
    g = torch.Generator().manual_seed(10)
    w = torch.randn(16, 3, 3, 3, 16, generator=g, requires_grad=True)
    f = x.feats.clone().requires_grad_()
    neighbour_table(x)  # the one-off table build writes by index; the per-step ops must not
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        submanifold_conv3d(x.replace(f), w).pow(2).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert not {o for o in ops if "index_add" in o or "scatter" in o or "index_put" in o}, ops
    first = (f.grad.clone(), w.grad.clone())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # the same bits whatever the thread count
            torch.set_num_threads(n)
            f.grad = w.grad = None
            submanifold_conv3d(x.replace(f), w).pow(2).sum().backward()
            assert torch.equal(first[0], f.grad) and torch.equal(first[1], w.grad), n
    finally:
        torch.set_num_threads(threads)


def test_bf16_autocast_runs_the_conv_in_bf16():
    x = voxels([60], res=6, seed=11, channels=8)
    w, b = torch.randn(4, 3, 3, 3, 8), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = submanifold_conv3d(x, w, b)
    assert out.dtype == torch.bfloat16
    ref = submanifold_conv3d(x, w, b)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
