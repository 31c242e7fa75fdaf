"""benchmarks/checkpoint_io.py at tiny size: real-layout checkpoints to loopback S3, sync vs background upload."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import checkpoint_io  # noqa: E402
from mdt_ray.train.state import verify_checkpoint  # noqa: E402


def test_sizes_rates_and_the_wait(tmp_path):
    import os

    before = os.environ.get("AWS_ENDPOINT_URL")
    res = checkpoint_io.main(["--models", "ss-tiny", "--wait-model", "ss-tiny", "--step-model", "ss-tiny",
                              "--plot", str(tmp_path / "c.png")])
    assert os.environ.get("AWS_ENDPOINT_URL") == before  # the benchmark's own server is gone; not its env
    (size,) = res["sizes"]
    # student + EMA + two AdamW moments, fp32: four copies of the parameters, plus buffers and JSON
    assert size["bytes"] > 4 * 4 * size["parameters"]
    assert size["write_s"] > 0 and size["upload_s"] > 0
    assert res["extrapolated"]["upload_s"] == 9e9 / (size["upload_gb_s"] * 1e9)
    sync, background = res["wait"]
    assert sync["mode"] == "sync" and background["mode"] == "async"
    assert sync["held_s"] >= sync["upload_s"]  # inline: the loop waits for all of it
    assert background["held_s"] < background["write_s"] + background["upload_s"]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_fake_state_writes_a_verifiable_checkpoint(tmp_path):
    from mdt_ray.train.state import save_checkpoint

    state, params = checkpoint_io.fake_state("ss-tiny")
    save_checkpoint(tmp_path, **state)
    files = verify_checkpoint(tmp_path)["files"]
    assert set(files) == {"student.safetensors", "ema.safetensors", "optimizer.safetensors"}
    assert params > 0
