"""Image conditioning: TRELLIS's view crop, the DINOv2 forward on its original key layout, the
per-step view draw. The references here are written independently of mdt_ray.conditioning."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mdt_ray.conditioning import (EncoderError, ImageEncoder, ViewConditioner, ViewError, decode_view, draw_views,
                                  encode_view, preprocess_view, view_pixels)

TINY = dict(embed_dim=32, depth=2, num_heads=4, patch_size=14, num_register_tokens=4, img_size=56)


# -- the crop ------------------------------------------------------------------------------------
def _rgba(size, mask, seed=0):
    """An RGBA image: random colours, alpha `mask` (float in [0, 1]) as 8-bit."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    alpha = np.rint(np.clip(mask, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=2), "RGBA")


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return np.clip(r - d + 0.5, 0, 1)  # a soft one-pixel edge, so alpha takes in-between values


def reference_view(image: Image.Image, size: int = 518) -> np.ndarray:
    """TRELLIS's steps, by other means: bbox from argwhere, the square crop by slicing a
    zero-padded array, PIL's Lanczos resize of that crop, then premultiply."""
    arr = np.asarray(image.convert("RGBA"))
    visible = np.argwhere(arr[..., 3] > 0)
    (y0, x0), (y1, x1) = visible.min(axis=0), visible.max(axis=0)
    half = 1.2 * max(x1 - x0, y1 - y0) / 2
    box = [math.trunc(c + s * half) for s, c in ((-1, (x0 + x1) / 2), (-1, (y0 + y1) / 2), (1, (x0 + x1) / 2),
                                                  (1, (y0 + y1) / 2))]
    pad = max(arr.shape) * 2
    padded = np.zeros((arr.shape[0] + 2 * pad, arr.shape[1] + 2 * pad, 4), np.uint8)
    padded[pad:pad + arr.shape[0], pad:pad + arr.shape[1]] = arr
    crop = padded[box[1] + pad:box[3] + pad, box[0] + pad:box[2] + pad]
    resized = np.asarray(Image.fromarray(crop, "RGBA").resize((size, size), Image.LANCZOS)).astype(np.float32)
    return (resized[..., :3] / 255.0 * (resized[..., 3:] / 255.0)).transpose(2, 0, 1)


@pytest.mark.parametrize("name, mask", [
    ("off-centre", _disc(120, 100, 30, 70, 12)),
    ("touching the border", _disc(96, 96, 5, 90, 20)),
    ("thin vertical", np.pad(np.ones((80, 2)), ((10, 30), (60, 38)))),
    ("thin horizontal, at the edge", np.pad(np.full((1, 64), 0.6), ((0, 63), (0, 0)))),
    ("single pixel", np.pad(np.ones((1, 1)), ((40, 23), (7, 56)))),
])
def test_preprocess_view_is_trellis_crop(name, mask):
    image = _rgba(mask.shape, mask)
    got = preprocess_view(image)
    assert got.shape == (3, 518, 518) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), reference_view(image))
    assert 0.0 <= float(got.min()) and float(got.max()) <= 1.0
    # Background (alpha 0) is black after premultiplying, whatever its RGB was.
    assert float(got[:, 0, 0].abs().max()) == 0.0 or name == "thin horizontal, at the edge"
    # What the corpus stores is the same image rounded to 8 bits.
    stored = view_pixels(image).astype(np.float32).transpose(2, 0, 1) / 255
    assert np.abs(stored - got.numpy()).max() <= 0.5 / 255 + 1e-6


def test_preprocess_view_refuses_no_alpha_and_empty_alpha():
    with pytest.raises(ViewError, match="mode RGB, without an alpha channel"):
        preprocess_view(Image.new("RGB", (32, 32), (9, 9, 9)))
    with pytest.raises(ViewError, match="alpha channel is empty"):
        preprocess_view(Image.new("RGBA", (32, 32), (200, 10, 10, 0)))


@pytest.mark.parametrize("fmt", ["png", "webp-lossless", "webp", "jpeg"])
def test_stored_views_round_trip(fmt):
    pixels = view_pixels(_rgba((90, 90), _disc(90, 90, 45, 40, 30)))
    back = decode_view(encode_view(pixels, fmt, 95), 518)
    err = np.abs(back.astype(int) - pixels.astype(int))
    assert back.shape == (518, 518, 3)
    assert err.max() == 0 if fmt in ("png", "webp-lossless") else err.mean() < 3
    with pytest.raises(ViewError, match="does not decode"):
        decode_view(b"not an image")


# -- the encoder ---------------------------------------------------------------------------------
def dinov2_state_dict(arch, seed=0):
    """Random tensors under the keys of DINOv2's own checkpoints (hub models, block_chunks=0)."""
    g = torch.Generator().manual_seed(seed)
    c, p, r = arch["embed_dim"], arch["patch_size"], arch["num_register_tokens"]
    n = (arch["img_size"] // p) ** 2

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": t(1, 1, c), "pos_embed": t(1, 1 + n, c), "register_tokens": t(1, r, c), "mask_token": t(1, c),
          "patch_embed.proj.weight": t(c, 3, p, p, scale=0.05), "patch_embed.proj.bias": t(c),
          "norm.weight": 1 + t(c), "norm.bias": t(c)}
    for i in range(arch["depth"]):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + t(c), b + "norm1.bias": t(c), b + "attn.qkv.weight": t(3 * c, c),
                   b + "attn.qkv.bias": t(3 * c), b + "attn.proj.weight": t(c, c), b + "attn.proj.bias": t(c),
                   b + "ls1.gamma": t(c, scale=0.5), b + "norm2.weight": 1 + t(c), b + "norm2.bias": t(c),
                   b + "mlp.fc1.weight": t(4 * c, c), b + "mlp.fc1.bias": t(4 * c),
                   b + "mlp.fc2.weight": t(c, 4 * c), b + "mlp.fc2.bias": t(c), b + "ls2.gamma": t(c, scale=0.5)})
    return sd


def reference_forward(sd, arch, images):
    """DINOv2's forward_features(...)["x_prenorm"] + TRELLIS's affine-free layer norm, spelled out."""
    c, heads, p = arch["embed_dim"], arch["num_heads"], arch["patch_size"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (images - mean) / std
    b, _, h, w = x.shape
    # patchify by unfolding, then the conv as a matrix product
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, 3, H/p, W/p, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(c, -1).T + sd["patch_embed.proj.bias"]
    tok = torch.cat([sd["cls_token"].expand(b, 1, c), tok], 1) + sd["pos_embed"]
    tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(b, -1, c), tok[:, 1:]], 1)

    def ln(v, wgt=None, bias=None, eps=1e-6):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        out = (v - mu) / torch.sqrt(var + eps)
        return out if wgt is None else out * wgt + bias

    for i in range(arch["depth"]):
        k = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = ln(tok, k("norm1.weight"), k("norm1.bias"))
        qkv = (y @ k("attn.qkv.weight").T + k("attn.qkv.bias")).reshape(b, -1, 3, heads, c // heads)
        q, kk, v = qkv.unbind(2)
        att = torch.einsum("bnhd,bmhd->bhnm", q, kk) / math.sqrt(c // heads)
        y = torch.einsum("bhnm,bmhd->bnhd", att.softmax(-1), v).reshape(b, -1, c)
        tok = tok + k("ls1.gamma") * (y @ k("attn.proj.weight").T + k("attn.proj.bias"))
        y = ln(tok, k("norm2.weight"), k("norm2.bias")) @ k("mlp.fc1.weight").T + k("mlp.fc1.bias")
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        tok = tok + k("ls2.gamma") * (y @ k("mlp.fc2.weight").T + k("mlp.fc2.bias"))
    return ln(tok, eps=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_matches_reference_dinov2_forward(tmp_path, suffix):
    sd = dinov2_state_dict(TINY)
    path = tmp_path / f"dinov2_tiny{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    encoder = ImageEncoder.from_checkpoint(path, arch=TINY).freeze("cpu")
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    got = encoder(images)
    assert got.shape == (3, 1 + 4 + 16, 32) == (3, encoder.num_tokens(56), encoder.width)
    torch.testing.assert_close(got, reference_forward(sd, TINY, images), atol=2e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_encoder_checkpoint_errors_name_the_keys(tmp_path):
    sd = dinov2_state_dict(TINY)
    del sd["blocks.1.ls2.gamma"]
    sd["head.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match=r"missing \['blocks.1.ls2.gamma'\], unexpected \['head.weight'\]"):
        ImageEncoder.from_checkpoint(tmp_path / "bad.pth", arch=TINY)
    with pytest.raises(EncoderError, match="no checkpoint file"):
        ImageEncoder.from_checkpoint(tmp_path / "absent.pth", arch=TINY)
    with pytest.raises(EncoderError, match="unknown image encoder arch"):
        ImageEncoder.build("dinov2_vitq14")
    # the named TRELLIS arch: DINOv2-L/14 with 4 registers, 1374 tokens of 1024 at 518²
    with torch.device("meta"):
        large = ImageEncoder.build("dinov2_vitl14_reg")
    assert large.num_tokens(518) == 1374 and large.width == 1024
    assert sum(p.numel() for p in large.parameters()) == pytest.approx(304.4e6, rel=0.01)


# -- the per-step view draw ----------------------------------------------------------------------
def test_view_draw_depends_only_on_seed_rank_step_so_resume_redraws_it():
    a = draw_views(64, 8, seed=3, rank=1, step=17)
    assert torch.equal(a, draw_views(64, 8, seed=3, rank=1, step=17))
    assert not torch.equal(a, draw_views(64, 8, seed=3, rank=1, step=18))
    assert not torch.equal(a, draw_views(64, 8, seed=3, rank=0, step=17))
    assert int(a.min()) >= 0 and int(a.max()) < 8 and len(set(a.tolist())) > 4

    encoder = ImageEncoder.build(TINY).freeze("cpu")
    views = torch.randint(0, 256, (4, 3, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = ViewConditioner(encoder, seed=3, rank=0)({"x0": torch.zeros(4), "views": views}, step=5)
    index = draw_views(4, 3, seed=3, rank=0, step=5)
    assert torch.equal(out["view_index"], index) and "views" not in out
    chosen = torch.stack([views[i, index[i]] for i in range(4)]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out["cond"], encoder(chosen))


def test_a_resumed_run_redraws_the_same_views_and_ends_with_the_same_weights():
    """The worker's step on an image corpus (ViewConditioner, then the Engine) run 3 steps straight,
    and 1 step + a restore of student, optimizer and EMA + 2 steps: bit-identical weights."""
    from mdt_ray.config import DistillConfig, TrainConfig
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import build_teacher, student_from
    from mdt_ray.stages import get_stage

    arch = dict(embed_dim=64, depth=1, num_heads=2, patch_size=8, num_register_tokens=4, img_size=32)
    g = torch.Generator().manual_seed(0)
    batches = [{"x0": torch.randn(2, 8, 16, 16, 16, generator=g),
                "views": torch.randint(0, 256, (2, 5, 32, 32, 3), dtype=torch.uint8, generator=g)} for _ in range(3)]
    net = build_teacher("ss-tiny")
    torch.manual_seed(1)
    encoder = ImageEncoder.build(arch).freeze("cpu")
    train = TrainConfig(batch_size=2, lr=1e-3, ema=0.9)

    def engine():  # flow matching: the cheapest objective that feeds the cond through the network
        return Engine(student_from(net), None, stage=get_stage("ss"), distill=DistillConfig(method="fm"), train=train)

    def run(e, steps, seen):
        cond = ViewConditioner(encoder, seed=train.seed, rank=0)
        for step in steps:
            batch = cond(batches[step], step)
            seen.append(batch["view_index"].tolist())
            e.step(batch, step)

    straight, seen_a = engine(), []
    run(straight, range(3), seen_a)
    first, seen_b = engine(), []
    run(first, range(1), seen_b)
    resumed = engine()
    resumed.student.load_state_dict(first.student.state_dict())
    resumed.load_optimizer(*first.optimizer_tensors())
    resumed.ema.load_state_dict(first.ema.state_dict())
    run(resumed, range(1, 3), seen_b)
    assert seen_a == seen_b and len({tuple(s) for s in seen_a}) > 1
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
