"""Image conditioning costs: bytes and feature error of each stored-view encoding, the encoder's
share of a training step on CPU, and the FLOP accounting of DINOv2-L against a TRELLIS-L step.

Views: procedural stand-ins for TRELLIS's 1024² renders_cond frames (synthetic shapes rendered
with the shading of mdt_ray.data.synthetic, coloured by a smooth per-asset colour field plus a
fine texture), through preprocess_view. Feature error: RMS difference of the layer-normed tokens
of a small random DINOv2 (518², patch 14, 1374 tokens) between the stored view and the exact
float view, per token (the tokens have unit variance, so this is relative).

    python benchmarks/image_cond.py [--assets 16] [--batch 8] [--only flops|storage|step_share] [--json out.json]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import timed, write_json  # noqa: E402
from mdt_ray.conditioning import (ImageEncoder, ViewConditioner, decode_view, encode_view, flops_per_image,  # noqa: E402
                                  preprocess_view, view_pixels)
from mdt_ray.data import synthetic  # noqa: E402

ENCODINGS = [("png", 0), ("webp-lossless", 0), ("webp", 95), ("webp", 90), ("webp", 80), ("jpeg", 95), ("jpeg", 90)]
PROBE = dict(embed_dim=128, depth=4, num_heads=4, patch_size=14, num_register_tokens=4, img_size=518)


def stand_in_frame(index: int, size: int = 1024):
    """An RGBA frame of synthetic asset `index`: shaded, coloured, textured, on transparent black."""
    from PIL import Image

    rng = np.random.default_rng([7, index])
    _, occ, _ = synthetic.make_shape(0, index)
    # Rendered at 256² (the renderer's lookup tables grow with the pixel count) and upsampled.
    small = synthetic.render_view(occ, size=256, azimuth=float(45 * (index % 8)), extent=0.8)
    grey = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC)).clip(0, 1)
    grey = np.where(np.asarray(Image.fromarray((small > 0).astype(np.float32)).resize((size, size))) > 0.5, grey, 0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    colour = np.stack([0.5 + 0.5 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(2, 9) * yy + rng.uniform(0, 6))
                       for _ in range(3)], axis=-1)
    texture = rng.normal(0, 0.06, (size // 2, size // 2, 3)).repeat(2, 0).repeat(2, 1)
    rgb = np.clip(grey[..., None] * (0.35 + 0.65 * colour + texture), 0, 1)
    alpha = (grey > 0).astype(np.float32)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    return Image.fromarray(np.rint(rgba * 255).astype(np.uint8), "RGBA")


def storage(assets: int, encoder: ImageEncoder) -> list[dict]:
    frames = [stand_in_frame(i) for i in range(assets)]
    exact = torch.stack([preprocess_view(f) for f in frames])
    with torch.no_grad():
        ref = encoder(exact)
    pixels = [view_pixels(f) for f in frames]
    rows = []
    for fmt, q in ENCODINGS:
        t0 = time.perf_counter()
        blobs = [encode_view(p, fmt, q or 95) for p in pixels]
        encode_ms = (time.perf_counter() - t0) / assets * 1e3
        t0 = time.perf_counter()
        back = np.stack([decode_view(b) for b in blobs])
        decode_ms = (time.perf_counter() - t0) / assets * 1e3
        images = torch.from_numpy(back).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            err = (encoder(images) - ref).pow(2).mean().sqrt().item()
        pix = np.abs(back.astype(np.float32) / 255 - exact.permute(0, 2, 3, 1).numpy()).mean()
        rows.append({"format": fmt + (f" q{q}" if q else ""), "bytes_per_view": float(np.mean([len(b) for b in blobs])),
                     "encode_ms": encode_ms, "decode_ms": decode_ms, "pixel_mae": float(pix), "feature_rms": err})
        print(f"{rows[-1]['format']:>14}: {rows[-1]['bytes_per_view'] / 1024:7.1f} KiB/view  encode {encode_ms:5.1f} ms  "
              f"decode {decode_ms:5.1f} ms  pixel MAE {pix:.5f}  feature RMS {err:.5f}", flush=True)
    # The scale of that error: the same metric between two different assets' views.
    other = (ref[1:] - ref[:-1]).pow(2).mean().sqrt().item()
    print(f"feature RMS between different assets: {other:.3f}")
    return rows + [{"format": "between assets", "feature_rms": other}]


def step_share(batch: int, repeats: int) -> dict:
    """Wall time of the encoder on a batch vs an MDT-dist step of the demo teacher, on CPU."""
    from mdt_ray.config import DistillConfig, TrainConfig
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import build_teacher, freeze, student_from
    from mdt_ray.stages import get_stage

    out = {}
    for name, arch, side in (("64² views, width 64, 2 blocks", dict(embed_dim=64, depth=2, num_heads=2, patch_size=8,
                                                                    num_register_tokens=4, img_size=64), 64),
                             ("518² views, width 64, 2 blocks", dict(embed_dim=64, depth=2, num_heads=2, patch_size=14,
                                                                     num_register_tokens=4, img_size=518), 518)):
        teacher = build_teacher("ss-demo")
        student = student_from(teacher)
        teacher = freeze(teacher, torch.device("cpu"), False)
        engine = Engine(student, teacher, stage=get_stage("ss"), distill=DistillConfig(), train=TrainConfig(batch_size=batch))
        cond = ViewConditioner(ImageEncoder.build(arch).freeze("cpu"), seed=0, rank=0)
        views = torch.randint(0, 256, (batch, 4, side, side, 3), dtype=torch.uint8)
        x0 = torch.randn(batch, 8, 16, 16, 16)
        tokens = cond({"x0": x0, "views": views}, 0)["cond"]
        t_enc = timed(lambda: cond({"x0": x0, "views": views}, 0), repeats)
        t_step = timed(lambda: engine.step({"x0": x0, "cond": tokens}, 0), repeats)
        out[name] = {"encoder_s": t_enc, "step_s": t_step, "share": t_enc / (t_enc + t_step),
                     "tokens": tuple(tokens.shape[1:])}
        print(f"{name}: encoder {t_enc * 1e3:.0f} ms, MDT-dist step (ss-demo, batch {batch}) {t_step * 1e3:.0f} ms, "
              f"encoder share {100 * t_enc / (t_enc + t_step):.1f} %", flush=True)
    return out


def flops() -> dict:
    from mdt_ray.conditioning.encoder import flop_counter
    from mdt_ray.models import build_model

    enc = flops_per_image("dinov2_vitl14_reg")
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Fake CPU tensors, not the meta device: the model asks its inputs' device type for autocast.
    with FakeTensorMode():
        model = build_model("ss-L", use_fp16=False)  # the dtype changes no FLOP count
        x, t, c = torch.zeros(1, 8, 16, 16, 16), torch.zeros(1), torch.zeros(1, 1374, 1024)
        with flop_counter() as counter:
            model(x, t, c)
    fwd = counter.get_total_flops()
    result = {"dinov2_l_tflop_per_image": enc / 1e12, "ss_L_forward_tflop_per_sample": fwd / 1e12}
    for label, passes in (("floor 13 forward passes", 13.0), ("measured 14.4 forward passes", 14.4)):
        share = enc / (enc + passes * fwd)
        result[f"share_{label.split()[0]}"] = share
        print(f"DINOv2-L {enc / 1e12:.3f} TFLOP/image; ss-L forward {fwd / 1e12:.3f} TFLOP/sample; MDT-dist step "
              f"({label}) {passes * fwd / 1e12:.1f} TFLOP; encoder share {100 * share:.2f} %")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=["flops", "storage", "step_share"], help="run one part")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    probe = ImageEncoder.build(PROBE).freeze("cpu")
    parts = {"flops": flops, "storage": lambda: storage(args.assets, probe),
             "step_share": lambda: step_share(args.batch, args.repeats)}
    result = {name: run() for name, run in parts.items() if args.only in (None, name)}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
