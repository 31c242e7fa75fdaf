"""A store named only in the config (data.storage_endpoint), not in the environment, reaches every
command that reads a corpus: `mdt-ray eval`, teacher pre-training (both stages) and the corpus
CLI. The credentials stay in the environment; only the endpoint moves to the config.

Also: a manifest read once can be handed to the readers, which then do not read it again."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from mdt_ray.data.corpus import build_synthetic

REPO = Path(__file__).resolve().parents[1]
PACKAGED_TEACHER = REPO / "mdt_ray" / "assets" / "teacher_ss_demo.json"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def s3_corpora(s3_server, s3_bucket):
    """A train and a held-out corpus on the loopback S3 server; returns their bucket."""
    build_synthetic(f"s3://{s3_bucket}/train", 6, seed=0, use_ray=False, workers=1, progress=False)
    build_synthetic(f"s3://{s3_bucket}/eval", 4, seed=1, use_ray=False, workers=1, progress=False)
    return s3_bucket


@pytest.fixture
def endpoint_only_in_config(s3_server, monkeypatch):
    """The server's endpoint, after removing it from the environment: only a config can name it."""
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return s3_server


def test_eval_reads_held_out_corpus_from_configured_endpoint(s3_corpora, endpoint_only_in_config, tmp_path):
    from mdt_ray.cli import eval as evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    data = f"s3://{s3_corpora}/eval"
    report = tmp_path / "report.json"
    args = parser.parse_args([
        str(PACKAGED_TEACHER), "--data", data, "--assets", "4", "--steps", "1", "--teacher", "none",
        "--latency-repeats", "1", "--latency-batch", "2", "--render-assets", "2", "--threads", "1",
        "--out", str(tmp_path / "out"), "--json", str(report),
        "--set", f"data.storage_endpoint={endpoint_only_in_config}", "--set", "tracking.enabled=false"])
    assert evaluate.run(args) == 0
    result = json.loads(report.read_text())
    assert result["data"] == data and result["settings"]["assets"] == 4
    assert np.isfinite(result["steps"]["1"]["fd"])
    # The renders need the synthetic decoder, which comes from the held-out corpus's manifest.
    assert (tmp_path / "out" / "renders.png").is_file()


def test_pretrain_reads_train_and_held_out_corpora_from_configured_endpoint(
        s3_corpora, endpoint_only_in_config, tmp_path):
    from mdt_ray import pretrain

    cfg = pretrain.load_pretrain_config(None, [
        "model.teacher=ss-tiny", "train.steps=2", "train.batch_size=2", "train.log_every=1",
        "train.eval_assets=4", f"data.uri=s3://{s3_corpora}/train", f"data.eval_uri=s3://{s3_corpora}/eval",
        f"data.storage_endpoint={endpoint_only_in_config}", "tracking.enabled=false"])
    lines = []
    summary = pretrain.pretrain(cfg, str(tmp_path / "out"), "t", eval_steps=1, log=lines.append)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert summary["eval"]["assets"] == 4
    assert any(f"6 assets from s3://{s3_corpora}/train" in line for line in lines)


def test_pretrain_slat_reads_corpora_from_configured_endpoint(s3_corpora, endpoint_only_in_config, tmp_path):
    from mdt_ray import pretrain

    cfg = pretrain.load_pretrain_config(None, stage="slat", overrides=[
        "train.steps=2", "train.batch_size=2", "train.log_every=1", "train.eval_assets=2",
        f"data.uri=s3://{s3_corpora}/train", f"data.eval_uri=s3://{s3_corpora}/eval",
        f"data.storage_endpoint={endpoint_only_in_config}", "tracking.enabled=false"])
    summary = pretrain.pretrain(cfg, str(tmp_path), "t", eval_steps=1, log=lambda _: None)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert np.isfinite(summary["eval"]["guided_feat_mse"])


def test_corpus_cli_endpoint_option_reaches_the_store(s3_corpora, endpoint_only_in_config, capsys):
    from mdt_ray.cli import corpus as corpus_cli

    parser = argparse.ArgumentParser()
    corpus_cli.register(parser.add_subparsers(dest="command"))
    uri = f"s3://{s3_corpora}/eval"
    args = parser.parse_args(["corpus", "inspect", uri, "--json", "--endpoint-url", endpoint_only_in_config])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["uri"] == uri and info["num_rows"] == 4


def test_readers_use_the_manifest_they_are_given(tmp_path):
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.data.schema import MANIFEST_FILE, read_manifest

    corpus = str(tmp_path / "c")
    build_synthetic(corpus, 5, seed=2, use_ray=False, workers=1, progress=False)
    manifest = read_manifest(corpus)
    before = load_local(corpus)
    # With the manifest file gone, only the manifest handed in can describe the corpus.
    (tmp_path / "c" / MANIFEST_FILE).unlink()
    after = load_local(corpus, manifest=manifest)
    assert after["asset_id"] == before["asset_id"] and np.array_equal(after["x0"], before["x0"])
    with pytest.raises(ValueError, match="the manifest passed is that of"):
        load_local(str(tmp_path / "other"), manifest=manifest)
