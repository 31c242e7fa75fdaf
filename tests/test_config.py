import pytest

from mdt_ray.config import Config, ConfigError, load_config

CONFIGS = ["jobs/configs/demo.yaml", "jobs/configs/trellis_ss_large.yaml", "jobs/configs/trellis_slat_large.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    flat = cfg.flat()
    for key in ("model.teacher", "distill.lambda_vd", "distill.dt", "train.steps", "scale.num_workers",
                "data.uri", "run.storage_path", "run.name"):
        assert key in flat


def test_paper_settings_in_trellis_config():
    d = load_config("jobs/configs/trellis_ss_large.yaml")
    assert (d.distill.dt, d.distill.lambda_vd, d.distill.cfg_vm, d.distill.cfg_vd) == (0.01, 1.0, 40.0, 100.0)
    assert d.distill.d_norm and (d.distill.t_mean, d.distill.t_std) == (1.0, 1.0)
    assert (d.train.lr, d.train.batch_size, d.train.batch_split, d.train.ema) == (4e-8, 8, 2, 0.9999)


def test_overrides_are_typed():
    cfg = load_config("jobs/configs/demo.yaml", ["distill.lambda_vd=0.5", "train.steps=7",
                                                 "distill.cfg_vm=[1, 2.5]", "tracking.uri=null",
                                                 "distill.d_norm=false"])
    assert cfg.distill.lambda_vd == 0.5 and cfg.train.steps == 7
    assert cfg.distill.cfg_vm == [1.0, 2.5] and cfg.tracking.uri is None and not cfg.distill.d_norm


@pytest.mark.parametrize(
    "override, key",
    [
        ("distill.lambda_vd=-1", "distill.lambda_vd"),
        ("distill.lambda_vm=-0.1", "distill.lambda_vm"),
        ("distill.dt=0", "distill.dt"),
        ("distill.dt=0.6", "distill.dt"),
        ("distill.cfg_vm=-2", "distill.cfg_vm"),
        ("distill.cfg_vd=[3, -1]", "distill.cfg_vd"),
        ("model.teacher=giant-model", "model.teacher"),
        ("model.stage=stage3", "model.stage"),
        ("distill.method=gan", "distill.method"),
        ("train.steps=0", "train.steps"),
        ("train.batch_split=3", "train.batch_split"),
        ("scale.num_workers=0", "scale.num_workers"),
        ("train.ema=1.5", "train.ema"),
        ("train.learning_rate=1", "train.learning_rate"),
        ("distil.dt=0.1", "distil"),
    ],
)
def test_every_error_names_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("jobs/configs/demo.yaml", [override])
    assert key in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.steps"])


def test_defaults_and_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config()
    assert cfg.tracking.resolved_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert cfg.tracking.resolved_uri() == "sqlite:////tmp/x.db"


def test_unknown_keys_suggest_the_close_one():
    with pytest.raises(ConfigError, match=r"distill\.lamda_vd: unknown key; did you mean 'lambda_vd'\?"):
        load_config(None, ["distill.lamda_vd=0.5"])
    with pytest.raises(ConfigError, match=r"distil: unknown key; did you mean 'distill'\?"):
        load_config(None, ["distil.lambda_vd=0.5"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zzzzzz=1"])
    assert "did you mean" not in str(e.value)


def test_relative_paths_resolve_against_the_commands_directory(tmp_path, monkeypatch):
    """Once, where the config is loaded: trials and workers run in other directories."""
    from pathlib import Path

    from mdt_ray.tune import load_sweep

    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).parents[1] / "jobs/configs/demo.yaml",
                      ["tracking.uri=sqlite:///db/mlflow.db", "model.image_encoder=~/dino.pth"])
    assert cfg.data.uri == str(tmp_path / "data/demo-corpus")
    assert cfg.data.eval_uri == str(tmp_path / "data/demo-eval")
    assert cfg.run.storage_path == str(tmp_path / "runs")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/db/mlflow.db"
    assert cfg.model.image_encoder == str(Path.home() / "dino.pth")
    # The packaged teacher is not in tmp_path: found from the package root, as the workers found it.
    assert Path(cfg.model.teacher).is_absolute() and Path(cfg.model.teacher).is_file()
    (tmp_path / "mine.json").write_text("{}")
    assert load_config(None, ["model.teacher=mine.json"]).model.teacher == str(tmp_path / "mine.json")
    # URIs and built-in names stay as written.
    uris = load_config(None, ["data.uri=s3://bucket/corpus", "model.teacher=ss-demo", "run.storage_path=s3://b/runs"])
    assert (uris.data.uri, uris.model.teacher, uris.run.storage_path) == ("s3://bucket/corpus", "ss-demo", "s3://b/runs")
    base, spec, tree = load_sweep(Path(__file__).parents[1] / "jobs/configs/sweep.yaml",
                                  ['sweep.space={"data.uri": {"grid": ["a", "s3://b/c"]}}'])
    assert spec.storage_path == str(tmp_path / "runs/sweeps")
    assert tree["data"]["eval_uri"] == str(tmp_path / "data/demo-eval") == base.data.eval_uri
    assert spec.space["data.uri"].grid == [str(tmp_path / "a"), "s3://b/c"]
