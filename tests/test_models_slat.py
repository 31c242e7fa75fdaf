"""Stage-2 sparse flow transformer: TRELLIS conformance, sparse ops, SparseBatch, checkpoint I/O."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import mdt_ray.models.sparse as sp
from mdt_ray import flow, objectives
from mdt_ray.models import (
    SLatFlowModel,
    SparseBatch,
    build_model,
    count_parameters,
    export_trellis,
    load_trellis,
)
from mdt_ray.models.modules import attention
from mdt_ray.models.sparse import (
    SubMConv3d,
    neighbour_pairs,
    sparse_downsample,
    sparse_upsample,
    submanifold_conv3d,
    varlen_cross_attention,
    varlen_self_attention,
)

FIXTURES = Path(__file__).parent / "fixtures" / "trellis"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """TRELLIS's init zeroes modulation, conv2 and head, which would make every output 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def random_voxels(n: int, res: int, g: torch.Generator) -> torch.Tensor:
    """n distinct voxels of a res³ grid in random order, (n, 3) int32."""
    return torch.randperm(res**3, generator=g)[:n].reshape(-1, 1).div(
        torch.tensor([res * res, res, 1]), rounding_mode="floor").remainder(res).int()


def random_batch(counts, channels: int = 8, res: int = 12, seed: int = 0, dtype=torch.float32) -> SparseBatch:
    g = torch.Generator().manual_seed(seed)
    coords = [random_voxels(n, res, g) for n in counts]
    return SparseBatch.from_list(coords, [torch.randn(n, channels, generator=g, dtype=dtype) for n in counts])


def fixture_io():
    io = load_file(str(FIXTURES / "slat_flow_tiny_io.safetensors"))
    return SparseBatch(io["coords"], io["feats"]), io


@pytest.fixture(scope="module")
def tiny():
    """slat-tiny with random non-zero weights, shared by the read-only tests."""
    return randomize(build_model("slat-tiny")).eval()


# ---------------------------------------------------------------- TRELLIS golden fixture


def test_golden_fixture_reproduces_trellis():
    model = load_trellis(FIXTURES / "slat_flow_tiny.json").eval()
    assert isinstance(model, SLatFlowModel)
    x, io = fixture_io()
    assert x.counts == [40, 25]
    with torch.no_grad():
        out = model(x, io["t"], io["cond"])
    assert out.coords is x.coords and out.feats.dtype == torch.float32
    assert out.feats.shape == io["out"].shape
    assert rel_err(out.feats, io["out"]) < 1e-5
    with safe_open(str(FIXTURES / "slat_flow_tiny.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {k: v.dtype for k, v in model.state_dict().items()} == stored


def test_fixture_pins_the_kernel_offset_convention(monkeypatch):
    """Mirrored slots (a convolution instead of spconv's cross-correlation) or the kernel axes
    read as (z, y, x) do not reproduce TRELLIS; the chosen convention does (test above)."""
    model = load_trellis(FIXTURES / "slat_flow_tiny.json").eval()
    _, io = fixture_io()
    for offsets in ([(-a, -b, -c) for a, b, c in sp._OFFSETS], [(c, b, a) for a, b, c in sp._OFFSETS]):
        monkeypatch.setattr(sp, "_OFFSETS", offsets)
        with torch.no_grad():
            out = model(SparseBatch(io["coords"], io["feats"]), io["t"], io["cond"])
        assert rel_err(out.feats, io["out"]) > 0.1


def test_fixture_in_fp16_layout():
    """The fixture's weights in TRELLIS's fp16 layout (conv, Linear in io blocks and blocks fp16)."""
    cfg = json.loads((FIXTURES / "slat_flow_tiny.json").read_text())
    cfg["args"]["use_fp16"] = True
    model = build_model(cfg).eval()
    model.load_state_dict(load_file(str(FIXTURES / "slat_flow_tiny.safetensors")))
    sd = model.state_dict()
    assert sd["input_blocks.0.conv1.conv.weight"].dtype == torch.float16
    assert sd["input_blocks.1.skip_connection.weight"].dtype == torch.float16
    assert sd["out_blocks.0.emb_layers.1.weight"].dtype == torch.float16
    assert sd["input_blocks.0.norm1.weight"].dtype == torch.float32
    assert sd["input_layer.weight"].dtype == sd["out_layer.weight"].dtype == torch.float32
    x, io = fixture_io()
    with torch.no_grad():
        out = model(x, io["t"], io["cond"])
    assert out.feats.dtype == torch.float32
    assert rel_err(out.feats, io["out"]) < 1e-2


# ---------------------------------------------------------------- TRELLIS-L size and key names


def test_trellis_large_stage2_on_meta():
    with torch.device("meta"):
        model = build_model("slat-L")
    assert count_parameters(model) == 600_432_520
    sd = model.state_dict()
    assert len(sd) == 526
    assert not list(model.buffers())  # APE is computed per call, not stored
    expected = {
        "input_layer.weight": (128, 8),
        "out_layer.weight": (8, 128),
        "t_embedder.mlp.0.weight": (1024, 256),
        "blocks.0.self_attn.to_qkv.weight": (3072, 1024),
        "blocks.0.self_attn.q_rms_norm.gamma": (16, 64),
        "blocks.0.cross_attn.to_kv.weight": (2048, 1024),
        "blocks.23.adaLN_modulation.1.weight": (6144, 1024),
        "input_blocks.0.norm1.weight": (128,),
        "input_blocks.0.norm1.bias": (128,),
        "input_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 128),
        "input_blocks.0.conv1.conv.bias": (128,),
        "input_blocks.0.conv2.conv.weight": (128, 3, 3, 3, 128),
        "input_blocks.0.emb_layers.1.weight": (256, 1024),
        "input_blocks.1.norm1.weight": (128,),
        "input_blocks.1.conv1.conv.weight": (1024, 3, 3, 3, 128),
        "input_blocks.1.conv2.conv.weight": (1024, 3, 3, 3, 1024),
        "input_blocks.1.emb_layers.1.weight": (2048, 1024),
        "input_blocks.1.skip_connection.weight": (1024, 128),
        "input_blocks.1.skip_connection.bias": (1024,),
        "out_blocks.0.norm1.weight": (2048,),
        "out_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 2048),
        "out_blocks.0.conv2.conv.weight": (128, 3, 3, 3, 128),
        "out_blocks.0.emb_layers.1.weight": (256, 1024),
        "out_blocks.0.skip_connection.weight": (128, 2048),
        "out_blocks.1.norm1.weight": (256,),
        "out_blocks.1.conv1.conv.weight": (128, 3, 3, 3, 256),
        "out_blocks.1.conv2.conv.weight": (128, 3, 3, 3, 128),
        "out_blocks.1.emb_layers.1.weight": (256, 1024),
        "out_blocks.1.skip_connection.weight": (128, 256),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # norm2 of the ResBlocks has no affine; only the ResBlocks' first-level blocks have no skip.
    assert not any(".norm2." in k for k in sd if "_blocks." in k)
    assert "input_blocks.0.skip_connection.weight" not in sd
    # The released file's element counts per dtype.
    f16 = sum(v.numel() for v in sd.values() if v.dtype == torch.float16)
    f32 = sum(v.numel() for v in sd.values() if v.dtype == torch.float32)
    assert (f16, f32) == (599_014_144, 1_418_376)


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="io_block_channels"):
        SLatFlowModel(16, 8, 64, 32, 8, 1, io_block_channels=[16, 32], patch_size=2)
    with pytest.raises(ValueError, match="power of 2"):
        SLatFlowModel(16, 8, 64, 32, 8, 1, io_block_channels=[16], patch_size=3)
    with pytest.raises(ValueError, match="pe_mode"):
        SLatFlowModel(16, 8, 64, 32, 8, 1, io_block_channels=[16], pe_mode="rope")


# ---------------------------------------------------------------- sparse convolution


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_submanifold_conv_matches_dense_conv3d_at_active_sites(density):
    """With inactive sites zero, a dense conv3d (same padding) equals the submanifold conv at
    the active sites; on a fully active grid that is every site."""
    g = torch.Generator().manual_seed(0)
    res, cin, cout, b = 5, 3, 4, 2
    dense = torch.randn(b, cin, res, res, res, generator=g, dtype=torch.float64)
    active = torch.rand(b, res, res, res, generator=g) < density
    dense = dense * active[:, None]
    coords = active.nonzero().int()  # [b, x, y, z], grouped by batch
    feats = dense.permute(0, 2, 3, 4, 1)[active]
    x = SparseBatch(coords, feats)
    conv = SubMConv3d(cin, cout).double()
    out = conv(x)
    ref = F.conv3d(dense, conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=1)
    ref = ref.permute(0, 2, 3, 4, 1)[active]
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)


def test_neighbour_pairs_do_not_cross_samples_and_are_cached():
    g = torch.Generator().manual_seed(1)
    c = random_voxels(20, 3, g)
    x = SparseBatch.from_list([c, c], [torch.randn(20, 2), torch.randn(20, 2)])
    pairs = neighbour_pairs(x)
    assert neighbour_pairs(x.replace(x.feats * 2)) is pairs  # same layout → same maps
    for out_rows, in_rows in pairs:
        assert torch.equal(x.batch_index[out_rows], x.batch_index[in_rows])
    # Two identical samples: conv of the batch is the conv of each alone.
    w = torch.randn(3, 3, 3, 3, 2, generator=g)
    out = submanifold_conv3d(x, w)
    alone = submanifold_conv3d(SparseBatch.from_list([c], [x.feats[:20]]), w)
    assert torch.allclose(out[:20], alone, atol=1e-6)


def test_conv_rejects_wrong_channels():
    x = random_batch([5], channels=3)
    with pytest.raises(ValueError, match="input channels"):
        submanifold_conv3d(x, torch.zeros(2, 3, 3, 3, 4))


# ---------------------------------------------------------------- down / up sampling


def test_downsample_pools_like_trellis_and_upsample_restores_order():
    coords = torch.tensor([[0, 3, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [1, 2, 2, 2], [1, 5, 5, 5]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0]])
    x = SparseBatch(coords, feats)
    down = sparse_downsample(x)
    assert down.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [1, 2, 2, 2]]
    assert down.counts == [2, 2]
    # TRELLIS's scatter_reduce(zeros, "mean") counts its zero start: sum / (n + 1).
    assert down.feats.squeeze(1).tolist() == [6 / 3, 1 / 2, 8 / 2, 16 / 2]
    up = sparse_upsample(down.replace(down.feats * 10))
    assert up.coords is x.coords and up.same_coords(x)
    assert up.feats.squeeze(1).tolist() == [5.0, 20.0, 20.0, 40.0, 80.0]
    with pytest.raises(ValueError, match="sparse_downsample"):
        sparse_upsample(x)


# ---------------------------------------------------------------- per-sample attention


def test_varlen_attention_matches_each_sample_alone_and_a_padded_reference():
    g = torch.Generator().manual_seed(2)
    x = random_batch([7, 3, 11])
    n, h, d = x.num_voxels, 2, 4
    q, k, v = (torch.randn(n, h, d, generator=g) for _ in range(3))
    out = varlen_self_attention(q, k, v, x)
    for s in x.layout:
        assert torch.allclose(out[s], attention(q[s][None], k[s][None], v[s][None])[0], atol=1e-6)
    # Independent reference: zero padding with a key-padding mask.
    lmax = max(x.counts)
    pad = lambda z: torch.stack([F.pad(z[s], (0, 0, 0, 0, 0, lmax - (s.stop - s.start))) for s in x.layout])
    mask = torch.stack([torch.arange(lmax) < c for c in x.counts])
    ref = attention(pad(q), pad(k), pad(v), mask)
    assert torch.allclose(out, torch.cat([ref[i, :c] for i, c in enumerate(x.counts)]), atol=1e-6)

    ctx_k, ctx_v = (torch.randn(3, 5, h, d, generator=g) for _ in range(2))
    cross = varlen_cross_attention(q, ctx_k, ctx_v, x)
    for i, s in enumerate(x.layout):
        assert torch.allclose(cross[s], attention(q[s][None], ctx_k[i:i + 1], ctx_v[i:i + 1])[0], atol=1e-6)
    with pytest.raises(ValueError, match="context has batch"):
        varlen_cross_attention(q, ctx_k[:2], ctx_v[:2], x)


# ---------------------------------------------------------------- the whole model


def test_batch_of_different_sizes_equals_one_by_one(tiny):
    x = random_batch([37, 12, 60], res=16)
    g = torch.Generator().manual_seed(3)
    t = 1000 * torch.rand(3, generator=g)
    cond = torch.randn(3, 5, 64, generator=g)
    with torch.no_grad():
        out = tiny(x, t, cond)
        for i, (c, f) in enumerate(x.to_list()):
            alone = tiny(SparseBatch.from_list([c], [f]), t[i:i + 1], cond[i:i + 1])
            assert torch.allclose(out.feats[x.layout[i]], alone.feats, rtol=1e-4, atol=1e-5), i


def test_output_follows_the_input_row_order(tiny):
    x = random_batch([30, 25], res=16, seed=4)
    t, cond = torch.tensor([100.0, 900.0]), torch.randn(2, 5, 64)
    # Shuffle rows within each sample (the batch grouping must stay).
    perm = torch.cat([s.start + torch.randperm(s.stop - s.start) for s in x.layout])
    shuffled = SparseBatch(x.coords[perm], x.feats[perm])
    with torch.no_grad():
        a, b = tiny(x, t, cond), tiny(shuffled, t, cond)
    assert torch.equal(b.coords, shuffled.coords)
    assert torch.allclose(a.feats[perm], b.feats, rtol=1e-4, atol=1e-5)


def test_input_validation(tiny):
    x = random_batch([5, 6])
    t, cond = torch.zeros(2), torch.zeros(2, 3, 64)
    with pytest.raises(TypeError, match="SparseBatch"):
        tiny(x.feats, t, cond)
    with pytest.raises(ValueError, match="cond must be"):
        tiny(x, t, torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="t must be"):
        tiny(x, torch.zeros(3), cond)
    with pytest.raises(ValueError, match="x.feats"):
        tiny(x.replace(torch.zeros(11, 4)), t, cond)
    empty_tail = SparseBatch(x.coords, x.feats, batch_size=3)
    with pytest.raises(ValueError, match="at least one voxel"):
        tiny(empty_tail, torch.zeros(3), torch.zeros(3, 3, 64))


def test_jvp_over_feats_matches_finite_difference():
    model = randomize(build_model("slat-tiny")).double()
    x = random_batch([20, 33], res=10, seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    cond = torch.randn(2, 5, 64, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    tangent = torch.randn(x.feats.shape, generator=g, dtype=torch.float64)

    def fn(f, t_):
        return model(x.replace(f), 1000 * t_, cond).feats

    out, tan = torch.func.jvp(fn, (x.feats, t), (tangent, torch.ones_like(t)))
    eps = 1e-6
    fd = (fn(x.feats + eps * tangent, t + eps) - fn(x.feats - eps * tangent, t - eps)) / (2 * eps)
    assert torch.allclose(out, fn(x.feats, t))
    assert rel_err(tan, fd) < 1e-6


def test_bf16_autocast_keeps_fp32_head(tiny):
    x = random_batch([20, 15], res=12, seed=7)
    t, cond = torch.tensor([200.0, 600.0]), torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = tiny(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x, t, cond)
    assert out.feats.dtype == torch.float32
    assert rel_err(out.feats, ref.feats) < 5e-2


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = randomize(build_model("slat-tiny"))
    ckpt = randomize(build_model("slat-tiny", use_checkpoint=True))
    x = random_batch([14, 9], res=8, seed=8)
    t, cond = torch.tensor([300.0, 500.0]), torch.randn(2, 4, 64)
    for m in (plain, ckpt):
        m(x, t, cond).feats.pow(2).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_default_init_predicts_zero():
    """TRELLIS's init: zero head, zero modulation, zero conv2."""
    model = build_model("slat-tiny")
    x = random_batch([6, 4])
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 2.0]), torch.randn(2, 3, 64))
    assert torch.count_nonzero(out.feats) == 0
    assert torch.count_nonzero(model.input_blocks[0].conv2.conv.weight) == 0


# ---------------------------------------------------------------- export / load


@pytest.mark.parametrize("use_fp16", [False, True])
def test_export_load_round_trip_is_bit_exact(tmp_path, use_fp16):
    model = randomize(build_model("slat-tiny", use_fp16=use_fp16)).eval()
    json_path, st_path = export_trellis(model, tmp_path, "student")
    cfg = json.loads(json_path.read_text())
    assert cfg == {"name": "SLatFlowModel", "args": model.config_args}
    assert cfg["args"]["io_block_channels"] == [16]
    loaded = load_trellis(json_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    x = random_batch([10, 7])
    t, cond = torch.tensor([10.0, 990.0]), torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond).feats, loaded(x, t, cond).feats)


def test_elastic_name_loads_into_the_same_class(tmp_path):
    model = randomize(build_model("slat-tiny"))
    json_path, _ = export_trellis(model, tmp_path, "m")
    cfg = json.loads(json_path.read_text())
    cfg["name"] = "ElasticSLatFlowModel"
    json_path.write_text(json.dumps(cfg))
    loaded = load_trellis(json_path)
    assert type(loaded) is SLatFlowModel
    assert torch.equal(loaded.out_layer.weight, model.out_layer.weight)


# ---------------------------------------------------------------- SparseBatch


def test_sparse_batch_validates_its_input():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        SparseBatch(torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="integers"):
        SparseBatch(torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="feats must be"):
        SparseBatch(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ascending"):
        SparseBatch(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        SparseBatch(torch.tensor([[0, -1, 0, 0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="rows"):
        random_batch([3]).replace(torch.zeros(4, 8))


def test_from_list_to_list_round_trip():
    coords = [torch.tensor([[1, 2, 3], [0, 0, 0]], dtype=torch.uint8), torch.tensor([[5, 5, 5]])]
    feats = [torch.randn(2, 4), torch.randn(1, 4)]
    x = SparseBatch.from_list(coords, feats)
    assert x.coords.dtype == torch.int32 and x.coords[:, 0].tolist() == [0, 0, 1]
    assert x.batch_size == 2 and x.counts == [2, 1] and x.num_voxels == 3
    assert x.shape == (2, 4) and x.dtype == torch.float32 and x.device.type == "cpu"
    for (c, f), c0, f0 in zip(x.to_list(), coords, feats):
        assert torch.equal(c, c0.int()) and torch.equal(f, f0)


def test_arithmetic():
    x = random_batch([4, 3], channels=2)
    y = x.replace(torch.randn(7, 2))
    f, h = x.feats, y.feats
    assert torch.equal((x + y).feats, f + h)
    assert torch.equal((x - y).feats, f - h)
    assert torch.equal((x * y).feats, f * h)
    assert torch.equal((x / 2).feats, f / 2)
    assert torch.equal((2 / x).feats, 2 / f)
    assert torch.equal((-x).feats, -f)
    assert torch.equal((1 - x).feats, 1 - f)
    assert torch.equal((3 + x).feats, 3 + f)
    assert torch.equal((0.5 * x).feats, 0.5 * f)
    assert torch.equal((x ** 2).feats, f**2)
    col, full = torch.randn(7, 1), torch.randn(7, 2)
    assert torch.equal((x * col).feats, f * col) and torch.equal((col * x).feats, col * f)
    assert torch.equal((x + full).feats, f + full)
    out = torch.tensor(2.0) * x
    assert isinstance(out, SparseBatch) and torch.equal(out.feats, 2 * f)
    # Equal coords in a different tensor are accepted; different coords are refused by name.
    copy = SparseBatch(x.coords.clone(), torch.ones(7, 2))
    assert torch.equal((x + copy).feats, f + 1)
    other = random_batch([4, 3], channels=2, seed=9)
    with pytest.raises(ValueError, match="different coordinates"):
        x + other
    with pytest.raises(ValueError, match="expand_per_sample"):
        x * torch.ones(2, 2)  # per-sample values are not implicitly broadcast


def test_expand_per_sample_and_reductions():
    x = random_batch([4, 1, 3], channels=2)
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    e = x.expand_per_sample(t)
    assert e.shape == (8, 1) and e.dtype == torch.float32
    assert e.squeeze(1).tolist() == [1.0] * 4 + [2.0] + [3.0] * 3
    assert x.expand_per_sample(torch.arange(6.0).reshape(3, 2)).shape == (8, 2)
    norms, means = x.per_sample_norm(), x.per_sample_mean()
    for i, s in enumerate(x.layout):
        assert torch.allclose(norms[i], x.feats[s].norm())
        assert torch.allclose(means[i], x.feats[s].mean())
    half = x.half()
    assert half.per_sample_norm().dtype == torch.float32
    assert torch.allclose(half.per_sample_norm(), norms, rtol=1e-3)
    big = x.replace(torch.full((8, 2), 300.0, dtype=torch.float16))  # 300² overflows fp16
    assert torch.isfinite(big.per_sample_norm()).all()
    rows = torch.randn(8, 2)
    scale = torch.randn(3, 2)
    assert torch.allclose(x.map_samples(torch.mul, rows, scale), rows * x.per_voxel(scale))
    # The flow helpers dispatch to these methods.
    assert torch.equal(flow.per_sample_norm(x), norms)
    assert torch.equal(flow.expand_t(t, x), e)


def test_cat_and_split_are_inverse():
    a, b = random_batch([3, 5], seed=1), random_batch([2, 4], seed=2)
    ab = SparseBatch.cat([a, b])
    assert ab.batch_size == 4 and ab.counts == [3, 5, 2, 4]
    assert ab.coords[:, 0].tolist() == [0] * 3 + [1] * 5 + [2] * 2 + [3] * 4
    ab_out = ab.replace(ab.feats * 2)  # a model output keeps the cat's layout
    pa, pb = ab_out.split(2)
    # Parts come back on the very same coords (no comparison needed for arithmetic).
    assert pa.coords is a.coords and pb.coords is b.coords
    assert torch.equal(pa.feats, 2 * a.feats) and torch.equal(pb.feats, 2 * b.feats)
    assert torch.equal((pa - a).feats, a.feats)
    # Split of a batch that was not cat'ed (or into another number of parts) rebuilds coords.
    fresh = SparseBatch(ab.coords.clone(), ab.feats)
    parts = fresh.split(4)
    assert [p.batch_size for p in parts] == [1] * 4 and [p.counts for p in parts] == [[3], [5], [2], [4]]
    assert all(int(p.coords[:, 0].max()) == 0 for p in parts)
    assert torch.equal(SparseBatch.cat(parts).coords, ab.coords)
    with pytest.raises(ValueError, match="equal parts"):
        ab.split(3)
    assert flow.cat_batch([a, b]).counts == ab.counts
    assert [p.counts for p in flow.split_batch(ab, 2)] == [[3, 5], [2, 4]]


def test_randn_like_to_and_detach():
    x = random_batch([3, 2])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    n1, n2 = x.randn_like(g1), flow.randn_like(x, g2)
    assert n1.same_coords(x) and torch.equal(n1.feats, n2.feats)
    assert x.to(torch.float64).dtype == torch.float64 and x.to(torch.float64).float().dtype == torch.float32
    y = x.replace(x.feats.requires_grad_())
    assert not y.detach().feats.requires_grad
    assert "batch_size=2" in repr(x)
    back = pickle.loads(pickle.dumps(x))  # crosses Ray process boundaries as is
    assert torch.equal(back.coords, x.coords) and torch.equal(back.feats, x.feats) and back.counts == x.counts


# ---------------------------------------------------------------- the objectives on sparse batches


@pytest.mark.parametrize("derivative", ["discrete", "continuous"])
def test_mdt_loss_runs_on_sparse_batches(derivative):
    student = randomize(build_model("slat-tiny"), seed=1, scale=0.05)
    teacher = randomize(build_model("slat-tiny"), seed=2, scale=0.05)
    x0 = random_batch([25, 40], res=10, seed=10)
    g = torch.Generator().manual_seed(11)
    cond = torch.randn(2, 4, 64, generator=g)
    t = flow.sample_t(2, dt=0.01 if derivative == "discrete" else 0.0, generator=g)
    out = objectives.mdt_loss(student, teacher, x0, cond, torch.zeros_like(cond), noise=x0.randn_like(g), t=t,
                              fake_noise=x0.randn_like(g), derivative=derivative)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert student.out_layer.weight.grad is not None and teacher.out_layer.weight.grad is None
