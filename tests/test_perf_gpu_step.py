"""benchmarks/gpu_step.py's CPU smoke mode: the accelerator script runs end to end on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_step  # noqa: E402


def check(res: dict, stage: str) -> None:
    assert res["stage"] == stage and res["device"] == "cpu"
    assert res["flops_per_step"] > 0 and res["step_s"] > 0
    assert res["mfu"] == pytest.approx(res["flops_per_step"] / res["step_s"] / 1e9)  # --peak-tflops 0.001
    split = res["split"]
    for key in ("teacher_s", "student_grad_fwd_s", "student_nograd_fwd_s", "backward_s", "optimizer_ema_s"):
        assert split[key] > 0, key
    parts = sum(v for k, v in split.items() if k not in ("total_s", "other_s"))
    assert parts <= split["total_s"] * 1.001
    assert any("scaled_dot_product" in k for k in res["sdpa_kernels"])


def test_cpu_smoke_stage1_with_options(tmp_path):
    out = tmp_path / "ss.json"
    res = gpu_step.main(["--cpu-smoke", "--stage", "ss", "--batch", "2", "--steps", "1", "--warmup", "0",
                         "--fused-adamw", "--checkpointing", "--peak-tflops", "0.001", "--json", str(out)])
    check(res, "ss")
    assert json.loads(out.read_text())["options"] == {"compile": False, "fused_adamw": True, "checkpointing": True,
                                                      "sdpa": "auto"}


@pytest.mark.slow
def test_cpu_smoke_stage2():
    res = gpu_step.main(["--cpu-smoke", "--stage", "slat", "--batch", "2", "--voxels", "100", "--steps", "1",
                         "--warmup", "0", "--sdpa", "math", "--peak-tflops", "0.001"])
    check(res, "slat")
    assert res["voxels_per_asset"] == 100


def test_cuda_without_a_device_is_one_clear_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_step.main(["--stage", "ss"])
