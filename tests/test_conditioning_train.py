"""The image path end to end: a synthetic corpus of condition views on S3 (moto on loopback), a
tiny DINOv2-architecture encoder (random frozen weights, DINOv2's key layout) beside the teacher
on a Ray Train worker, the drawn view encoded inside every step; and the checks that refuse a run
before Ray starts when the encoder is missing or does not fit the teacher."""

from pathlib import Path

import pytest
import torch

from mdt_ray.config import load_config
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.data.schema import read_manifest
from mdt_ray.train.launch import RunError, check_compatible, distill
from mdt_ray.train.state import load_checkpoint
from tests.test_conditioning import dinov2_state_dict

REPO = Path(__file__).resolve().parents[1]
# ss-tiny's cond_channels is 64; the synthetic views are 64², 8-pixel patches: 1 + 4 + 64 tokens.
ENCODER = dict(embed_dim=64, depth=1, num_heads=2, patch_size=8, num_register_tokens=4, img_size=64)


def _arch(arch):
    return "{" + ", ".join(f"{k}: {v}" for k, v in arch.items()) + "}"


def _cfg(tmp_path, data, *sets, arch=ENCODER):
    return load_config(REPO / "jobs/configs/demo.yaml", [
        f"data.uri={data}", "data.eval_uri=null", "model.teacher=ss-tiny",
        f"model.image_encoder={tmp_path}/dinov2_tiny.pth", f"model.image_encoder_arch={_arch(arch)}",
        "train.batch_size=4", "train.log_every=2", f"run.storage_path={tmp_path}/runs",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *sets])


def test_image_corpus_config_errors_before_ray(tmp_path):
    build_synthetic(str(tmp_path / "views"), 4, views=2, progress=False, workers=1)
    build_synthetic(str(tmp_path / "tokens"), 4, progress=False, workers=1)
    torch.save(dinov2_state_dict(ENCODER), tmp_path / "dinov2_tiny.pth")
    views, tokens = read_manifest(str(tmp_path / "views")), read_manifest(str(tmp_path / "tokens"))
    check_compatible(_cfg(tmp_path, tmp_path / "views"), views)  # fits
    with pytest.raises(RunError, match=r"condition images \(2 view\(s\) per asset\) but no model.image_encoder"):
        check_compatible(_cfg(tmp_path, tmp_path / "views", "model.image_encoder=null"), views)
    with pytest.raises(RunError, match="tokens of width 32, the teacher's cond_channels is 64"):
        check_compatible(_cfg(tmp_path, tmp_path / "views", arch={**ENCODER, "embed_dim": 32}), views)
    with pytest.raises(RunError, match="model.image_encoder: no checkpoint file"):
        check_compatible(_cfg(tmp_path, tmp_path / "views", f"model.image_encoder={tmp_path}/none.pth"), views)
    with pytest.raises(RunError, match="holds cond tokens, not images; unset it"):
        check_compatible(_cfg(tmp_path, tmp_path / "tokens"), tokens)


@pytest.mark.ray
def test_tiny_dinov2_encodes_drawn_views_through_ray_train(ray_local, s3_server, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/views"
    build_synthetic(uri, 16, views=3, progress=False, workers=1)
    build_synthetic(str(tmp_path / "eval"), 8, seed=1, views=3, progress=False, workers=1)
    torch.save(dinov2_state_dict(ENCODER), tmp_path / "dinov2_tiny.pth")
    cfg = _cfg(tmp_path, uri, f"data.eval_uri={tmp_path}/eval", "train.steps=2", "train.checkpoint_every=2",
               "tracking.enabled=false",
               "train.eval_assets=8", "train.eval_steps=[1]", "run.name=views")
    out = distill(cfg)
    assert out.metrics["step"] == 2 and "eval_fd_1step" in out.metrics
    state = load_checkpoint(out.checkpoint)
    assert state["meta"]["step"] == 2
    # The encoder stays outside the student, its optimizer and its EMA.
    encoder_keys = ("register_tokens", "mask_token", "ls1.gamma", "patch_embed.proj")
    for part in ("student", "optimizer", "ema"):
        assert not any(m in k for k in state[part] for m in encoder_keys), part
