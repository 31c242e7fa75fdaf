"""The batch watchdog: a stall inside the input pipeline's `next()` becomes an error that says
where the worker waits, instead of a hang; without a stall the batches and positions are those
of the plain iterator."""

from __future__ import annotations

import threading
import time

import pytest

from mdt_ray.config import TrainConfig
from mdt_ray.train.position import Batches, BatchTimeoutError, Position, ShardTooSmallError


def _stalling(stall_at: int, release: threading.Event, stall_epoch: int = 0):
    """Epochs of 3 batches; batch `stall_at` of epoch `stall_epoch` waits until `release` is set."""

    def batches_of(epoch):
        for i in range(3):
            if epoch == stall_epoch and i == stall_at:
                release.wait(60)
            yield f"e{epoch}b{i}"

    return batches_of


def test_a_stalled_batch_raises_and_says_where_it_waits():
    release = threading.Event()
    batches = Batches(_stalling(2, release), batch_size=4, timeout_s=0.5,
                      describe=lambda: "rank 1 of 2; 0 of the cluster's 2 CPUs are free")
    assert [next(batches), next(batches)] == ["e0b0", "e0b1"]
    t0 = time.monotonic()
    with pytest.raises(BatchTimeoutError) as info:
        next(batches)
    waited = time.monotonic() - t0
    msg = str(info.value)
    assert "no batch of 4 arrived for 0.5 s (train.batch_timeout_s)" in msg
    assert "after epoch 0 batch 1" in msg
    assert msg.endswith("rank 1 of 2; 0 of the cluster's 2 CPUs are free")
    assert waited >= 0.5
    # The stalled fetch is abandoned: a batch arriving late is never handed out as the next one.
    release.set()
    with pytest.raises(BatchTimeoutError):
        next(batches)
    assert batches.position == Position(0, 1)
    batches.close()


def test_a_stall_before_the_first_batch_names_the_epoch_and_survives_a_failing_diagnostic():
    release = threading.Event()

    def broken():
        raise ConnectionError("GCS unreachable")

    batches = Batches(_stalling(0, release, stall_epoch=3), batch_size=2, start=Position(3, -1), timeout_s=0.2,
                      describe=broken)
    with pytest.raises(BatchTimeoutError, match=r"the first batch of epoch 3.*ConnectionError: GCS unreachable"):
        next(batches)
    release.set()


def test_with_a_timeout_the_batches_and_positions_are_those_of_the_plain_iterator():
    def batches_of(epoch):
        return iter([f"e{epoch}b{i}" for i in range(3)])

    plain = Batches(batches_of, batch_size=4, start=Position(0, 1))
    timed = Batches(batches_of, batch_size=4, start=Position(0, 1), timeout_s=30)
    for _ in range(5):
        assert next(plain) == next(timed) and plain.position == timed.position
    assert timed.position == Position(2, 0)
    timed.close()


def test_an_error_inside_the_pipeline_comes_through_the_watchdog_unchanged():
    timed = Batches(lambda epoch: iter([]), batch_size=4, timeout_s=30)
    with pytest.raises(ShardTooSmallError, match="no full batch of 4"):
        next(timed)

    def failing(epoch):
        yield "e0b0"
        raise ValueError("shard s-0003.parquet: asset 'a17' has non-finite values")

    timed = Batches(failing, batch_size=4, timeout_s=30)
    assert next(timed) == "e0b0"
    with pytest.raises(ValueError, match="a17"):
        next(timed)


def test_the_watchdog_is_on_by_default_and_zero_turns_it_off():
    assert TrainConfig().batch_timeout_s == 300
    assert TrainConfig(batch_timeout_s=0).batch_timeout_s == 0
    with pytest.raises(ValueError):
        TrainConfig(batch_timeout_s=-1)


class _Shard:
    def __init__(self, stats: str = "", hang: bool = False):
        self._stats, self._hang = stats, hang

    def stats(self) -> str:
        if self._hang:
            threading.Event().wait(60)
        return self._stats


STATS = """Operator 0 ReadFiles: \n\nOperator 1 ListFiles: 1 tasks executed, 1 blocks produced in 8.69s
* Remote wall time: 8.69s min, 8.69s max, 8.69s mean, 8.69s total
Operator 2 ReadFilesParquetV2: 1 tasks executed, 1 blocks produced in 0.01s
Dataset iterator time breakdown:
* Total time overall: 13.95s
"""


def test_ray_datas_operators_are_summed_up_in_one_line_and_a_silent_coordinator_is_said():
    from mdt_ray.train.loop import _data_progress

    line = _data_progress(_Shard(STATS))
    assert line == ("Ray Data operators: ReadFiles nothing done yet; ListFiles 1 tasks executed, 1 blocks produced "
                    "in 8.69s; ReadFilesParquetV2 1 tasks executed, 1 blocks produced in 0.01s")
    assert _data_progress(_Shard("")) == ""
    assert _data_progress(_Shard(hang=True), wait_s=0.2) == "Ray Data's stats gave no answer within 0.2 s"


def _stopped_by_the_watchdog(code: str):
    """Run `code` in a fresh interpreter; it must be ended by a watchdog (exit 70) well within a minute."""
    import subprocess
    import sys

    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 70, out.stdout + out.stderr
    assert time.monotonic() - t0 < 60
    return out


def test_an_upload_that_outlasts_its_limit_stops_the_worker_process_with_a_message():
    """The checkpoint-upload watchdog (train.upload_timeout_s): a block that does not return in
    time ends the process (Ray Train then restarts the workers from the last complete
    checkpoint); one that returns in time leaves it running."""
    code = ("import time\nfrom mdt_ray.train.loop import _upload_watchdog\n"
            "with _upload_watchdog(7, 's3://b/runs (at http://127.0.0.1:1)', 5.0):\n    time.sleep(0.1)\n"
            "print('in time', flush=True)\n"
            "with _upload_watchdog(8, 's3://b/runs (at http://127.0.0.1:1)', 0.5):\n    time.sleep(60)\n"
            "print('not reached', flush=True)\n")
    out = _stopped_by_the_watchdog(code)
    assert out.stdout.splitlines()[0] == "in time" and "not reached" not in out.stdout
    assert "checkpoint upload of step 8 to s3://b/runs (at http://127.0.0.1:1) has not finished after 0.5 s" \
        " (train.upload_timeout_s)" in out.stdout


def test_the_upload_watchdog_also_stops_the_process_from_a_background_upload_thread():
    """With train.async_upload the upload runs in Ray Train's thread pool, not the training
    thread: the watchdog started there ends the process all the same while training goes on."""
    code = ("import time\nfrom concurrent.futures import ThreadPoolExecutor\n"
            "from mdt_ray.train.loop import _upload_watchdog\n"
            "def upload():\n    with _upload_watchdog(9, 's3://b/runs', 0.5):\n        time.sleep(60)\n"
            "ThreadPoolExecutor(1).submit(upload)\n"
            "for i in range(600):\n    time.sleep(0.1)\n    print('step', i, flush=True)\n")
    out = _stopped_by_the_watchdog(code)
    assert "checkpoint upload of step 9 to s3://b/runs has not finished after 0.5 s" in out.stdout
    assert "step 0" in out.stdout and "step 599" not in out.stdout  # training ran until the stop
