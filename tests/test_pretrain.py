"""Teacher pre-training (mdt_ray/pretrain.py) for both stages: exports that load, runs that
reproduce bit for bit, the learning-rate schedule, the data order, and the settings it refuses.
The held-out eval of a pre-trained teacher is covered by tests/test_eval*.py."""

import math

import pytest
import torch
from safetensors.torch import load_file

from mdt_ray import pretrain
from mdt_ray.cli import build_parser
from mdt_ray.cli import main as cli_main
from mdt_ray.config import ConfigError
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.models import SLatFlowModel, SparseStructureFlowModel, load_trellis

TINY = {"ss": ("ss-tiny", 4, SparseStructureFlowModel), "slat": ("slat-tiny", 2, SLatFlowModel)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pretrain")
    build_synthetic(str(root / "train"), 10, seed=0, progress=False, use_ray=False)
    return root / "train"


def _config(stage: str, corpus, *extra: str):
    teacher, batch, _ = TINY[stage]
    return pretrain.load_pretrain_config(None, [
        f"model.teacher={teacher}", "train.steps=3", f"train.batch_size={batch}", "train.log_every=2",
        f"data.uri={corpus}", "data.eval_uri=null", "tracking.enabled=false", *extra], stage=stage)


@pytest.mark.parametrize("stage", ["ss", "slat"])
def test_pretrain_exports_a_loadable_teacher_and_reproduces_it_bit_for_bit(stage, corpus, tmp_path):
    cfg = _config(stage, corpus)
    lines = []
    first = pretrain.pretrain(cfg, str(tmp_path / "a"), "t", log=lines.append)
    second = pretrain.pretrain(cfg, str(tmp_path / "b"), "t", snapshot_every=2, log=lambda _: None)
    model = load_trellis(first["json"])
    assert isinstance(model, TINY[stage][2])
    assert sum(p.numel() for p in model.parameters()) == first["params"]
    assert math.isfinite(first["final_loss"]) and first["final_loss"] == second["final_loss"]
    assert first["steps"] == 3 and "eval" not in first
    assert any("step 2/3" in line for line in lines) and any("step 3/3" in line for line in lines)
    a, b = load_file(first["safetensors"]), load_file(second["safetensors"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The snapshot of step 2 is an EMA export too, of the same architecture.
    snapshot = load_trellis(tmp_path / "b" / "snapshots" / "t_000002.json")
    assert type(snapshot) is type(model)


def test_lr_warms_up_linearly_then_decays_along_a_cosine():
    total, base = 200, 2.0
    warm = round(pretrain.WARMUP_FRAC * total)
    lrs = [pretrain.lr_at(s, total, base) for s in range(total)]
    assert lrs[:warm] == pytest.approx([base * (s + 1) / warm for s in range(warm)])
    assert lrs[warm] == pytest.approx(base)  # the cosine starts at the base rate
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert pretrain.lr_at(total, total, base) == pytest.approx(pretrain.FINAL_LR_FRAC * base)
    assert pretrain.lr_at(0, 1, base) == base  # a one-step run warms up in that step


def test_batch_order_permutes_each_epoch_and_drops_the_ragged_tail():
    order = pretrain.batch_order(10, 4, seed=3)
    steps = [next(order) for _ in range(6)]
    assert [epoch for _, epoch in steps] == [0, 0, 1, 1, 2, 2]
    for e in range(3):
        seen = torch.cat([idx for idx, epoch in steps if epoch == e])
        assert len(seen) == 8 and len(set(seen.tolist())) == 8
    again = pretrain.batch_order(10, 4, seed=3)
    assert all(torch.equal(idx, next(again)[0]) for idx, _ in steps)
    with pytest.raises(ValueError, match="no full batch"):
        next(pretrain.batch_order(3, 4, seed=0))


@pytest.mark.parametrize("stage, overrides, key", [
    ("ss", ["model.stage=slat"], "model.stage"),
    ("slat", ["model.stage=ss"], "model.stage"),
    ("slat", ["distill.method=mdt"], "distill.method"),
    ("ss", ["scale.num_workers=2"], "scale.num_workers"),
    ("ss", ["train.checkpoint_every=5"], "train.checkpoint_every"),
    ("slat", ["distill.cfg_vm=3"], "distill.cfg_vm"),
    ("slat", ["run.resume=true"], "run.resume"),
])
def test_config_refuses_other_stages_methods_and_unread_keys(stage, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pretrain.load_pretrain_config(None, overrides, stage=stage)


def test_config_refuses_an_unknown_stage_and_accepts_keys_it_reads():
    with pytest.raises(ConfigError, match="model.stage"):
        pretrain.load_pretrain_config(None, stage="dense")
    cfg = pretrain.load_pretrain_config(None, ["train.batch_split=2", "distill.p_uncond=0.2"], stage="slat")
    assert cfg.model.teacher == "slat-tiny" and cfg.train.batch_split == 2


def test_a_teacher_of_the_other_stage_is_refused(corpus, tmp_path):
    cfg = _config("ss", corpus, "model.teacher=slat-tiny")
    with pytest.raises(ConfigError, match="model.teacher 'slat-tiny' is a SLatFlowModel"):
        pretrain.pretrain(cfg, str(tmp_path), "t", log=lambda _: None)


def test_pretrain_slat_teacher_command(corpus, tmp_path, capsys):
    args = build_parser().parse_args(["pretrain-slat-teacher"])
    assert args.stage == "slat" and args.out is None
    assert build_parser().parse_args(["pretrain-teacher"]).stage == "ss"
    common = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", f"data.uri={corpus}",
              "--set", "data.eval_uri=null", "--set", "tracking.enabled=false", "--threads", "1"]
    assert cli_main(["pretrain-slat-teacher", "--out", str(tmp_path), "--name", "s", *common]) == 0
    assert isinstance(load_trellis(tmp_path / "s.json"), SLatFlowModel)
    assert cli_main(["pretrain-teacher", "--out", str(tmp_path), *common, "--set", "distill.method=mdt"]) == 2
    assert "mdt-ray pretrain-teacher: error: distill.method" in capsys.readouterr().err


def test_corpus_errors_name_the_config_key_before_training(corpus, tmp_path, capsys):
    common = ["--out", str(tmp_path), "--set", "train.steps=2", "--set", "train.batch_size=2",
              "--set", "tracking.enabled=false", "--threads", "1"]
    assert cli_main(["pretrain-teacher", *common, "--set", f"data.uri={tmp_path}/nowhere",
                     "--set", "data.eval_uri=null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdt-ray pretrain-teacher: error: data.uri: no corpus at"), err
    # A missing held-out corpus is found before the first step, not after the training.
    assert cli_main(["pretrain-teacher", *common, "--set", f"data.uri={corpus}",
                     "--set", f"data.eval_uri={tmp_path}/no-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mdt-ray pretrain-teacher: error: data.eval_uri: no corpus at"), err
    assert not any("[pretrain] 2 steps" in line for line in err)
