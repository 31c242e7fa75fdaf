"""benchmarks/shards.py at a small shard count (default suite) and at 100 / 1,000 (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shards  # noqa: E402

pytestmark = pytest.mark.ray


def check(res: dict, counts: list[int]) -> None:
    assert [r["shards"] for r in res["runs"]] == counts
    for r, n in zip(res["runs"], counts):
        assert r["rows"] == n  # one row per shard, the whole epoch read
        assert 0 < r["manifest_s"] and 0 < r["verify_s"] and r["manifest_s"] + r["verify_s"] < r["first_batch_s"]
        assert r["first_batch_s"] <= r["epoch_s"]
        assert r["driver_private_mib"] > 0 and r["worker_private_mib"] > 0
        assert r["manifest_bytes"] > 0


def test_small_corpus_reports_every_figure():
    import os

    before = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    res = shards.run([12], base=12, batch=4, cpus=1, epoch_rows=0, log=lambda *_: None)
    check(res, [12])
    # The benchmark's own S3 server is gone: the session's must be what later tests reach.
    assert {k: os.environ.get(k) for k in before} == before


@pytest.mark.slow
def test_shard_counts_100_and_1000(tmp_path):
    res = shards.main(["--counts", "100", "1000", "--json", str(tmp_path / "s.json"),
                       "--plot", str(tmp_path / "s.png")])
    check(res, [100, 1000])
    assert (tmp_path / "s.png").stat().st_size > 0
    # the manifest grows with the shard list, about linearly
    small, big = (r["manifest_bytes"] for r in res["runs"])
    assert 5 * small < big < 20 * small
