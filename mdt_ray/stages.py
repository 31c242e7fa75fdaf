"""The two TRELLIS stages: the one place that knows how stage 1 and stage 2 differ.

Stage 1 (`ss`, `SparseStructureFlowModel`) generates a dense latent (8×16³) per asset; stage 2
(`slat`, `SLatFlowModel`) generates per-voxel features on voxels that stage 1 chose. Everything
else — the flow, the objectives, the optimizer step, the worker loop, sweeps, pre-training and
the evaluation report — is written once and asks its stage for:

* batches: how a worker reads its shard (`batches`), how an in-memory split is indexed (`Split`),
  how a batch splits into micro-batches (`micro_batches`);
* models: which TRELLIS classes belong to the stage, how a named size is built for a corpus, and
  what makes a model fit a corpus (`fit_problems`);
* evaluation: the noise every sampler starts from, sampling, scoring and the report's metrics.

To add a stage, subclass `Stage`, fill these in and register it in `STAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import numpy as np
import torch

from mdt_ray import flow, metrics

# A distilled student has the teacher's guidance built in (its targets are guided velocities), so
# it samples without CFG, on the plain grid that MDT-dist's own few-step snapshots use.
STUDENT_SAMPLER: dict[str, Any] = {"cfg_strength": 0.0, "cfg_interval": (0.0, 1.0), "rescale_t": 1.0}


def sample_kwargs(sampler: dict[str, Any]) -> dict[str, Any]:
    """flow.sample's guidance arguments from a sampler dict (steps excluded)."""
    return {"cfg_strength": float(sampler.get("cfg_strength", 0.0)),
            "cfg_interval": tuple(sampler.get("cfg_interval", (0.0, 1.0))),
            "rescale_t": float(sampler.get("rescale_t", 1.0))}


class SparseBank:
    """Per-asset (coords, feats) arrays that index like a dense tensor: `bank[idx]` is the
    SparseBatch of those assets and `len(bank)` the asset count."""

    def __init__(self, coords: Sequence[np.ndarray], feats: Sequence[np.ndarray]):
        if len(coords) != len(feats):
            raise ValueError(f"{len(coords)} coords arrays but {len(feats)} feats arrays")
        self.coords = [torch.as_tensor(np.asarray(c, dtype=np.int32)) for c in coords]
        self.feats = [torch.as_tensor(np.asarray(f, dtype=np.float32)) for f in feats]
        self.shape = (len(self.coords),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        from mdt_ray.models.sparse import SparseBatch

        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        return SparseBatch.from_list([self.coords[i] for i in rows], [self.feats[i] for i in rows])


@dataclass
class Split:
    """A corpus (or its first `limit` assets) in memory: held-out data for evaluation, or the
    training set of a single-process loop. `x0` is the stage's container (a dense float tensor,
    or a SparseBank), `cond` (N, T, C) float32; from an image corpus, until `encode_views` has
    run, `cond` holds each asset's first stored view, (N, 1, S, S, 3) uint8."""

    stage: "Stage"
    x0: Any
    cond: torch.Tensor
    asset_id: list[str]
    manifest: Any
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.asset_id)

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The assets `idx` in the layout a worker's batches have (`Stage.batches`)."""
        return self.stage.batch_of(self, idx, torch.device(device))

    def head(self, n: int) -> "Split":
        return self.stage.head(self, n)

    @property
    def holds_views(self) -> bool:
        return self.cond.dtype == torch.uint8

    def encode_views(self, conditioner) -> "Split":
        """The split with its fixed first views replaced by their condition tokens."""
        if self.holds_views:
            self.cond = conditioner.encode_first(self.cond)
        return self


def _split_cond(rows: dict[str, Any]) -> torch.Tensor:
    """A split's cond: the tokens, or (image corpora) each asset's first view, kept as stored."""
    if "views" in rows:
        return torch.from_numpy(np.ascontiguousarray(rows["views"][:, :1]))
    return torch.from_numpy(np.ascontiguousarray(rows["cond"])).float()


class Stage:
    name: ClassVar[str]
    number: ClassVar[int]  # TRELLIS's numbering: stage 1 makes the structure, stage 2 its features
    model_classes: ClassVar[tuple[str, ...]]
    # Report columns: (metric key, header, width, format); `metrics` also names the MLflow metrics.
    columns: ClassVar[tuple[tuple[str, str, int, str], ...]]
    in_training_metrics: ClassVar[tuple[str, ...]]
    # The teacher as TRELLIS samples the stage: the guidance-interval Euler sampler, 25 steps,
    # guidance on t ∈ [0.5, 1], time grid warped by rescale_t = 3 (guidance strength per stage).
    teacher_sampler: ClassVar[dict[str, Any]]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(c[0] for c in self.columns)

    def __repr__(self) -> str:
        return f"<stage {self.name}>"

    # --- data ----------------------------------------------------------------------------
    def batches(self, shard, batch_size: int, *, device, shuffle_buffer: int, seed: int,
                manifest=None) -> Iterator[dict[str, Any]]:
        """A worker's Ray Data shard as full batches (drop_last: every rank steps alike) in the
        stage's layout; `manifest` when the rows arrive as stored (decoded here)."""
        return self._reader()(shard, batch_size, device=device, drop_last=True, local_shuffle_buffer=shuffle_buffer,
                              seed=seed, manifest=manifest)

    def _reader(self) -> Callable[..., Iterator[dict[str, Any]]]:
        raise NotImplementedError

    def micro_batches(self, batch: dict[str, Any], n: int) -> list[tuple[Any, torch.Tensor]]:
        raise NotImplementedError

    def load(self, target, *, limit: Optional[int] = None, manifest=None) -> Split:
        """Read (the first `limit` assets of) a corpus into a Split, without Ray."""
        from mdt_ray.data.pipeline import load_local
        from mdt_ray.data.schema import read_manifest

        manifest = manifest or read_manifest(target)
        rows = load_local(target, stage=self.name, limit=limit, manifest=manifest)
        return self._split(rows, manifest)

    def _split(self, rows: dict[str, Any], manifest) -> Split:
        raise NotImplementedError

    def batch_of(self, split: Split, idx: torch.Tensor, device: torch.device) -> dict[str, Any]:
        raise NotImplementedError

    def head(self, split: Split, n: int) -> Split:
        raise NotImplementedError

    # --- models --------------------------------------------------------------------------
    def build_named(self, name: str, manifest) -> torch.nn.Module:
        from mdt_ray.models import build_model

        return build_model(name)

    def fit_problems(self, args: dict[str, Any], manifest, model_cfg=None) -> list[str]:
        """Why a model with TRELLIS config `args` cannot train on the corpus of `manifest`
        (with `model_cfg`, the run's model block: whether its image encoder fits too)."""
        problems = []
        if self.name not in manifest.stages:
            problems.append(f"the corpus holds no stage-{self.name!r} data (stages {list(manifest.stages)})")
        encoder = getattr(model_cfg, "image_encoder", None)
        if getattr(manifest, "views", 0):
            problems += _encoder_problems(args, manifest, model_cfg)
        elif encoder:
            problems.append(f"model.image_encoder is set ({encoder}) but the corpus holds cond tokens, not images; "
                            "unset it")
        elif args.get("cond_channels") != manifest.cond_shape[1]:
            problems.append(f"cond tokens {list(manifest.cond_shape)} (T, C) vs model "
                            f"cond_channels={args.get('cond_channels')}")
        return problems

    # --- evaluation ----------------------------------------------------------------------
    def noise(self, split: Split, seed: int) -> Any:
        """The starting noise of every sampler on `split`, the same for the same seed."""
        raise NotImplementedError

    def sampler_input(self, split: Split, noise: Any, start: int, stop: int, device) -> tuple[Any, torch.Tensor]:
        """(noise, cond) of assets start..stop as flow.sample takes them."""
        raise NotImplementedError

    def _samples(self, x: Any) -> np.ndarray:
        """flow.sample's output as the rows `score` compares."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, split: Split, noise: Any, *, steps: int, sampler: dict[str, Any],
                 batch_size: int = 64, device: torch.device | str = "cpu") -> np.ndarray:
        """Samples for every asset of `split` from `noise`, `batch_size` assets per sampler call."""
        if split.holds_views:
            from mdt_ray.config import ConfigError

            raise ConfigError(f"the split of {split.manifest.uri or 'this corpus'} holds condition images: encode them "
                              "first (Split.encode_views with the run's model.image_encoder)")
        out = []
        for start in range(0, len(split), batch_size):
            x, cond = self.sampler_input(split, noise, start, start + batch_size, device)
            y = flow.sample(model, x, cond, torch.zeros_like(cond), steps=steps, **sample_kwargs(sampler))
            out.append(self._samples(y))
        return np.concatenate(out)

    def report_settings(self, split: Split) -> dict[str, Any]:
        """What an evaluation report says about the split beyond its size."""
        return {}

    def score(self, samples: np.ndarray, split: Split, *, full: bool = False) -> dict[str, float]:
        """Quality of `samples` against the split (`full`: every metric, not just the cheap ones)."""
        raise NotImplementedError

    def decoder(self, split: Split) -> Optional[Callable[[np.ndarray], np.ndarray]]:
        """Samples → voxel occupancy, when the corpus decodes exactly (renders need it)."""
        return None

    def quick_eval(self, model: torch.nn.Module, split: Split, *, steps: Sequence[int] = (1, 2),
                   device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
        """The in-training eval: {"eval_<metric>_<k>step": ...} with the student's sampler."""
        was_training = model.training
        model.eval()
        noise = self.noise(split, seed)
        out: dict[str, float] = {}
        try:
            for k in steps:
                samples = self.generate(model, split, noise, steps=k, sampler=STUDENT_SAMPLER, device=device)
                out.update({f"eval_{m}_{k}step": float(v) for m, v in self.score(samples, split).items()})
        finally:
            model.train(was_training)
        return out


class DenseStage(Stage):
    """Stage 1: dense latents (C, R, R, R), split by rows."""

    name = "ss"
    number = 1
    model_classes = ("SparseStructureFlowModel",)
    columns = (("fd", "FD", 10, ".3f"), ("iou", "IoU", 8, ".3f"), ("cov", "COV", 8, ".3f"),
               ("mmd", "MMD", 8, ".3f"), ("nna", "1-NNA", 8, ".3f"))
    in_training_metrics = ("fd", "iou")
    # Guidance 1.0: TRELLIS-L uses 7.5, but the committed 1.45M-parameter teacher's FD grows with
    # guidance while IoU peaks at 1 (docs/benchmark.md has the sweep).
    teacher_sampler = {"steps": 25, "cfg_strength": 1.0, "cfg_interval": (0.5, 1.0), "rescale_t": 3.0}

    def _reader(self):
        from mdt_ray.data.pipeline import torch_batches

        return torch_batches

    def micro_batches(self, batch, n):
        x0, cond = batch["x0"], batch["cond"]
        if n > x0.shape[0]:
            raise ValueError(f"cannot split {x0.shape[0]} assets into {n} micro-batches")
        size = x0.shape[0] // n
        return [(x0[i * size : (i + 1) * size], cond[i * size : (i + 1) * size]) for i in range(n)]

    def _split(self, rows, manifest):
        return Split(self, torch.from_numpy(np.ascontiguousarray(rows["x0"])).float(), _split_cond(rows),
                     list(rows["asset_id"]), manifest, dict(manifest.source or {}))

    def batch_of(self, split, idx, device):
        cond = split.cond[idx].to(device)
        return {"x0": split.x0[idx].to(device).float(),
                **({"views": cond} if split.holds_views else {"cond": cond.float()})}

    def head(self, split, n):
        return Split(self, split.x0[:n], split.cond[:n], split.asset_id[:n], split.manifest, split.source)

    def fit_problems(self, args, manifest, model_cfg=None):
        problems = super().fit_problems(args, manifest, model_cfg)
        c, r = manifest.latent_shape[0], manifest.latent_shape[1]
        if args.get("in_channels") != c or args.get("resolution") != r:
            problems.append(f"latent {list(manifest.latent_shape)} vs model in_channels={args.get('in_channels')}, "
                            f"resolution={args.get('resolution')}")
        return problems

    def noise(self, split, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(len(split), *split.x0.shape[1:], generator=g)

    def sampler_input(self, split, noise, start, stop, device):
        return noise[start:stop].to(device), split.cond[start:stop].to(device)

    def _samples(self, x):
        return x.float().cpu().numpy()

    def decoder(self, split):
        # The synthetic and multimodal corpora decode exactly; TRELLIS latents need TRELLIS's VAE decoder.
        if split.source.get("kind") not in ("synthetic", "multimodal"):
            return None
        from mdt_ray.data.synthetic import decode_ss

        return decode_ss

    def score(self, samples, split, *, full=False):
        if split.source.get("kind") == "multimodal":
            # Its rows are draws of a known distribution: a sample is scored as the mode it is, if
            # any (precision, coverage, mode TV; IoU is the best-mode IoU), not against its own row.
            from mdt_ray.benchmark.score import score_split

            return score_split(samples, split)
        reference = split.x0.numpy()
        out = {"fd": metrics.frechet_distance(metrics.latent_features(samples), metrics.latent_features(reference))}
        decode = self.decoder(split)
        if decode is not None:
            gen_occ, ref_occ = decode(samples), decode(reference)
            out["iou"] = float(np.mean(metrics.iou(gen_occ, ref_occ)))
            if full:
                out.update(metrics.shape_metrics(gen_occ, ref_occ))
        return out


class SparseStage(Stage):
    """Stage 2: features on each asset's own voxels; batches split by balanced voxel counts."""

    name = "slat"
    number = 2
    model_classes = ("SLatFlowModel", "ElasticSLatFlowModel")
    columns = (("feat_mse", "feat MSE", 10, ".4f"), ("fd", "FD", 10, ".4f"))
    # The FD of per-voxel features is what catches a mean-like prediction's lost spread; the MSE
    # rewards it. Sweeps select on eval_fd_1step for both stages.
    in_training_metrics = ("feat_mse", "fd")
    # TRELLIS-L uses guidance 3 for stage 2; a teacher of a few hundred thousand parameters has a
    # far noisier conditional-minus-unconditional difference, which 3× mostly amplifies.
    teacher_sampler = {"steps": 25, "cfg_strength": 1.0, "cfg_interval": (0.5, 1.0), "rescale_t": 3.0}

    def _reader(self):
        from mdt_ray.data.pipeline import slat_batches

        return slat_batches

    def micro_batches(self, batch, n):
        from mdt_ray.models.sparse import SparseBatch

        counts = [int(c) for c in batch["counts"]]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        coords, feats, cond = batch["coords"][:, 1:], batch["feats"], batch["cond"]
        out = []
        for group in balanced_groups(counts, n):
            x = SparseBatch.from_list([coords[starts[i] : starts[i + 1]] for i in group],
                                      [feats[starts[i] : starts[i + 1]] for i in group])
            out.append((x, cond[group]))
        return out

    def _split(self, rows, manifest):
        return Split(self, SparseBank(rows["slat_coords"], rows["slat_feats"]), _split_cond(rows),
                     list(rows["asset_id"]), manifest, dict(manifest.source or {}))

    def batch_of(self, split, idx, device):
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        coords = [split.x0.coords[i] for i in rows]
        counts = torch.tensor([len(c) for c in coords], dtype=torch.int64)
        index = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), counts)
        return {"coords": torch.cat([index[:, None], torch.cat(coords)], dim=1).to(device),
                "feats": torch.cat([split.x0.feats[i] for i in rows]).to(device),
                "counts": counts, **({"views": split.cond[rows].to(device)} if split.holds_views
                                     else {"cond": split.cond[rows].to(device).float()})}

    def head(self, split, n):
        bank = SparseBank([], [])
        bank.coords, bank.feats, bank.shape = split.x0.coords[:n], split.x0.feats[:n], (min(n, len(split)),)
        return Split(self, bank, split.cond[:n], split.asset_id[:n], split.manifest, split.source)

    def build_named(self, name, manifest):
        from mdt_ray.models import build_model

        return build_model(name, resolution=manifest.slat_resolution)

    def fit_problems(self, args, manifest, model_cfg=None):
        problems = super().fit_problems(args, manifest, model_cfg)
        if args.get("in_channels") != manifest.slat_channels:
            problems.append(f"{manifest.slat_channels} SLAT channels vs model in_channels={args.get('in_channels')}")
        return problems

    def noise(self, split, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        channels = split.x0.feats[0].shape[1]
        flat = torch.randn(sum(len(c) for c in split.x0.coords), channels, generator=g)
        return list(flat.split([len(c) for c in split.x0.coords]))

    def sampler_input(self, split, noise, start, stop, device):
        """Noise on the voxels of assets start..stop (a SparseBatch), and their cond."""
        from mdt_ray.models.sparse import SparseBatch

        x = SparseBatch.from_list([c.to(device) for c in split.x0.coords[start:stop]],
                                  [n.to(device) for n in noise[start:stop]])
        return x, split.cond[start:stop].to(device)

    def _samples(self, x):
        return x.feats.float().cpu().numpy()

    def report_settings(self, split):
        return {"voxels": int(sum(len(c) for c in split.x0.coords))}

    def score(self, samples, split, *, full=False):
        reference = torch.cat(split.x0.feats).double().numpy()
        return {"feat_mse": float(np.mean((samples.astype(np.float64) - reference) ** 2)),
                "fd": metrics.frechet_distance(samples, reference)}


def _encoder_problems(args: dict[str, Any], manifest, model_cfg) -> list[str]:
    """What keeps model.image_encoder from encoding an image corpus for a teacher of `args`."""
    from mdt_ray.conditioning.encoder import EncoderError, arch_args

    views = f"the corpus holds condition images ({manifest.views} view(s) per asset)"
    if model_cfg is None or not model_cfg.image_encoder:
        return [f"{views} but no model.image_encoder is configured (a DINOv2 checkpoint that encodes them; "
                "TRELLIS uses dinov2_vitl14_reg4_pretrain.pth)"]
    from mdt_ray.models.teachers import from_root

    problems = []
    if not from_root(model_cfg.image_encoder).is_file():
        problems.append(f"model.image_encoder: no checkpoint file at {model_cfg.image_encoder}")
    try:
        width = arch_args(model_cfg.image_encoder_arch)["embed_dim"]
    except EncoderError as e:
        return problems + [str(e)]
    if width != args.get("cond_channels"):
        problems.append(f"model.image_encoder_arch makes tokens of width {width}, the teacher's cond_channels is "
                        f"{args.get('cond_channels')}")
    return problems


def balanced_groups(counts: Sequence[int], n: int) -> list[list[int]]:
    """Asset indices in `n` groups of near-equal total voxel count (TRELLIS's greedy longest
    first, into the lightest group), which is what bounds a micro-batch's memory; each group
    keeps its assets in their original order."""
    if n > len(counts):
        raise ValueError(f"cannot split {len(counts)} assets into {n} micro-batches")
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        g = min(range(n), key=lambda g: (load[g], len(groups[g])))
        groups[g].append(i)
        load[g] += counts[i]
    return [sorted(g) for g in groups]


STAGES: dict[str, Stage] = {s.name: s for s in (DenseStage(), SparseStage())}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {sorted(STAGES)}")
    return STAGES[name]


def stage_of_class(model_class: str) -> Stage:
    """The stage of a TRELLIS model class name (a checkpoint json's "name")."""
    for stage in STAGES.values():
        if model_class in stage.model_classes:
            return stage
    known = sorted(c for s in STAGES.values() for c in s.model_classes)
    raise ValueError(f"unknown TRELLIS model class {model_class!r}; known: {known}")


def stage_of_model(model: torch.nn.Module) -> Stage:
    return stage_of_class(type(model).__name__)
