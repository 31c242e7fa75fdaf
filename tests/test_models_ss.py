"""Stage-1 flow transformer: TRELLIS conformance, checkpoint I/O, named sizes, forward-mode AD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mdt_ray.models import (
    NAMED_CONFIGS,
    SparseStructureFlowModel,
    build_model,
    count_parameters,
    export_trellis,
    load_trellis,
)
from mdt_ray.models.checkpoint import CheckpointMismatchError
from mdt_ray.models.modules import MultiHeadAttention, absolute_position_embedding
from mdt_ray.models.ss_flow import patchify, unpatchify

FIXTURES = Path(__file__).parent / "fixtures" / "trellis"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """TRELLIS's init zeroes modulation and head, which would make every output 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def is_fp16_key(key: str) -> bool:
    """TRELLIS's layout: Linear weights/biases inside `blocks.*` are F16; norms, gammas and the rest F32."""
    return key.startswith("blocks.") and not (".norm" in key or "rms_norm.gamma" in key)


def stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


def inputs(model: SparseStructureFlowModel, batch: int = 2, tokens: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    r = model.resolution
    x = torch.randn(batch, model.in_channels, r, r, r, generator=g)
    t = 1000 * torch.rand(batch, generator=g)
    cond = torch.randn(batch, tokens, model.cond_channels, generator=g)
    return x, t, cond


# ---------------------------------------------------------------- TRELLIS golden fixtures


@pytest.mark.parametrize("name, tol", [("ss_flow_tiny", 1e-5), ("ss_flow_tiny_fp16", 1e-2)])
def test_golden_fixture_reproduces_trellis(name, tol):
    model = load_trellis(FIXTURES / f"{name}.json").eval()
    io = load_file(str(FIXTURES / f"{name}_io.safetensors"))
    with torch.no_grad():
        out = model(io["x"], io["t"], io["cond"])
    assert out.dtype == torch.float32 and out.shape == io["out"].shape
    assert rel_err(out, io["out"]) < tol
    # Loading keeps TRELLIS's stored dtype layout, tensor for tensor.
    stored = stored_dtypes(FIXTURES / f"{name}.safetensors")
    assert {k: v.dtype for k, v in model.state_dict().items()} == stored


def test_fp16_fixture_keeps_mixed_dtypes():
    model = load_trellis(FIXTURES / "ss_flow_tiny_fp16.json")
    sd = model.state_dict()
    for key, value in sd.items():
        assert value.dtype == (torch.float16 if is_fp16_key(key) else torch.float32), key
    assert sd["blocks.0.self_attn.to_qkv.weight"].dtype == torch.float16
    assert sd["blocks.0.norm2.weight"].dtype == torch.float32
    assert sd["blocks.0.self_attn.q_rms_norm.gamma"].dtype == torch.float32
    assert sd["t_embedder.mlp.0.weight"].dtype == torch.float32
    assert sd["pos_emb"].dtype == torch.float32


def test_position_embedding_matches_trellis_buffer():
    stored = load_file(str(FIXTURES / "ss_flow_tiny.safetensors"))["pos_emb"]
    g = torch.arange(8)
    coords = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    assert torch.equal(absolute_position_embedding(coords, 64), stored)


# ---------------------------------------------------------------- TRELLIS-L size and key names


def test_trellis_large_stage1_on_meta():
    with torch.device("meta"):
        model = build_model("ss-L")
    assert count_parameters(model) == 555_543_560
    sd = model.state_dict()
    assert len(sd) == 489
    expected = {
        "pos_emb": (4096, 1024),
        "input_layer.weight": (1024, 8),
        "out_layer.weight": (8, 1024),
        "t_embedder.mlp.0.weight": (1024, 256),
        "t_embedder.mlp.2.weight": (1024, 1024),
        "blocks.0.norm2.weight": (1024,),
        "blocks.0.self_attn.to_qkv.weight": (3072, 1024),
        "blocks.0.self_attn.to_qkv.bias": (3072,),
        "blocks.0.self_attn.q_rms_norm.gamma": (16, 64),
        "blocks.0.self_attn.k_rms_norm.gamma": (16, 64),
        "blocks.0.self_attn.to_out.weight": (1024, 1024),
        "blocks.0.cross_attn.to_q.weight": (1024, 1024),
        "blocks.0.cross_attn.to_kv.weight": (2048, 1024),
        "blocks.0.cross_attn.to_kv.bias": (2048,),
        "blocks.0.mlp.mlp.0.weight": (4096, 1024),
        "blocks.0.mlp.mlp.2.weight": (1024, 4096),
        "blocks.0.adaLN_modulation.1.weight": (6144, 1024),
        "blocks.23.adaLN_modulation.1.bias": (6144,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "pos_emb" in dict(model.named_buffers()) and "pos_emb" not in dict(model.named_parameters())
    assert not any(k.startswith("blocks.0.norm1") or k.startswith("blocks.0.norm3") for k in sd)
    # The released file's element counts per dtype.
    f16 = sum(v.numel() for v in sd.values() if v.dtype == torch.float16)
    f32 = sum(v.numel() for v in sd.values() if v.dtype == torch.float32)
    assert (f16, f32) == (554_115_072, 5_622_792)


# ---------------------------------------------------------------- export / load


@pytest.mark.parametrize("use_fp16", [False, True])
def test_export_load_round_trip_is_bit_exact(tmp_path, use_fp16):
    model = randomize(build_model("ss-tiny", use_fp16=use_fp16))
    json_path, st_path = export_trellis(model, tmp_path, "student")
    assert json_path == tmp_path / "student.json" and st_path == tmp_path / "student.safetensors"
    cfg = json.loads(json_path.read_text())
    assert cfg == {"name": "SparseStructureFlowModel", "args": model.config_args}
    assert json_path.read_text().startswith('{\n    "name"')  # indent 4, like TRELLIS
    assert not list(tmp_path.glob(".*tmp"))

    stored = stored_dtypes(st_path)
    for key, dtype in stored.items():
        assert dtype == (torch.float16 if use_fp16 and is_fp16_key(key) else torch.float32), key

    loaded = load_trellis(json_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    x, t, cond = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), loaded(x, t, cond))


def test_export_fp32_student_in_released_fp16_layout(tmp_path):
    model = randomize(build_model("ss-tiny"))
    json_path, st_path = export_trellis(model, tmp_path, "student", fp16=True)
    assert json.loads(json_path.read_text())["args"]["use_fp16"] is True
    loaded = load_trellis(json_path)
    for key, value in model.state_dict().items():
        want = value.half() if is_fp16_key(key) else value
        got = loaded.state_dict()[key]
        assert got.dtype == want.dtype and torch.equal(got, want), key


def test_export_overwrites_existing_pair(tmp_path):
    first = randomize(build_model("ss-tiny"), seed=1)
    second = randomize(build_model("ss-tiny"), seed=2)
    export_trellis(first, tmp_path, "m")
    export_trellis(second, tmp_path, "m")
    loaded = load_trellis(tmp_path / "m.json", tmp_path / "m.safetensors")
    assert torch.equal(loaded.out_layer.weight, second.out_layer.weight)


@pytest.fixture
def exported(tmp_path):
    model = randomize(build_model("ss-tiny"))
    json_path, st_path = export_trellis(model, tmp_path, "m")
    return json_path, st_path, load_file(str(st_path))


def test_missing_key_is_named(exported):
    json_path, st_path, tensors = exported
    del tensors["blocks.1.cross_attn.to_kv.bias"]
    save_file(tensors, str(st_path))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys.*blocks\.1\.cross_attn\.to_kv\.bias") as e:
        load_trellis(json_path)
    assert str(st_path) in str(e.value)


def test_unexpected_key_is_named(exported):
    json_path, st_path, tensors = exported
    tensors["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(st_path))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys.*blocks\.0\.extra\.weight"):
        load_trellis(json_path)
    with pytest.warns(UserWarning, match="blocks.0.extra.weight"):
        load_trellis(json_path, strict=False)


def test_wrong_shape_is_named(exported):
    json_path, st_path, tensors = exported
    tensors["input_layer.weight"] = torch.zeros(64, 9)
    save_file(tensors, str(st_path))
    with pytest.raises(CheckpointMismatchError, match=r"input_layer\.weight: checkpoint \(64, 9\) vs model \(64, 64\)"):
        load_trellis(json_path)
    with pytest.raises(CheckpointMismatchError, match="input_layer.weight"):
        load_trellis(json_path, strict=False)


def test_missing_files_are_named(tmp_path, exported):
    json_path, st_path, _ = exported
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_trellis(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="other.safetensors"):
        load_trellis(json_path, tmp_path / "other.safetensors")


# ---------------------------------------------------------------- named sizes, forward, AD


@pytest.mark.parametrize("name", ["ss-tiny", "ss-demo"])
def test_named_sizes_run_forward_and_backward(name):
    assert NAMED_CONFIGS[name]["args"]["patch_size"] == 2
    model = randomize(build_model(name))
    x, t, cond = inputs(model)
    assert cond.shape == (2, 64, 64)
    out = model(x, t, cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fresh_model_starts_at_zero_velocity():
    model = build_model("ss-tiny")
    x, t, cond = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), torch.zeros_like(x))


def test_jvp_matches_finite_difference():
    model = randomize(build_model("ss-tiny"))
    x, t, cond = inputs(model)
    g = torch.Generator().manual_seed(5)
    dx, dt = torch.randn(x.shape, generator=g), torch.full_like(t, 1000.0)  # d(1000·t)/dt
    out, tangent = torch.func.jvp(lambda x, t: model(x, t, cond), (x, t), (dx, dt))
    # The primal goes through SDPA's math path under forward AD, so it matches to round-off only.
    assert rel_err(out, model(x, t, cond).detach()) < 1e-5

    ref = build_model("ss-tiny").double()
    ref.load_state_dict(model.state_dict())
    x64, t64, c64, dx64, dt64 = (z.double() for z in (x, t, cond, dx, dt))
    eps = 1e-6
    with torch.no_grad():
        fd = (ref(x64 + eps * dx64, t64 + eps * dt64, c64) - ref(x64 - eps * dx64, t64 - eps * dt64, c64)) / (2 * eps)
    assert rel_err(tangent, fd) < 1e-4


def test_fp16_model_cast_to_fp32_runs():
    model = load_trellis(FIXTURES / "ss_flow_tiny_fp16.json")
    io = load_file(str(FIXTURES / "ss_flow_tiny_fp16_io.safetensors"))
    with torch.no_grad():
        out = model.float()(io["x"], io["t"], io["cond"])
    assert rel_err(out, io["out"]) < 1e-2


def test_bf16_autocast_returns_fp32():
    model = randomize(build_model("ss-tiny"))
    x, t, cond = inputs(model)
    with torch.no_grad():
        ref = model(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, cond)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 3e-2


def test_activation_checkpointing_gives_same_gradients():
    plain = randomize(build_model("ss-tiny"))
    ckpt = randomize(build_model("ss-tiny", use_checkpoint=True))
    x, t, cond = inputs(plain)
    for m in (plain, ckpt):
        m(x, t, cond).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_share_mod_variant_runs():
    model = randomize(build_model("ss-tiny", share_mod=True))
    assert "adaLN_modulation.1.weight" in model.state_dict()
    assert not any("blocks.0.adaLN" in k for k in model.state_dict())
    x, t, cond = inputs(model)
    assert model(x, t, cond).shape == x.shape


def test_patchify_round_trip_and_channel_order():
    x = torch.randn(2, 3, 4, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 24, 2, 2, 2)
    # Channel c·p³ + i·p² + j·p + k of patch (a, b, d) is voxel (2a + i, 2b + j, 2d + k).
    assert p[1, 2 * 8 + 1 * 4 + 0 * 2 + 1, 1, 0, 1] == x[1, 2, 3, 0, 3]
    assert torch.equal(unpatchify(p, 2), x)


def test_key_padding_mask_matches_unpadded_attention():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, type="self", qk_rms_norm=True)
    short, long = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    padded = torch.cat([torch.cat([short, torch.zeros(1, 4, 32)], 1), long])
    mask = torch.tensor([[True] * 5 + [False] * 4, [True] * 9])
    with torch.no_grad():
        out = attn(padded, mask=mask)
        assert torch.allclose(out[:1, :5], attn(short), atol=1e-6)
        assert torch.allclose(out[1:], attn(long), atol=1e-6)


def test_bad_inputs_are_named():
    model = build_model("ss-tiny")
    x, t, cond = inputs(model)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 8, 16, 16, 16\)"):
        model(x[:, :4], t, cond)
    with pytest.raises(ValueError, match="cond must be"):
        model(x, t, cond[..., :32])
    with pytest.raises(ValueError, match="pe_mode"):
        build_model("ss-tiny", pe_mode="rope")
