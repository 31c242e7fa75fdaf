"""Validated run configuration: one YAML file plus `--set dotted.key=value` overrides.

Every block forbids unknown keys, so a typo is an error that names the key instead of a silently
ignored setting. The dotted names (`distill.lambda_vd`, `train.steps`, ...) are also the MLflow
param names.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the dotted key (or the file)."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CfgScale = Union[float, list[float]]


def _check_cfg(value: CfgScale) -> CfgScale:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("must be a number or a non-empty list of numbers")
    for v in values:
        if v < 0:
            raise ValueError(f"guidance scale must be >= 0, got {v}")
    return value


class ModelConfig(_Block):
    # A built-in size name (see mdt_ray.models.registry.NAMED_CONFIGS) or a path to a TRELLIS
    # `<name>.json` whose `<name>.safetensors` lies beside it.
    teacher: str = "ss-demo"
    stage: Literal["ss", "slat"] = "ss"
    # Run the frozen teacher (and image encoder) in bf16 on GPU (they never need fp32 master weights).
    teacher_bf16: bool = True
    # Image corpora (views, not tokens): the frozen DINOv2 that encodes the drawn view on every
    # worker. A checkpoint path (DINOv2's own `dinov2_vitl14_reg4_pretrain.pth` state dict or a
    # .safetensors file) and its architecture: a name of mdt_ray.conditioning.ARCHS or a dict of
    # DINOv2's constructor arguments (embed_dim, depth, num_heads, patch_size, num_register_tokens,
    # img_size).
    image_encoder: Optional[str] = None
    image_encoder_arch: Union[str, dict[str, int]] = "dinov2_vitl14_reg"

    @field_validator("teacher")
    @classmethod
    def _known_teacher(cls, v: str) -> str:
        from mdt_ray.models.registry import NAMED_CONFIGS

        if v in NAMED_CONFIGS:
            return v
        looks_like_path = v.endswith(".json") or "/" in v or v.startswith("s3://")
        if not looks_like_path:
            raise ValueError(
                f"unknown model name {v!r}; use one of {sorted(NAMED_CONFIGS)} "
                "or a path to a TRELLIS <name>.json"
            )
        return v

    @field_validator("image_encoder_arch")
    @classmethod
    def _known_arch(cls, v: Union[str, dict[str, int]]) -> Union[str, dict[str, int]]:
        from mdt_ray.conditioning.encoder import arch_args

        arch_args(v)  # an EncoderError (a ValueError) names what is wrong
        return v


class DistillConfig(_Block):
    method: Literal["mdt", "vm", "cm", "pcm", "scm", "fm", "traj"] = "mdt"
    lambda_vm: float = Field(1.0, ge=0)
    lambda_vd: float = Field(1.0, ge=0)
    dt: float = Field(0.01, gt=0, le=0.5)
    derivative: Literal["discrete", "continuous"] = "discrete"
    cfg_vm: CfgScale = 40.0
    cfg_vd: CfgScale = 100.0
    d_norm: bool = True
    t_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    t_mean: float = 1.0
    t_std: float = Field(1.0, gt=0)
    sigma_min: float = Field(1e-5, ge=0, lt=0.1)
    phases: int = Field(1, ge=1, le=64)  # PCM phase count; 1 reduces PCM to plain CM targets
    p_uncond: float = Field(0.0, ge=0, le=1)  # cond dropout (plain flow matching / pretraining)
    # `traj` (trajectory distillation, the benchmark's ceiling): the teacher ODE it regresses onto.
    traj_steps: int = Field(25, ge=1)
    traj_rescale_t: float = Field(3.0, gt=0)
    # `mdt` / `vm`: weight of an added `traj` regression term (DMD's regression loss, Yin et al.
    # 2024): VD is mode-seeking, and the ODE pairs tie each noise to its own mode (docs/benchmark.md).
    lambda_reg: float = Field(0.0, ge=0)

    _cfg_vm = field_validator("cfg_vm")(classmethod(lambda cls, v: _check_cfg(v)))
    _cfg_vd = field_validator("cfg_vd")(classmethod(lambda cls, v: _check_cfg(v)))

    @model_validator(mode="after")
    def _reg_only_where_used(self) -> "DistillConfig":
        if self.lambda_reg > 0 and self.method not in ("mdt", "vm"):
            raise ValueError(f"lambda_reg applies to method mdt or vm only (method is {self.method!r})")
        return self


class TrainConfig(_Block):
    steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)  # per worker, per optimizer step
    batch_split: int = Field(1, gt=0)  # micro-batches per step (gradient accumulation)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    ema: float = Field(0.999, ge=0, lt=1)
    # Cap the decay of update n at (1 + n)/(10 + n) (TensorFlow's and timm's EMA warm-up), so a
    # short run's average is not mostly its initial weights (mdt_ray/engine.py, EMA.decay_at).
    ema_warmup: bool = True
    # Log what the loss sees each step: residual and velocity sizes and, at one extra backward
    # pass per loss term, each term's own gradient norm (diag_* metrics, docs/benchmark.md).
    diagnostics: bool = False
    grad_clip: Optional[float] = Field(1.0, gt=0)  # max global norm; null disables clipping
    # TRELLIS's adaptive clip: after `grad_clip_window` steps clip to min(percentile, grad_clip).
    grad_clip_percentile: Optional[float] = Field(None, gt=0, le=100)
    grad_clip_window: int = Field(1000, gt=0)
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_assets: int = Field(32, gt=0)
    eval_steps: list[int] = Field(default_factory=lambda: [1, 2])
    seed: int = 0
    # A worker that waits this long for its next batch stops with an error saying where it
    # waits, instead of hanging (Ray Data starved of CPUs, a silent store); 0 waits forever.
    batch_timeout_s: float = Field(300.0, ge=0)
    # A checkpoint upload still running after this long means a store that stopped answering
    # mid-upload (the SDK's own timeouts do not end it): the worker stops, and the run restarts
    # from its last complete checkpoint. Raise it for checkpoints that take longer on your link
    # (a 9 GB TRELLIS-L checkpoint at 100 MB/s takes 90 s); 0 waits forever.
    upload_timeout_s: float = Field(600.0, ge=0)
    # Upload every checkpoint but the final one in Ray Train's background thread
    # (CheckpointUploadMode.ASYNC) while training goes on; the loop waits only for the write.
    async_upload: bool = True

    @model_validator(mode="after")
    def _split_divides(self) -> "TrainConfig":
        if self.batch_size % self.batch_split:
            raise ValueError(
                f"train.batch_split ({self.batch_split}) must divide train.batch_size "
                f"({self.batch_size})"
            )
        return self


class DataConfig(_Block):
    uri: str = "data/demo-corpus"
    eval_uri: Optional[str] = None  # held-out corpus for the in-training eval
    shuffle: bool = True
    # Rows buffered for local shuffling on top of file-level shuffling; 0 disables it.
    shuffle_buffer: int = Field(256, ge=0)
    # The same batches in the same order on every run of a config (and on a resume) for a given
    # train.seed and scale.num_workers: Ray Data's order-preserving execution. False lets Ray
    # Data hand blocks to workers as read tasks finish (docs/reliability.md has the cost).
    deterministic: bool = True
    storage_endpoint: Optional[str] = None  # S3-compatible endpoint; AWS_ENDPOINT_URL otherwise
    storage_region: Optional[str] = None


class ScaleConfig(_Block):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    # Fractional CPUs keep a 2-core machine from starving Ray Data's read tasks (Ray 2.60: a run
    # whose workers hold every CPU waits forever for the read tasks' resources).
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    accelerator_type: Optional[str] = None  # e.g. "A100"; pins workers to that GPU type


class TrackingConfig(_Block):
    enabled: bool = True
    uri: Optional[str] = None  # MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "mdt-ray"

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class RunConfig(_Block):
    name: str = "mdt-demo"
    storage_path: str = "runs"
    resume: bool = False
    max_failures: int = Field(2, ge=-1)
    num_to_keep: int = Field(3, gt=0)  # checkpoints kept in storage
    # Chaos testing: the last worker SIGKILLs itself once at this step (not after a restore), to check
    # that the run recovers from its last checkpoint. Never set in production configs.
    inject_failure_at_step: Optional[int] = Field(None, ge=0)


class Config(_Block):
    model: ModelConfig = Field(default_factory=ModelConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the resolved config (the MLflow params)."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ValidationError.title -> the model it validated (the models whose unknown keys get a suggestion).
_MODELS: dict[str, type[BaseModel]] = {"Config": Config}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the block at `loc[:-1]` of `model` allows (empty when the path leaves the models)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _suggestion(model: type[BaseModel], loc: tuple) -> str:
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            model = getattr(err, "title", None)
            msg = "unknown key" + (_suggestion(_MODELS[model], e["loc"]) if model in _MODELS else "")
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key part in {item!r}")
    # YAML scalars: `1e-4`, `true`, `[1, 2]`, `null` all become the obvious Python value.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = dict(tree)
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a block")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return tree


def from_dict(tree: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (a job, sweep or pre-training config)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of blocks, got {type(loaded).__name__}")
    return loaded


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, block by block (nested mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None, *,
                defaults: Optional[dict[str, Any]] = None, defaults_name: str = "defaults") -> Config:
    """The one config loader: `defaults` (a tree; the schema's defaults when None), then the YAML
    file on top block by block, then `--set` overrides."""
    tree: dict[str, Any] = copy.deepcopy(defaults or {})
    source = defaults_name
    if path is not None:
        tree = merge(tree, read_yaml(path))
        source = str(path) if defaults is None else f"{path} over the {defaults_name}"
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " with --set overrides"
    from mdt_ray.config_paths import resolve_tree

    return from_dict(resolve_tree(tree), source)


def add_config_args(parser) -> None:
    """The `--config FILE --set key=value ...` pair every entry point takes."""
    parser.add_argument("--config", help="YAML config file (jobs/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set distill.lambda_vd=0.5 (repeatable)",
    )
