"""The cluster files in cluster/: Ray accepts them, and they fit the job configs.

- cluster/aws.yaml goes through Ray's own launcher validation (`prepare_config` +
  `validate_config`, which check it against Ray's ray-schema.json), as `ray up` does.
- The KubeRay manifests parse, have the fields KubeRay needs, and Ray's KubeRay autoscaler can
  read their RayCluster spec (`_derive_autoscaling_config_from_ray_cr`).
- Every jobs/configs/trellis_*.yaml agrees with every cluster definition, in the sense written in
  cluster/README.md ("What agree means") and implemented by cluster/check.py; the negative tests
  change one side in memory and expect the check to say what broke.

- cluster/fetch_models.py copies an S3 prefix from a real S3 server on loopback (moto), once, and
  a Hub id from a local Hub cache with HF_HUB_OFFLINE=1; bad sources and dead endpoints are one
  line and exit status 2.

No cluster, cloud account or network is needed.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import socket
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from mdt_ray.config import load_config
from tests.test_pipeline import REPO as HUB_REPO, REV as HUB_REV, hub  # noqa: F401  (hub: a fixture)

REPO = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    # cluster/ is a folder of files for users, not a package; load check.py by path.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check = _module("mdt_cluster_check", REPO / "cluster" / "check.py")
fetch_models = check.fetch_models()  # the module check.py reads the fetch commands with

TRELLIS_CONFIGS = check.trellis_configs()
SS_LARGE = REPO / "jobs" / "configs" / "trellis_ss_large.yaml"
CREDENTIALS_SECRET = "mdt-ray-credentials"


@pytest.fixture(scope="module")
def pin():
    return check.ray_pin()


@pytest.fixture(scope="module")
def launcher():
    return check.load_yaml(check.LAUNCHER_FILE)


@pytest.fixture(scope="module")
def raycluster():
    return check.load_yaml(check.RAYCLUSTER_FILE)


@pytest.fixture(scope="module")
def rayjob():
    return check.load_yaml(check.RAYJOB_FILE)


def _cluster_spec(target, launcher, raycluster, rayjob):
    return {"raycluster": raycluster["spec"], "rayjob": rayjob["spec"]["rayClusterSpec"]}[target]


def _gpu_group(spec):
    return next(g for g in spec["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])


def _pod_specs(spec):
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def test_trellis_configs_exist_and_validate():
    assert SS_LARGE in TRELLIS_CONFIGS
    for path in TRELLIS_CONFIGS:
        load_config(path)


# --- Ray cluster launcher -----------------------------------------------------------------------


def test_launcher_passes_ray_validation(launcher, pin):
    check.prepare_launcher(launcher)  # raises if Ray's schema or cross-field rules reject it
    assert check.launcher_problems(launcher, pin) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["gpu-a100"].update(max_worker=2),  # typo'd key
        lambda c: c["available_node_types"]["gpu-a100"]["resources"].update(GPU=7.5),  # not an int
        lambda c: c.update(idle_timeout_minutes=-1),
    ],
)
def test_ray_schema_rejects_broken_launcher_configs(launcher, breakage):
    broken = copy.deepcopy(launcher)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        check.prepare_launcher(broken)
    assert check.launcher_problems(broken)[0].startswith("Ray rejects the launcher config")


def test_launcher_layout(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    # No CPU on the head; slots for sweep trial drivers, which must not land on spot GPU nodes.
    assert head["resources"] == {"CPU": 0, "mdt_trial_driver": 64}
    without = copy.deepcopy(launcher)
    without["available_node_types"][launcher["head_node_type"]]["resources"].pop("mdt_trial_driver")
    assert any("mdt_trial_driver" in p for p in check.launcher_problems(without))
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types.values())
    assert all(t["min_workers"] == 0 < t["max_workers"] for n, t in gpu_types.items()
               if t["node_config"].get("InstanceMarketOptions") is None)
    spot = [t for t in gpu_types.values()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "a spot GPU node type"
    assert any(not t["resources"].get("GPU") and t.get("max_workers", 0) > 0
               for n, t in types.items() if n != launcher["head_node_type"])
    assert launcher["idle_timeout_minutes"] > 0
    for name, node_type in types.items():
        assert "IamInstanceProfile" in node_type["node_config"], name  # S3 without keys
    assert launcher["docker"]["image"]
    assert launcher["setup_commands"] == [] and launcher["worker_setup_commands"] == []
    # Token authentication: the token folder is shipped and every `ray start` turns token mode on.
    assert any(local.startswith("~/.ray/") for local in launcher["file_mounts"].values())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_launcher_resources_match_the_hardware(launcher):
    # The declared resources are what the autoscaler plans with; they must be what Ray detects.
    lying = copy.deepcopy(launcher)
    lying["available_node_types"]["gpu-a100"]["resources"]["GPU"] = 4
    lying["available_node_types"]["gpu-h100"]["resources"]["accelerator_type:A100"] = 1
    del lying["available_node_types"]["gpu-h100"]["resources"]["accelerator_type:H100"]
    problems = check.launcher_problems(lying)
    assert any("gpu-a100: declares 4 GPUs, p4d.24xlarge has 8" in p for p in problems)
    assert any("gpu-h100: declares accelerator_type:A100, but Ray detects H100" in p for p in problems)

    busy_head = copy.deepcopy(launcher)
    busy_head["available_node_types"]["head"]["resources"] = {"CPU": 16}
    assert any("head node type" in p for p in check.launcher_problems(busy_head))


# --- KubeRay ------------------------------------------------------------------------------------


def test_kuberay_manifests_parse(raycluster, rayjob, pin):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert raycluster["metadata"]["name"] and rayjob["metadata"]["name"]
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["authOptions"]["mode"] == "token"
        for pod in _pod_specs(spec):
            assert pod["containers"][0]["image"]
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        gpu = _gpu_group(spec)
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
        assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
        assert gpu["template"]["spec"]["nodeSelector"][check.GPU_PRODUCT_LABEL].startswith("NVIDIA-A800")
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
        assert any(not g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                   for g in spec["workerGroupSpecs"]), "a CPU group for Ray Data"
        assert check.kuberay_problems(spec, pin) == []  # includes Ray's autoscaler reading the spec


def test_kuberay_problems_are_reported(raycluster):
    spec = copy.deepcopy(raycluster["spec"])
    spec["headGroupSpec"]["rayStartParams"].pop("num-cpus")
    spec["headGroupSpec"]["rayStartParams"].pop("resources")
    gpu = _gpu_group(spec)
    gpu["template"]["spec"]["nodeSelector"][check.GPU_PRODUCT_LABEL] = "NVIDIA-H100-80GB-HBM3"
    gpu["rayStartParams"]["num-gpus"] = 8  # an int: the CRD only takes strings
    spec["rayVersion"] = "2.59.0"
    problems = check.kuberay_problems(spec)
    assert any("num-cpus" in p and "head" in p.lower() for p in problems)
    assert any("Ray detects H100" in p and "accelerator_type:A800" in p for p in problems)
    assert any("num-gpus must be a string" in p for p in problems)
    assert any("rayVersion" in p for p in problems)
    assert any("mdt_trial_driver" in p and "preemptible" in p for p in problems)


def test_rayjob(rayjob, raycluster):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/distill.py"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    # The job cluster is the long-lived cluster's spec, verbatim: edit one, edit the other.
    assert spec["rayClusterSpec"] == raycluster["spec"]


def test_rayjob_entrypoint_config_exists_and_validates(rayjob):
    path, overrides = check.entrypoint_config(rayjob["spec"]["entrypoint"])
    assert path == SS_LARGE and path.is_file()
    load_config(path, overrides)


@pytest.mark.parametrize("target", ["raycluster", "rayjob"])
def test_credentials_come_from_secrets_only(target, launcher, raycluster, rayjob):
    spec = _cluster_spec(target, launcher, raycluster, rayjob)
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    for pod in _pod_specs(spec):
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for env in container.get("env", []):
                if secretish.search(env["name"]):
                    assert "valueFrom" in env, f"{container['name']}: literal {env['name']}"
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert refs == [CREDENTIALS_SECRET], container["name"]
    env_vars = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    assert not [name for name in env_vars if secretish.search(name)]


# --- Versions and images ------------------------------------------------------------------------


def test_images_carry_the_pinned_ray(launcher, raycluster, rayjob, pin):
    base = check.dockerfile_base_image(check.DOCKERFILE.read_text())
    assert base == f"rayproject/ray:{pin}-py311-cu128"
    assert check.base_image_problems(base, pin) == []
    images = [launcher["docker"]["image"]]
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == pin
        images += [c["image"] for pod in _pod_specs(spec)
                   for c in [*pod.get("initContainers", []), *pod["containers"]]]
    assert check.project_image_problems(images, pin) == []


def test_version_checks_catch_drift(pin):
    assert check.dockerfile_base_image("ARG RAY_IMAGE=rayproject/ray:1.2.3-py311-cu128\n"
                                       "FROM ${RAY_IMAGE}\n") == "rayproject/ray:1.2.3-py311-cu128"
    assert "requirements.txt pins" in check.base_image_problems("rayproject/ray:2.59.0-py311-cu128", pin)[0]
    assert "Python 3.11" in check.base_image_problems(f"rayproject/ray:{pin}-py312-cu128", pin)[0]
    assert check.base_image_problems(f"rayproject/ray:{pin}-py311-cpu", pin)  # not a GPU image
    assert check.project_image_problems(["r/mdt-ray:ray2.59.0", "r/mdt-ray:ray2.59.0"], pin)


def test_ray_names_the_gpus_as_the_configs_do():
    # What Ray reports as accelerator_type for the GPUs this project runs on (A800 = China part).
    assert check.ray_accelerator_name("NVIDIA A800-SXM4-80GB") == "A800"
    assert check.gpu_product_accelerator("NVIDIA-A800-SXM4-80GB") == "A800"
    assert check.ray_accelerator_name(check.EC2_SHAPES["p4d.24xlarge"][2]) == "A100"
    assert check.ray_accelerator_name(check.EC2_SHAPES["p5.48xlarge"][2]) == "H100"


# --- Agreement between the job configs and the clusters -----------------------------------------


def _cluster(target, launcher, raycluster, rayjob):
    if target == "aws":
        return check.launcher_cluster(launcher)
    return check.kuberay_cluster(_cluster_spec(target, launcher, raycluster, rayjob))


@pytest.mark.parametrize("config_path", TRELLIS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("target", ["aws", "raycluster", "rayjob"])
def test_job_configs_agree_with_clusters(config_path, target, launcher, raycluster, rayjob):
    cfg = load_config(config_path)
    if target == "aws":
        # As submitted on AWS per cluster/README.md: with the launcher's stand-in for an A800.
        cfg = load_config(config_path, check.submit_overrides(cfg, check.launcher_cluster(launcher)))
    assert check.agreement_problems(cfg, _cluster(target, launcher, raycluster, rayjob)) == []


def test_whole_report_is_clean():
    assert check.report() == []


def test_check_catches_too_many_workers(raycluster):
    cfg = load_config(SS_LARGE)
    cluster = check.kuberay_cluster(raycluster["spec"])
    cfg.scale.num_workers = 17  # two 8-GPU pods hold 16
    [problem] = check.agreement_problems(cfg, cluster)
    assert "scale.num_workers=17" in problem and "at most 16" in problem


def test_check_catches_a_shrunk_cluster(raycluster):
    spec = copy.deepcopy(raycluster["spec"])
    _gpu_group(spec)["maxReplicas"] = 1
    problems = check.agreement_problems(load_config(SS_LARGE), check.kuberay_cluster(spec))
    assert any("at most 8" in p for p in problems)


def test_check_counts_the_launchers_node_cap(launcher):
    capped = copy.deepcopy(launcher)
    capped["max_workers"] = 1  # per-type maxima allow 2 A100 nodes, the global cap only 1
    cfg = load_config(SS_LARGE, ["scale.accelerator_type=A100"])
    problems = check.agreement_problems(cfg, check.launcher_cluster(capped))
    assert any("at most 8 workers" in p and "1 nodes in all" in p for p in problems)


def test_check_catches_cpu_starved_nodes(raycluster):
    cfg = load_config(SS_LARGE)
    cfg.scale.cpus_per_worker = 12  # 8 x 12 = 96: nothing left for Ray Data on a 96-CPU pod
    problems = check.agreement_problems(cfg, check.kuberay_cluster(raycluster["spec"]))
    assert any("gpu-a800" in p and "Ray Data" in p for p in problems)


def test_check_catches_wrong_accelerator(raycluster, launcher):
    cfg = load_config(SS_LARGE)
    cfg.scale.accelerator_type = "H100"
    [problem] = check.agreement_problems(cfg, check.kuberay_cluster(raycluster["spec"]))
    assert "accelerator_type:H100" in problem

    # AWS has no A800: without the documented override the check says what to pass.
    a800 = load_config(SS_LARGE)
    assert a800.scale.accelerator_type == "A800"
    [problem] = check.agreement_problems(a800, check.launcher_cluster(launcher))
    assert "--set scale.accelerator_type=A100" in problem
    assert check.submit_overrides(a800, check.launcher_cluster(launcher)) == ["scale.accelerator_type=A100"]


def test_check_catches_teacher_outside_fetched_folder(raycluster):
    cfg = load_config(SS_LARGE)
    cfg.model.teacher = "/data/other/ss_flow.json"
    problems = check.agreement_problems(cfg, check.kuberay_cluster(raycluster["spec"]))
    assert any("model.teacher /data/other/ss_flow.json" in p for p in problems)


def test_check_catches_cpu_training_on_gpu_cluster(raycluster):
    cfg = load_config(SS_LARGE)
    cfg.scale.use_gpu = False
    assert any("use_gpu" in p for p in check.agreement_problems(cfg, check.kuberay_cluster(raycluster["spec"])))


# --- cluster/fetch_models.py --------------------------------------------------------------------


def test_fetch_commands_are_checked(launcher, raycluster):
    # Every cluster file's fetch command is one fetch_models.py accepts ...
    assert check.fetch_problems([["python", "fetch_models.py", "microsoft/TRELLIS-image-large@v1", "/mnt/m"]]) == []
    # ... and one it would refuse is reported, with fetch_models.py's own reason.
    bad = copy.deepcopy(launcher)
    bad["head_setup_commands"] = ["python /x/fetch_models.py /data/TRELLIS-image-large/ckpts models/ckpts"]
    assert [p for p in check.launcher_problems(bad) if "fetch_models.py" in p] == [
        "fetch_models.py SRC '/data/TRELLIS-image-large/ckpts': SRC is neither an s3://bucket/prefix URI nor a "
        "Hugging Face repository id owner/name[@revision]",
        "fetch_models.py DEST 'models/ckpts' is not an absolute path"]
    bad["head_setup_commands"] = ["python /x/fetch_models.py s3:///ckpts /mnt/models/ckpts"]
    assert any("s3 URI without a bucket" in p for p in check.launcher_problems(bad))
    spec = copy.deepcopy(raycluster["spec"])
    init = _gpu_group(spec)["template"]["spec"]["initContainers"][0]
    init["command"] = init["command"][:-1]  # DEST left out
    assert any("takes SRC DEST" in p for p in check.kuberay_problems(spec))


def _put(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    from tests.s3_server import client

    s3 = client(endpoint)
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_fetch_models_copies_a_prefix_once(s3_server, s3_bucket, tmp_path, capsys):
    _put(s3_server, s3_bucket, {"ckpts/ss.json": b"{}", "ckpts/ss.safetensors": b"w" * 100,
                                "ckpts/dec/": b"",  # a folder marker object, not a file
                                "ckpts/dec/slat.safetensors": b"d" * 10, "ckpts-old/stale.json": b"not this one"})
    dest = tmp_path / "models"

    assert fetch_models.main([f"s3://{s3_bucket}/ckpts", str(dest)]) == 0
    assert sorted(_mtimes(dest)) == ["dec/slat.safetensors", "ss.json", "ss.safetensors"]
    assert (dest / "ss.safetensors").read_bytes() == b"w" * 100
    assert "3 file(s) written" in capsys.readouterr().out

    before = _mtimes(dest)
    assert fetch_models.main([f"s3://{s3_bucket}/ckpts/", str(dest)]) == 0  # already there
    assert "0 file(s) written" in capsys.readouterr().out
    assert _mtimes(dest) == before

    (dest / "ss.safetensors").write_bytes(b"w" * 7)  # a copy cut short is fetched again
    assert fetch_models.fetch(f"s3://{s3_bucket}/ckpts/", dest) == [(dest / "ss.safetensors").resolve()]
    assert (dest / "ss.safetensors").read_bytes() == b"w" * 100


@pytest.mark.parametrize("src, says", [
    ("s3://{bucket}/nothing/", "no files under s3://{bucket}/nothing"),
    ("s3://{bucket}/ckpts/ss.json", "is a single file"),
    ("s3://mdt-no-such-bucket/ckpts", "bucket 'mdt-no-such-bucket' does not exist"),
    ("s3:///ckpts", "without a bucket"),
    ("/mnt/elsewhere/ckpts", "neither an s3://bucket/prefix URI nor a Hugging Face repository id"),
])
def test_fetch_models_bad_sources_are_one_line(s3_server, s3_bucket, tmp_path, capsys, src, says):
    _put(s3_server, s3_bucket, {"ckpts/ss.json": b"{}"})
    src = src.format(bucket=s3_bucket)
    assert fetch_models.main([src, str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fetch_models.py: error: {src}: ")
    assert says.format(bucket=s3_bucket) in err


def _closed_port() -> int:
    """A loopback port that nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_models_dead_endpoint_fails_fast(tmp_path, monkeypatch, capsys):
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert fetch_models.main(["s3://models/ckpts", str(tmp_path / "models")]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "unreachable" in err


def test_fetch_models_takes_a_hub_id_from_the_cache_offline(hub, tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (the hub fixture): the repository comes from the local Hub cache.
    dest = tmp_path / "models"
    assert fetch_models.main([HUB_REPO, str(dest)]) == 0
    cached = sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file())
    assert sorted(_mtimes(dest)) == cached and "ckpts/ss_flow_img_dit_L_16l8_fp16.safetensors" in cached
    assert (dest / "pipeline.json").read_bytes() == (hub / "pipeline.json").read_bytes()
    assert f"{len(cached)} file(s) written" in capsys.readouterr().out

    before = _mtimes(dest)
    assert fetch_models.main([f"{HUB_REPO}@{HUB_REV}", str(dest)]) == 0  # a revision; nothing to copy
    assert "0 file(s) written" in capsys.readouterr().out and _mtimes(dest) == before

    assert fetch_models.main(["microsoft/TRELLIS-not-cached", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "microsoft/TRELLIS-not-cached" in err and "LocalEntryNotFoundError" in err


def test_fetch_models_unreachable_hub_fails_fast(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf

    port = _closed_port()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert fetch_models.main([HUB_REPO, str(tmp_path / "models")]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and HUB_REPO in err and f"127.0.0.1:{port}" in err, err
