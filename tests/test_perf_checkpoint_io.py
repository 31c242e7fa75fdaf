"""benchmarks/checkpoint_io.py at tiny size: real-layout checkpoints to loopback S3, sync vs background upload,
with a thread and through the training loop's report path in a real Ray Train run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import checkpoint_io  # noqa: E402
from mdt_ray.train.state import verify_checkpoint  # noqa: E402


def test_sizes_rates_and_the_wait(tmp_path):
    import os

    before = os.environ.get("AWS_ENDPOINT_URL")
    res = checkpoint_io.main(["--models", "ss-tiny", "--wait-model", "ss-tiny", "--step-model", "ss-tiny",
                              "--wait", "sync", "async", "--plot", str(tmp_path / "c.png")])
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


@pytest.mark.ray
@pytest.mark.slow  # a Ray Train run of its own: ~20 s
def test_the_wait_through_ray_trains_async_report(ray_local):
    res = checkpoint_io.main(["--models", "ss-tiny", "--wait-model", "ss-tiny", "--step-model", "ss-tiny",
                              "--wait", "ray-async"])
    (r,) = res["wait"]
    assert r["mode"] == "ray-async" and r["tensor_bytes"] > 0 and r["upload_s"] > 0 and r["write_s"] > 0
    # The report returned before the write and upload were done: the loop was held for the copy
    # to host memory and the store probe only, and the upload's scratch copy is gone.
    assert r["copy_s"] <= r["held_s"] < r["write_s"] + r["upload_s"]
    assert not r["scratch_left"]


def test_fake_state_writes_a_verifiable_checkpoint(tmp_path):
    from mdt_ray.train.state import save_checkpoint

    state, params = checkpoint_io.fake_state("ss-tiny")
    save_checkpoint(tmp_path, **state)
    files = verify_checkpoint(tmp_path)["files"]
    assert set(files) == {"student.safetensors", "ema.safetensors", "optimizer.safetensors"}
    assert params > 0
