"""Do the cluster definitions in cluster/ fit the job configs in jobs/configs/?

A job config's `scale` block asks Ray Train for `num_workers` workers with `gpus_per_worker` GPUs
and `cpus_per_worker` CPUs each, optionally pinned to an `accelerator_type`. The cluster files say
which nodes the autoscaler may start. Ray compares the two only at run time, and then only by
waiting: a placement group that no allowed node can hold stays pending forever. This module makes
the comparison ahead of time, from the files alone (no cluster, no cloud credentials), reading the
cluster files the way Ray itself reads them:

- the launcher YAML goes through `ray.autoscaler._private.util.prepare_config` and
  `validate_config`, the two steps `ray up` runs before it touches the cloud;
- a RayCluster spec goes through `_derive_autoscaling_config_from_ray_cr`, the function Ray's
  in-tree KubeRay autoscaler uses to turn the custom resource into node types.

The rules are spelled out in cluster/README.md ("What agree means"); tests/test_cluster.py runs
them on every jobs/configs/trellis_*.yaml. From the repository root: `python cluster/check.py`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_FILE = REPO / "cluster" / "aws.yaml"
RAYCLUSTER_FILE = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB_FILE = REPO / "cluster" / "kuberay" / "rayjob.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
REQUIREMENTS = REPO / "requirements.txt"

# The project's Python (requirements.txt is resolved for 3.11); Ray's base image must match it.
PYTHON_VERSION = "3.11"
# Ray Data's read and decode tasks need CPUs that Ray Train workers do not hold. The head offers
# none, so every GPU node keeps at least this many for them (Ray 2.60: a run whose workers hold
# every CPU waits forever for its read tasks).
RAY_DATA_MIN_SPARE_CPUS = 1
# Label that NVIDIA's GPU feature discovery puts on Kubernetes nodes, e.g. NVIDIA-A800-SXM4-80GB.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# The script that copies TRELLIS checkpoints onto a node (cluster/fetch_models.py SRC DEST).
FETCH_SCRIPT = "fetch_models.py"
FETCH_FILE = REPO / "cluster" / FETCH_SCRIPT

# Hardware of the EC2 types aws.yaml may use: vCPUs, GPUs, and the GPU's NVML device name (Ray
# derives its accelerator_type from that name). A launcher node type may declare fewer CPUs than
# the instance has, never more, and exactly its GPUs; a type missing here is reported, so that
# switching instance types means writing its real shape down once.
EC2_SHAPES: dict[str, tuple[int, int, Optional[str]]] = {
    "p4d.24xlarge": (96, 8, "NVIDIA A100-SXM4-40GB"),
    "p4de.24xlarge": (96, 8, "NVIDIA A100-SXM4-80GB"),
    "p5.48xlarge": (192, 8, "NVIDIA H100 80GB HBM3"),
    "m6i.2xlarge": (8, 0, None),
    "m6i.4xlarge": (16, 0, None),
    "m6i.8xlarge": (32, 0, None),
    "m6i.16xlarge": (64, 0, None),
}


@dataclass(frozen=True)
class NodeGroup:
    """One kind of worker node the autoscaler may start, as the autoscaler sees it."""

    name: str
    max_nodes: int
    cpus: float
    gpus: float
    accelerator: Optional[str]  # X of the node's `accelerator_type:X` resource
    models_dir: Optional[str] = None  # folder this cluster fills with checkpoints on such nodes


@dataclass(frozen=True)
class Cluster:
    """A cluster definition as far as the agreement rules need it."""

    groups: tuple[NodeGroup, ...]
    # Cap on worker nodes of all groups together (the launcher's max_workers); None: no cap.
    max_nodes: Optional[int] = None
    # Accelerator this cluster offers in place of one it cannot (aws.yaml: A800 -> A100).
    substitutes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Small readers


# The resource that marks where sweep trial drivers run (SweepSpec.driver_resource's default).
DRIVER_RESOURCE = "mdt_trial_driver"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(Path(path).read_text())


def ray_pin(requirements: Path = REQUIREMENTS) -> str:
    """The Ray version pinned in requirements.txt (`ray[...]==X.Y.Z`)."""
    for line in Path(requirements).read_text().splitlines():
        m = re.match(r"\s*ray(\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.]*)", line)
        if m:
            return m.group(2)
    raise ValueError(f"{requirements}: no `ray==` pin")


def ray_accelerator_name(device_name: str) -> Optional[str]:
    """The accelerator_type Ray reports for an NVIDIA GPU with this NVML device name."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(device_name)


def gpu_product_accelerator(label_value: str) -> Optional[str]:
    """Ray's accelerator_type for nodes carrying this `nvidia.com/gpu.product` label value.

    The label is the NVML device name with spaces turned into hyphens; undoing that and asking
    Ray gives the name Ray will detect on such a node (NVIDIA-A800-SXM4-80GB -> A800).
    """
    return ray_accelerator_name(label_value.replace("-", " "))


def accelerator_of(resources: dict[str, Any]) -> Optional[str]:
    names = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
    if len(names) > 1:
        raise ValueError(f"more than one accelerator_type resource: {sorted(names)}")
    return names[0] if names else None


def fetch_arguments(argv: Iterable[str]) -> Optional[list[str]]:
    """The arguments after fetch_models.py in a command that runs it, or None."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg.endswith(FETCH_SCRIPT):
            return args[i + 1:]
    return None


def fetch_destination(argv: Iterable[str]) -> Optional[str]:
    """DEST of a `... fetch_models.py SRC DEST` command, or None."""
    args = fetch_arguments(argv)
    return args[1].rstrip("/") if args and len(args) == 2 else None


@functools.cache
def fetch_models():
    """cluster/fetch_models.py as a module (cluster/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("mdt_cluster_fetch_models", FETCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fetch_problems(argvs: Iterable[Iterable[str]]) -> list[str]:
    """What fetch_models.py would refuse in those of these commands that run it: not SRC DEST, a
    SRC it cannot read (its own parse_source says why), a DEST that is no absolute path."""
    problems = []
    for argv in argvs:
        args = fetch_arguments(argv)
        if args is None:
            continue
        if len(args) != 2:
            problems.append(f"{FETCH_SCRIPT} takes SRC DEST, got {args}")
            continue
        src, dest = args
        try:
            fetch_models().parse_source(src)
        except ValueError as e:
            problems.append(f"{FETCH_SCRIPT} SRC {src!r}: {e}")
        if not dest.startswith("/"):
            problems.append(f"{FETCH_SCRIPT} DEST {dest!r} is not an absolute path")
    return problems


def entrypoint_config(entrypoint: str) -> tuple[Path, list[str]]:
    """The `--config FILE` and `--set KEY=VALUE` arguments of a job entrypoint command."""
    args = shlex.split(entrypoint)
    config, overrides = None, []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            config = args[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--set" and i + 1 < len(args):
            overrides.append(args[i + 1])
        elif arg.startswith("--set="):
            overrides.append(arg.split("=", 1)[1])
    if config is None:
        raise ValueError(f"entrypoint has no --config: {entrypoint!r}")
    return REPO / config, overrides


# ---------------------------------------------------------------------------------------------
# Images and versions


def dockerfile_base_image(text: str) -> str:
    """The image the Dockerfile builds FROM, with `ARG` defaults substituted."""
    args: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if m:
            args[m.group(1)] = m.group(2)
            continue
        m = re.match(r"FROM\s+(\S+)", line, re.IGNORECASE)
        if m:
            return re.sub(r"\$\{?(\w+)\}?", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
    raise ValueError("Dockerfile has no FROM line")


def base_image_problems(image: str, pin: str) -> list[str]:
    """Ray's GPU images are tagged <ray>-py<python>-cu<cuda> (or -gpu, an alias of one cu tag)."""
    tag = image.rsplit(":", 1)[-1] if ":" in image else ""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d+)-(cu\d+|gpu)", tag)
    if not image.startswith("rayproject/ray:") or m is None:
        return [f"base image {image!r} is not a rayproject/ray:<ray>-py<python>-cu<cuda> GPU tag"]
    problems = []
    if m.group(1) != pin:
        problems.append(f"base image {image} has Ray {m.group(1)}; requirements.txt pins ray=={pin}")
    if m.group(2) != PYTHON_VERSION.replace(".", ""):
        problems.append(f"base image {image} has py{m.group(2)}; the project runs Python {PYTHON_VERSION}")
    return problems


def project_image_problems(images: Iterable[str], pin: str) -> list[str]:
    """Every node runs the one image built from cluster/Dockerfile, tagged with its Ray version."""
    images = sorted(set(images))
    problems = []
    if len(images) != 1:
        problems.append(f"nodes run different images: {images}; build one from cluster/Dockerfile")
    for image in images:
        if f"ray{pin}" not in image.rsplit(":", 1)[-1]:
            problems.append(f"image {image!r}: its tag should carry ray{pin} (the pinned Ray)")
    return problems


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (cluster/aws.yaml)


def prepare_launcher(cluster: dict[str, Any]) -> dict[str, Any]:
    """Ray's own reading of a launcher YAML, as `ray up` does it before calling the cloud: merge
    the provider's defaults, then validate against Ray's ray-schema.json and its cross-field
    rules. Raises jsonschema.ValidationError or ValueError when Ray would refuse the file."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    return prepared


def launcher_groups(prepared: dict[str, Any]) -> list[NodeGroup]:
    """The worker node types of a prepared launcher config, with their declared resources."""
    groups = []
    for name, node_type in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            continue
        resources = node_type.get("resources", {})
        commands = node_type.get("worker_setup_commands", prepared.get("worker_setup_commands", []))
        dests = [d for d in (fetch_destination(shlex.split(c)) for c in commands) if d]
        groups.append(
            NodeGroup(
                name=name,
                max_nodes=int(node_type.get("max_workers", 0)),
                cpus=float(resources.get("CPU", 0)),
                gpus=float(resources.get("GPU", 0)),
                accelerator=accelerator_of(resources),
                models_dir=dests[-1] if dests else None,
            )
        )
    return groups


def launcher_cluster(cluster: dict[str, Any]) -> Cluster:
    """The launcher YAML as the agreement rules see it (validated by Ray on the way)."""
    prepared = prepare_launcher(cluster)
    substitutes = (cluster.get("metadata") or {}).get("accelerator_substitutes") or {}
    return Cluster(tuple(launcher_groups(prepared)), int(prepared["max_workers"]), dict(substitutes))


def launcher_problems(cluster: dict[str, Any], pin: Optional[str] = None) -> list[str]:
    """What is wrong with the launcher YAML on its own, before any job config is involved."""
    pin = pin or ray_pin()
    try:
        prepared = prepare_launcher(cluster)
    except Exception as e:  # jsonschema.ValidationError, ValueError, AssertionError
        return [f"Ray rejects the launcher config: {getattr(e, 'message', e)}"]

    problems = []
    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0 or head.get("resources", {}).get("GPU", 0):
        problems.append("head node type must declare resources {CPU: 0} so no task or actor lands there")
    if not head.get("resources", {}).get(DRIVER_RESOURCE):
        problems.append(f"head node type must declare resources {{{DRIVER_RESOURCE}: N}}: sweep trial drivers "
                        "run where that resource is, and elsewhere they land on preemptible GPU nodes")

    for name, node_type in node_types.items():
        resources = node_type.get("resources", {})
        instance = node_type.get("node_config", {}).get("InstanceType")
        if name != prepared["head_node_type"] and "CPU" not in resources:
            problems.append(f"{name}: declare resources.CPU (and GPU) explicitly; the check and "
                            "an autoscaler without EC2 describe rights rely on it")
        shape = EC2_SHAPES.get(instance)
        if shape is None:
            problems.append(f"{name}: instance type {instance!r} is not in check.EC2_SHAPES")
            continue
        vcpus, gpus, device = shape
        if resources.get("CPU", 0) > vcpus:
            problems.append(f"{name}: declares {resources['CPU']} CPUs, {instance} has {vcpus}")
        if resources.get("GPU", 0) != gpus:
            problems.append(f"{name}: declares {resources.get('GPU', 0)} GPUs, {instance} has {gpus}")
        want = ray_accelerator_name(device) if device else None
        have = accelerator_of(resources)
        if name != prepared["head_node_type"] and have != want:
            problems.append(f"{name}: declares accelerator_type:{have}, but Ray detects {want} on "
                            f"{instance} ({device})")

    commands = [*prepared.get("head_setup_commands", []), *prepared.get("worker_setup_commands", [])]
    commands += [c for t in node_types.values() for c in t.get("worker_setup_commands", [])]
    problems += fetch_problems(shlex.split(c) for c in commands)

    groups = launcher_groups(prepared)
    if not any(g.gpus == 0 and g.max_nodes > 0 for g in groups):
        problems.append("no CPU-only worker type for Ray Data ingest")
    image = (prepared.get("docker") or {}).get("image")
    if not image:
        problems.append("docker.image is not set: nodes must run the image from cluster/Dockerfile")
    else:
        problems += project_image_problems([image], pin)
    return problems


def submit_overrides(cfg, cluster: Cluster) -> list[str]:
    """The `--set` overrides a job with this config needs on this cluster.

    aws.yaml's `metadata.accelerator_substitutes` (Ray ignores `metadata`) names the GPU it offers
    in place of one it cannot offer: AWS has no A800, so A800 configs run on A100 nodes there.
    """
    wanted = cfg.scale.accelerator_type
    if wanted in cluster.substitutes:
        return [f"scale.accelerator_type={cluster.substitutes[wanted]}"]
    return []


# ---------------------------------------------------------------------------------------------
# KubeRay (cluster/kuberay/raycluster.yaml, and the rayClusterSpec inside rayjob.yaml)


def kuberay_view(cluster_spec: dict[str, Any], name: str = "mdt-ray") -> dict[str, Any]:
    """The autoscaling config Ray's in-tree autoscaler derives from this RayCluster spec (Ray's
    own function; it ends with Ray's schema validation of the result)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    custom_resource = {"metadata": {"name": name, "namespace": "default"},
                       "spec": copy.deepcopy(cluster_spec)}
    return _derive_autoscaling_config_from_ray_cr(custom_resource)


def pod_models_dir(pod_spec: dict[str, Any]) -> Optional[str]:
    """Where an init container fetched checkpoints to, if the Ray container sees that volume at
    the same path (KubeRay runs Ray in the pod's first container)."""
    ray_mounts = {m["name"]: m["mountPath"] for m in pod_spec["containers"][0].get("volumeMounts", [])}
    for init in pod_spec.get("initContainers", []):
        dest = fetch_destination([*init.get("command", []), *init.get("args", [])])
        if dest is None:
            continue
        for mount in init.get("volumeMounts", []):
            inside = PurePosixPath(dest).is_relative_to(mount["mountPath"])
            if inside and ray_mounts.get(mount["name"]) == mount["mountPath"]:
                return dest
    return None


def kuberay_groups(cluster_spec: dict[str, Any]) -> list[NodeGroup]:
    view = kuberay_view(cluster_spec)
    specs = {g["groupName"]: g for g in cluster_spec.get("workerGroupSpecs", [])}
    groups = []
    for name, node_type in view["available_node_types"].items():
        if name == view["head_node_type"]:
            continue
        resources = node_type["resources"]
        groups.append(
            NodeGroup(
                name=name,
                max_nodes=int(node_type["max_workers"]),
                cpus=float(resources.get("CPU", 0)),
                gpus=float(resources.get("GPU", 0)),
                accelerator=accelerator_of(resources),
                models_dir=pod_models_dir(specs[name]["template"]["spec"]),
            )
        )
    return groups


def kuberay_cluster(cluster_spec: dict[str, Any]) -> Cluster:
    """A RayCluster spec as the agreement rules see it. KubeRay has no cap across groups."""
    return Cluster(tuple(kuberay_groups(cluster_spec)))


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def kuberay_problems(cluster_spec: dict[str, Any], pin: Optional[str] = None) -> list[str]:
    """What is wrong with a RayCluster spec on its own, before any job config is involved."""
    pin = pin or ray_pin()
    problems = []
    if cluster_spec.get("rayVersion") != pin:
        problems.append(f"rayVersion is {cluster_spec.get('rayVersion')!r}; requirements.txt pins {pin}")
    if cluster_spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true (the autoscaler sizes the worker groups)")

    head = cluster_spec.get("headGroupSpec", {})
    groups = cluster_spec.get("workerGroupSpecs", [])
    for where, params in [("headGroupSpec", head.get("rayStartParams", {}))] + [
        (f"workerGroupSpecs[{g.get('groupName')}]", g.get("rayStartParams", {})) for g in groups
    ]:
        for key, value in params.items():
            if not isinstance(value, str):  # the CRD types rayStartParams as map[string]string
                problems.append(f"{where}.rayStartParams.{key} must be a string, got {value!r}")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('headGroupSpec.rayStartParams must set num-cpus: "0" (no training on the head)')
    if DRIVER_RESOURCE not in str(head.get("rayStartParams", {}).get("resources", "")):
        problems.append(f"headGroupSpec.rayStartParams.resources must give {DRIVER_RESOURCE}: sweep trial drivers "
                        "run where that resource is, and elsewhere they land on preemptible GPU pods")

    images = [c.get("image") for c in _containers(head.get("template", {}).get("spec", {}))]
    for group in groups:
        name = group.get("groupName")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
        replicas = group.get("replicas", lo)
        if hi is None or not (0 <= lo <= replicas <= hi):
            problems.append(f"{name}: need 0 <= minReplicas ({lo}) <= replicas ({replicas}) <= "
                            f"maxReplicas ({hi})")
        pod = group.get("template", {}).get("spec", {})
        images += [c.get("image") for c in _containers(pod)]
        product = (pod.get("nodeSelector") or {}).get(GPU_PRODUCT_LABEL)
        limits = pod.get("containers", [{}])[0].get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits and product is None:
            problems.append(f"{name}: GPU group without a {GPU_PRODUCT_LABEL} node selector may "
                            "land on any GPU model")
    problems += project_image_problems(images, pin)
    pods = [head.get("template", {}).get("spec", {}), *(g.get("template", {}).get("spec", {}) for g in groups)]
    problems += fetch_problems([*c.get("command", []), *c.get("args", [])]
                               for pod in pods for c in pod.get("initContainers", []))

    try:
        view = kuberay_view(cluster_spec)
    except Exception as e:
        return problems + [f"Ray's KubeRay autoscaler cannot read this spec: {getattr(e, 'message', e)}"]
    specs = {g["groupName"]: g for g in groups}
    for name, node_type in view["available_node_types"].items():
        if name == view["head_node_type"]:
            if node_type["resources"].get("CPU") != 0:
                problems.append("the autoscaler sees CPUs on the head")
            continue
        pod = specs[name]["template"]["spec"]
        product = (pod.get("nodeSelector") or {}).get(GPU_PRODUCT_LABEL)
        declared = accelerator_of(node_type["resources"])
        if product is not None and declared != gpu_product_accelerator(product):
            problems.append(
                f"{name}: selects {GPU_PRODUCT_LABEL}={product} (Ray detects "
                f"{gpu_product_accelerator(product)}) but declares accelerator_type:{declared} in "
                "rayStartParams.resources (the autoscaler needs it to start this group from zero)"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# The agreement between a job config and a cluster


def agreement_problems(cfg, cluster: Cluster) -> list[str]:
    """Why a job with this config could not run on this cluster (empty list: it can).

    `cfg` is a validated mdt_ray.config.Config. Rules (cluster/README.md, "What agree means"):
    1. scale.use_gpu is true.
    2. Eligible groups: GPU groups whose max size is above zero and, when scale.accelerator_type
       is set, that advertise accelerator_type:<it>. There must be at least one.
    3. Per eligible node, w = floor(GPUs / gpus_per_worker) workers fit; w >= 1, and the node's
       CPUs >= w * cpus_per_worker + 1 (no GPU idles for want of CPUs, and Ray Data keeps a CPU).
    4. Capacity: sum over eligible groups of max nodes * w >= num_workers, where a cluster-wide
       node cap (launcher max_workers) is spent on the groups with the largest w first.
    5. A model.teacher given as a local path lies under the folder the cluster fills with
       checkpoints on every eligible node.
    """
    scale = cfg.scale
    problems = []
    if not scale.use_gpu:
        problems.append("scale.use_gpu is false: Ray Train would start CPU-only workers and leave "
                        "the GPU nodes idle")

    gpu_groups = [g for g in cluster.groups if g.gpus > 0 and g.max_nodes > 0]
    wanted = scale.accelerator_type
    eligible = [g for g in gpu_groups if wanted is None or g.accelerator == wanted]
    if not eligible:
        offered = sorted({g.accelerator for g in gpu_groups if g.accelerator})
        msg = (f"scale.accelerator_type={wanted!r}: no GPU node group that can scale up advertises "
               f"accelerator_type:{wanted} (offered: {offered or 'none'})")
        substitute = cluster.substitutes.get(wanted)
        if substitute:
            msg += f"; this cluster offers {substitute} instead: submit with --set scale.accelerator_type={substitute}"
        return problems + [msg]

    fits = []  # (workers per node, group)
    for g in eligible:
        per_node = math.floor(g.gpus / scale.gpus_per_worker + 1e-9)
        if per_node < 1:
            problems.append(f"{g.name}: a worker needs {scale.gpus_per_worker} GPUs, a node has {g.gpus:g}")
            continue
        needed = per_node * scale.cpus_per_worker + RAY_DATA_MIN_SPARE_CPUS
        if g.cpus < needed:
            problems.append(
                f"{g.name}: {per_node} workers x scale.cpus_per_worker={scale.cpus_per_worker:g} "
                f"+ {RAY_DATA_MIN_SPARE_CPUS} for Ray Data = {needed:g} CPUs, a node has {g.cpus:g}"
            )
        fits.append((per_node, g))

    capacity, parts = 0, []
    nodes_left = cluster.max_nodes if cluster.max_nodes is not None else math.inf
    for per_node, g in sorted(fits, key=lambda f: -f[0]):
        nodes = min(g.max_nodes, nodes_left)
        nodes_left -= nodes
        capacity += nodes * per_node
        parts.append(f"{g.name}: {nodes} nodes x {per_node}")
    if capacity < scale.num_workers:
        cap = "" if cluster.max_nodes is None else f", {cluster.max_nodes} nodes in all"
        problems.append(
            f"scale.num_workers={scale.num_workers} but the cluster holds at most {capacity} workers "
            f"({'; '.join(parts)}{cap}): raise the max nodes of a group or lower num_workers"
        )

    teacher = cfg.model.teacher
    if teacher.startswith("/"):
        for g in eligible:
            if g.models_dir is None or not PurePosixPath(teacher).is_relative_to(g.models_dir):
                problems.append(f"{g.name}: model.teacher {teacher} is outside the folder this "
                                f"cluster fills with checkpoints ({g.models_dir or 'none'})")
    return problems


def trellis_configs() -> list[Path]:
    return sorted((REPO / "jobs" / "configs").glob("trellis_*.yaml"))


def report() -> list[str]:
    """Every problem with the cluster files and their agreement with each trellis config."""
    from mdt_ray.config import load_config

    pin = ray_pin()
    launcher = load_yaml(LAUNCHER_FILE)
    raycluster = load_yaml(RAYCLUSTER_FILE)
    rayjob = load_yaml(RAYJOB_FILE)
    problems = [f"aws.yaml: {p}" for p in launcher_problems(launcher, pin)]
    problems += [f"raycluster.yaml: {p}" for p in kuberay_problems(raycluster["spec"], pin)]
    problems += [f"rayjob.yaml: {p}" for p in kuberay_problems(rayjob["spec"]["rayClusterSpec"], pin)]
    problems += [f"Dockerfile: {p}" for p in
                 base_image_problems(dockerfile_base_image(DOCKERFILE.read_text()), pin)]
    if problems:
        return problems

    on_aws = launcher_cluster(launcher)
    on_k8s = kuberay_cluster(raycluster["spec"])
    for path in trellis_configs():
        plain = load_config(path)
        overrides = submit_overrides(plain, on_aws)
        problems += [f"{path.name} on aws.yaml {overrides}: {p}"
                     for p in agreement_problems(load_config(path, overrides), on_aws)]
        problems += [f"{path.name} on raycluster.yaml: {p}" for p in agreement_problems(plain, on_k8s)]

    job_config, job_overrides = entrypoint_config(rayjob["spec"]["entrypoint"])
    job_cfg = load_config(job_config, job_overrides)
    problems += [f"rayjob.yaml entrypoint {job_config.name}: {p}" for p in
                 agreement_problems(job_cfg, kuberay_cluster(rayjob["spec"]["rayClusterSpec"]))]
    return problems


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # `python cluster/check.py` puts cluster/, not the repo, first
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # quiet prepare_config's notes
    found = report()
    for line in found:
        print(line)
    if not found:
        names = ", ".join(p.name for p in trellis_configs())
        print(f"cluster/ agrees with {names}")
    sys.exit(1 if found else 0)
