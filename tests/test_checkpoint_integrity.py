"""A checkpoint counts only when every file its state.json lists is there, whole: truncated,
missing and same-size corrupted files are refused by name, a resume falls back to the newest
complete checkpoint (local and on S3), and scratch folders go on every path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from mdt_ray.train.state import (STATE_FILE, CheckpointDamagedError, RunDir, latest_complete, load_checkpoint,
                                 save_checkpoint, scratch_dir)


def _write(directory: Path, step: int, *, trellis: bool = False) -> None:
    g = torch.Generator().manual_seed(step)
    student = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    if trellis:
        (directory / "trellis").mkdir(parents=True)
        (directory / "trellis" / "s.json").write_text('{"name": "X", "args": {}}')
    save_checkpoint(directory, student=student, ema={k: v * 0.5 for k, v in student.items()},
                    optimizer=({"w.exp_avg": torch.zeros(64, 64)}, [{"lr": 1e-4}]), meta={"step": step})


def _run_dir(root: Path, steps=(2, 4)) -> RunDir:
    for step in steps:
        _write(root / f"checkpoint_{step:08d}", step)
    (root / "mdt_ray_run.json").write_text("{}")  # run metadata beside the checkpoints is no candidate
    return RunDir(None, str(root))


def test_state_json_lists_every_file_with_size_and_hash(tmp_path):
    _write(tmp_path, 3, trellis=True)
    meta = json.loads((tmp_path / STATE_FILE).read_text())
    assert set(meta["files"]) == {"student.safetensors", "ema.safetensors", "optimizer.safetensors", "trellis/s.json"}
    for name, entry in meta["files"].items():
        assert entry["bytes"] == (tmp_path / name).stat().st_size and len(entry["sha256"]) == 64
    state = load_checkpoint(tmp_path)
    assert state["meta"]["step"] == 3 and state["meta"]["param_groups"] == [{"lr": 1e-4}]
    assert set(state) == {"meta", "student", "optimizer", "ema"}
    assert not list(tmp_path.glob(".*partial"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _delete(path: Path) -> None:
    path.unlink()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor bytes: the header still parses, the size is unchanged
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (_truncate, r"student.safetensors has \d+ bytes, state.json lists \d+"),
    (_delete, r"student.safetensors is missing"),
    (_flip, r"student.safetensors does not match the sha256"),
])
def test_a_damaged_file_is_refused_by_name(tmp_path, damage, expected):
    _write(tmp_path, 1)
    damage(tmp_path / "student.safetensors")
    with pytest.raises(CheckpointDamagedError, match=expected):
        load_checkpoint(tmp_path)


def test_a_damaged_trellis_export_counts_too(tmp_path):
    _write(tmp_path, 1, trellis=True)
    (tmp_path / "trellis" / "s.json").write_text('{"name": "Y", "args": {}}')
    with pytest.raises(CheckpointDamagedError, match="trellis/s.json does not match"):
        load_checkpoint(tmp_path)


def test_without_state_json_or_with_a_cut_one_there_is_no_checkpoint(tmp_path):
    _write(tmp_path, 1)
    (tmp_path / STATE_FILE).write_text('{"step": 1, "fil')
    with pytest.raises(CheckpointDamagedError, match="state.json is unreadable"):
        load_checkpoint(tmp_path)
    (tmp_path / STATE_FILE).unlink()
    with pytest.raises(CheckpointDamagedError, match="has no state.json"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_from_before_the_file_list_loads_unless_a_file_is_cut(tmp_path):
    _write(tmp_path, 1)
    meta = json.loads((tmp_path / STATE_FILE).read_text())
    del meta["files"]
    (tmp_path / STATE_FILE).write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path)["meta"]["step"] == 1
    _truncate(tmp_path / "optimizer.safetensors")
    with pytest.raises(CheckpointDamagedError, match="optimizer.safetensors does not load"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", [_truncate, _delete, _flip])
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage):
    run = _run_dir(tmp_path, steps=(2, 4, 6))
    damage(tmp_path / "checkpoint_00000006" / "ema.safetensors")
    _truncate(tmp_path / "checkpoint_00000004" / "optimizer.safetensors")
    assert run.checkpoint_names() == ["checkpoint_00000006", "checkpoint_00000004", "checkpoint_00000002"]
    found = latest_complete(run)
    assert found.name == "checkpoint_00000002" and found.state["meta"]["step"] == 2
    assert len(found.skipped) == 2
    assert "checkpoint_00000006" in found.skipped[0] and "ema.safetensors" in found.skipped[0]
    assert "checkpoint_00000004" in found.skipped[1] and "optimizer.safetensors" in found.skipped[1]


def test_a_step_written_again_after_a_fallback_is_newer_than_its_damaged_namesake(tmp_path):
    run = _run_dir(tmp_path, steps=(2, 4, 6))
    _write(tmp_path / "checkpoint_00000004.1", 40)
    _write(tmp_path / "checkpoint_00000004.2", 41)
    (tmp_path / "checkpoint_00000006" / "student.safetensors").unlink()
    (tmp_path / "checkpoint_notes").mkdir()
    assert run.checkpoint_names() == ["checkpoint_00000006", "checkpoint_00000004.2", "checkpoint_00000004.1",
                                      "checkpoint_00000004", "checkpoint_00000002"]
    assert latest_complete(run).state["meta"]["step"] == 41


def test_an_intact_latest_checkpoint_is_taken_as_it_is(tmp_path):
    found = latest_complete(_run_dir(tmp_path))
    assert found.name == "checkpoint_00000004" and found.skipped == []


def test_checkpoints_that_are_all_damaged_refuse_to_resume_rather_than_start_over(tmp_path):
    run = _run_dir(tmp_path)
    _delete(tmp_path / "checkpoint_00000002" / "student.safetensors")
    (tmp_path / "checkpoint_00000004" / STATE_FILE).unlink()
    with pytest.raises(CheckpointDamagedError, match="2 checkpoint.*none is complete") as info:
        latest_complete(run)
    assert "checkpoint_00000002: student.safetensors is missing" in str(info.value)
    assert "checkpoint_00000004 has no state.json" in str(info.value)


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    assert latest_complete(RunDir(None, str(tmp_path / "absent"))) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mdt_ray_run.json").write_text("{}")
    assert latest_complete(RunDir(None, str(tmp_path / "run"))) is None


def _restore_scratch() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("mdt-restore-*")}


def test_resume_from_s3_falls_back_past_a_truncated_upload(s3_server, s3_bucket, tmp_path):
    from mdt_ray.data.storage import StorageTarget

    _run_dir(tmp_path / "local")
    _truncate(tmp_path / "local" / "checkpoint_00000004" / "student.safetensors")
    fs, bare = StorageTarget(f"s3://{s3_bucket}/runs/r").pyarrow_fs()
    pafs.copy_files(str(tmp_path / "local"), bare, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    before = _restore_scratch()
    run = RunDir(fs, bare)
    assert run.checkpoint_names() == ["checkpoint_00000004", "checkpoint_00000002"]
    found = latest_complete(run)
    assert found.name == "checkpoint_00000002"
    assert found.skipped and f"{bare}/checkpoint_00000004: student.safetensors has" in found.skipped[0]
    original = load_checkpoint(tmp_path / "local" / "checkpoint_00000002")
    assert torch.equal(found.state["student"]["w"], original["student"]["w"])
    assert _restore_scratch() == before  # each downloaded candidate's scratch copy is gone


def test_scratch_dir_is_removed_on_success_and_on_failure():
    with scratch_dir() as d:
        (d / "student.safetensors").write_bytes(b"x" * 10)
        kept = d
    assert not kept.exists()
    with pytest.raises(OSError, match="upload failed"):
        with scratch_dir() as d:
            (d / "f").write_text("x")
            kept = d
            raise OSError("upload failed")
    assert not kept.exists() and os.path.basename(kept).startswith("mdt-ckpt-")


def test_a_deferred_checkpoint_holds_the_state_of_when_it_was_taken(tmp_path):
    from mdt_ray.train.state import DeferredCheckpoint

    student = {"w": torch.ones(8, 8), "b": torch.zeros(8)}
    exp_avg, groups, meta = torch.zeros(8, 8), [{"lr": 1e-4}], {"step": 5, "clip_history": [1.0]}
    deferred = DeferredCheckpoint(tmp_path / "c", student=student, ema=None, optimizer=({"w.exp_avg": exp_avg}, groups),
                                  meta=meta)
    # What the training loop goes on to do before the upload thread writes the copy.
    student["w"].mul_(3)
    exp_avg.add_(1)
    groups[0]["lr"] = 2e-4
    meta["clip_history"].append(9.0)
    deferred.write()
    state = load_checkpoint(tmp_path / "c")
    assert torch.equal(state["student"]["w"], torch.ones(8, 8)) and torch.equal(state["optimizer"]["w.exp_avg"],
                                                                                torch.zeros(8, 8))
    assert state["meta"]["param_groups"] == [{"lr": 1e-4}] and state["meta"]["clip_history"] == [1.0]
    assert "ema" not in state and deferred.seconds > 0
    # A retried upload calls it again: the files are not written twice.
    before = (tmp_path / "c" / STATE_FILE).stat().st_mtime_ns
    deferred.write()
    assert (tmp_path / "c" / STATE_FILE).stat().st_mtime_ns == before


def test_files_written_here_load_with_safetensors_at_every_dtype(tmp_path):
    from safetensors.torch import load_file

    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "f64": torch.randn(3).double(), "i64": torch.arange(6), "i32": torch.arange(3).int(),
               "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(7.0), "empty": torch.zeros(0, 3), "strided": torch.randn(4, 6)[:, ::2]}
    save_checkpoint(tmp_path, student=tensors, ema=None, optimizer=({}, []), meta={"step": 1})
    loaded = load_file(str(tmp_path / "student.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with pytest.raises(TypeError, match="tensor 'c' has dtype torch.complex64"):
        save_checkpoint(tmp_path / "x", student={"c": torch.zeros(2, dtype=torch.complex64)}, ema=None,
                        optimizer=({}, []), meta={})
