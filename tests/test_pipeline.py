"""TRELLIS pipeline folders in and out: a teacher from a pipeline folder or a Hub id (a local
folder laid out like the Hugging Face cache, HF_HUB_OFFLINE=1: nothing downloads), and the
`export-pipeline` folder read the way TRELLIS's own from_pretrained reads one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdt_ray.cli import main
from mdt_ray.models import load_trellis
from mdt_ray.models.checkpoint import export_trellis
from mdt_ray.models.pipeline import PipelineError, export_pipeline, resolve_teacher, stage_checkpoint
from mdt_ray.models.registry import model_classes
from mdt_ray.models.teachers import build_teacher, teacher_spec
from mdt_ray.stages import STUDENT_SAMPLER

FIXTURES = Path(__file__).parent / "fixtures" / "trellis"
REPO, REV = "microsoft/TRELLIS-image-large", "0123456789abcdef0123456789abcdef01234567"
MODELS = {"sparse_structure_flow_model": ("ckpts/ss_flow_img_dit_L_16l8_fp16", "ss_flow_tiny"),
          "slat_flow_model": ("ckpts/slat_flow_img_dit_L_64l8p2_fp16", "slat_flow_tiny")}


def _pipeline_json() -> dict:
    sampler = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5}}
    return {"name": "TrellisImageTo3DPipeline", "args": {
        "models": {**{k: v[0] for k, v in MODELS.items()}, "sparse_structure_decoder": "ckpts/ss_dec_tiny"},
        "sparse_structure_sampler": {**sampler, "params": {"steps": 25, "cfg_strength": 7.5,
                                                            "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}},
        "slat_sampler": {**sampler, "params": {"steps": 25, "cfg_strength": 3.0, "cfg_interval": [0.5, 1.0],
                                               "rescale_t": 3.0}},
        "slat_normalization": {"mean": [0.0] * 8, "std": [1.0] * 8}, "image_cond_model": "dinov2_vitl14_reg"}}


def _write_pipeline(folder: Path, pipeline: dict | None = None) -> Path:
    (folder / "ckpts").mkdir(parents=True)
    (folder / "pipeline.json").write_text(json.dumps(pipeline or _pipeline_json()))
    for rel, fixture in MODELS.values():
        for suffix in (".json", ".safetensors"):
            shutil.copy(FIXTURES / f"{fixture}{suffix}", folder / f"{rel}{suffix}")
    # A stand-in for a decoder: any other model must reach the output folder untouched.
    (folder / "ckpts/ss_dec_tiny.json").write_text('{"name": "SparseStructureDecoder", "args": {}}')
    (folder / "ckpts/ss_dec_tiny.safetensors").write_bytes(b"decoder bytes")
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HF_HOME with microsoft/TRELLIS-image-large cached at revision REV (refs/main points at it),
    laid out as huggingface_hub writes its cache, and the Hub switched off."""
    import huggingface_hub.constants as hf

    home = tmp_path / "hf"
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    _write_pipeline(repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, at import: point an imported copy at them too.
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / REV


def _trellis_load(folder: Path) -> tuple[dict, dict]:
    """pipeline.json read as trellis/pipelines/base.py and trellis_image_to_3d.py read it: each
    args.models path relative to the folder, `<path>.json` naming a class built with its args and
    `<path>.safetensors` loaded strictly into it; each sampler built from name/args, its
    settings from `params`. Returns (flow models by name, sampler settings by stage key)."""
    args = json.loads((folder / "pipeline.json").read_text())["args"]
    flows = {}
    for key, rel in args["models"].items():
        config = json.loads((folder / f"{rel}.json").read_text())
        if key not in MODELS:
            continue
        assert config["name"] in ("SparseStructureFlowModel", "SLatFlowModel")  # TRELLIS's class names
        model = model_classes()[config["name"]](**config["args"])
        model.load_state_dict(load_file(str(folder / f"{rel}.safetensors")), strict=True)
        flows[key] = model
    samplers = {}
    for key in ("sparse_structure_sampler", "slat_sampler"):
        assert args[key]["name"] == "FlowEulerGuidanceIntervalSampler" and set(args[key]["args"]) == {"sigma_min"}
        samplers[key] = args[key]["params"]
    return flows, samplers


def test_teacher_from_pipeline_folder_and_hub_id(hub, tmp_path):
    folder = _write_pipeline(tmp_path / "local")
    assert stage_checkpoint(str(folder), "ss") == folder / "ckpts/ss_flow_img_dit_L_16l8_fp16.json"
    for spec in (str(folder), REPO, f"{REPO}@{REV}"):
        for stage, fixture in (("ss", "ss_flow_tiny"), ("slat", "slat_flow_tiny")):
            assert teacher_spec(spec, stage) == json.loads((FIXTURES / f"{fixture}.json").read_text())
        teacher = build_teacher(spec, stage="ss")
        want = load_trellis(FIXTURES / "ss_flow_tiny.json").state_dict()
        assert all(torch.equal(v, want[k]) for k, v in teacher.state_dict().items())
    assert Path(resolve_teacher(REPO, "slat")).resolve().is_relative_to(hub.parents[1])
    assert resolve_teacher("ss-demo", "ss") == "ss-demo"


def test_pipeline_teacher_errors_are_one_line(hub, tmp_path):
    (tmp_path / "nopipe").mkdir()
    cases = {str(tmp_path / "nopipe"): "no pipeline.json",
             "microsoft/TRELLIS-nope": "'microsoft/TRELLIS-nope'",
             f"{REPO}@ffffffffffffffffffffffffffffffffffffffff": "ffffffffffffffffffffffffffffffffffffffff"}
    for spec, words in cases.items():
        with pytest.raises(PipelineError) as e:
            stage_checkpoint(spec, "ss")
        assert words in str(e.value) and "\n" not in str(e.value)
    pipeline = _pipeline_json()
    del pipeline["args"]["models"]["slat_flow_model"]
    folder = _write_pipeline(tmp_path / "ssonly", pipeline)
    with pytest.raises(PipelineError, match="no slat_flow_model .*model.stage 'slat'"):
        teacher_spec(str(folder), "slat")
    (folder / "ckpts/ss_flow_img_dit_L_16l8_fp16.safetensors").unlink()
    with pytest.raises(PipelineError, match="ss_flow_img_dit_L_16l8_fp16.safetensors does not exist"):
        stage_checkpoint(str(folder), "ss")


def _student(tmp_path: Path, fixture: str, name: str) -> Path:
    """A run checkpoint folder holding a student: the fixture's weights nudged, with a state.json."""
    ckpt = tmp_path / name / "checkpoint_000002"
    model = load_trellis(FIXTURES / f"{fixture}.json")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    export_trellis(model, ckpt / "trellis", "student")
    state = {"step": 40, "metrics": {"eval_fd_1step": 0.25}, "mlflow_run_id": None,
             "config": {"model": {"teacher": REPO}, "distill": {"lambda_mdt": 1.0}, "train": {"steps": 40, "batch_size": 8}}}
    (ckpt / "state.json").write_text(json.dumps(state))
    return tmp_path / name


@pytest.mark.parametrize("steps", [1, 2])
def test_export_pipeline_loads_as_trellis_reads_it(hub, tmp_path, steps):
    ss, slat = _student(tmp_path, "ss_flow_tiny", "ss_run"), _student(tmp_path, "slat_flow_tiny", "slat_run")
    out = tmp_path / "out"
    assert main(["export-pipeline", "--base", REPO, "--ss", str(ss), "--slat", str(slat), "--steps", str(steps),
                 "--out", str(out)]) == 0
    flows, samplers = _trellis_load(out)
    for key, run in (("sparse_structure_flow_model", ss), ("slat_flow_model", slat)):
        want = load_trellis(run / "checkpoint_000002/trellis/student.json").state_dict()
        assert all(torch.equal(v, want[k]) for k, v in flows[key].state_dict().items())
    for params in samplers.values():
        assert params == {"steps": steps, "cfg_strength": STUDENT_SAMPLER["cfg_strength"],
                          "cfg_interval": list(STUDENT_SAMPLER["cfg_interval"]),
                          "rescale_t": STUDENT_SAMPLER["rescale_t"]}
    assert (out / "ckpts/ss_dec_tiny.safetensors").read_bytes() == b"decoder bytes"
    base = json.loads((hub / "pipeline.json").read_text())["args"]
    assert json.loads((out / "pipeline.json").read_text())["args"]["slat_normalization"] == base["slat_normalization"]
    card = (out / "README.md").read_text()
    assert REPO in card and "lambda_mdt" in card and "eval_fd_1step | 0.25" in card and "40 steps" in card


def test_export_pipeline_bad_students_are_one_line(hub, tmp_path, capsys):
    ss, slat = _student(tmp_path, "ss_flow_tiny", "ss_run"), _student(tmp_path, "slat_flow_tiny", "slat_run")
    with pytest.raises(PipelineError, match="SLatFlowModel .*not a stage-'ss' model"):
        export_pipeline(REPO, {"ss": str(slat)}, 1, tmp_path / "o1")
    wide = load_trellis(FIXTURES / "ss_flow_tiny.json").config_args
    from mdt_ray.models.registry import build_model

    other = build_model({"name": "SparseStructureFlowModel", "args": {**wide, "model_channels": 128}})
    export_trellis(other, tmp_path / "wide", "student")
    with pytest.raises(PipelineError, match="does not have the shape of the base pipeline.s sparse_structure_flow_model"):
        export_pipeline(REPO, {"ss": str(tmp_path / "wide")}, 2, tmp_path / "o2")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/student.json").write_text("{not json")
    (tmp_path / "broken/student.safetensors").write_bytes(b"")
    with pytest.raises(PipelineError, match="broken/student.json is no TRELLIS model config"):
        export_pipeline(REPO, {"ss": str(tmp_path / "broken/student.json")}, 1, tmp_path / "o4")
    assert main(["export-pipeline", "--base", str(tmp_path), "--ss", str(ss), "--steps", "1",
                 "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no pipeline.json" in err and len(err.splitlines()) == 1
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))


def test_export_pipeline_registers_the_folder(hub, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    ss = _student(tmp_path, "ss_flow_tiny", "ss_run")
    assert main(["export-pipeline", "--base", REPO, "--ss", str(ss), "--steps", "1", "--out", str(tmp_path / "out"),
                 "--register", "trellis-mdt", "--tracking-uri", uri, "--run-id", run_id]) == 0
    version = client.get_model_version("trellis-mdt", "1")
    assert version.run_id == run_id and version.source.endswith("/pipeline")
    local = Path(client.download_artifacts(run_id, "pipeline", str(tmp_path / "dl")))
    flows, samplers = _trellis_load(local)
    assert samplers["sparse_structure_sampler"]["steps"] == 1 and set(flows) == set(MODELS)


def test_a_run_checks_a_pipeline_teacher_before_it_starts(hub, tmp_path):
    from mdt_ray.config import load_config
    from mdt_ray.data.corpus import build_synthetic
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.train.launch import RunError, check_compatible

    corpus = tmp_path / "train"
    build_synthetic(str(corpus), 4, seed=0, progress=False, use_ray=False)
    demo = Path(__file__).resolve().parents[1] / "jobs/configs/demo.yaml"
    for spec in (REPO, str(hub)):
        cfg = load_config(demo, [f"data.uri={corpus}", f"model.teacher={spec}"])
        with pytest.raises(RunError, match=f"model.teacher '{spec}' \\(model.stage 'ss'\\) does not fit"):
            check_compatible(cfg, read_manifest(corpus))
    cfg = load_config(demo, [f"data.uri={corpus}", "model.teacher=microsoft/TRELLIS-nope"])
    with pytest.raises(RunError, match="pipeline.json of Hugging Face repository 'microsoft/TRELLIS-nope'"):
        check_compatible(cfg, read_manifest(corpus))
