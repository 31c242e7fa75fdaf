"""The optimizer step, written once: micro-batches → draws → loss → backward → clip → AdamW → EMA.

Every loop that trains a network calls this: the Ray Train worker (mdt_ray/train/loop.py), teacher
pre-training (mdt_ray/pretrain.py) and the benchmarks. It knows nothing of Ray, MLflow or files;
the caller owns the data order, logging and checkpoints.

A step is two halves so that a distributed caller can agree on finiteness between them:
`forward_backward` accumulates gradients over the micro-batches and returns the loss terms;
`apply` clips, steps the optimizer and updates the EMA; `discard` drops the gradients instead.
`step` does both for a single process.

Randomness: the draws of (rank, step, micro-batch) come from a generator seeded by
`step_seed(seed, rank, step, micro)`, so a run's RNG state is just (seed, step): a resumed run
redraws exactly what the original would have, without saving RNG blobs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from mdt_ray.flow import batch_size
from mdt_ray.objectives import NUM_T_BINS, compute_loss, draw_inputs


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """Seed of the random draws of (rank, step, micro-batch), a 63-bit hash of the four."""
    h = hashlib.blake2b(f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class GradClipper:
    """Clip the global grad norm to `max_norm`; with `percentile`, TRELLIS's adaptive variant:
    once `window` norms are recorded, clip to min(percentile of the recent norms, max_norm)."""

    def __init__(self, max_norm: Optional[float], percentile: Optional[float] = None, window: int = 1000):
        self.max_norm = max_norm
        self.percentile = percentile
        self.window = window
        self.history: list[float] = []

    def threshold(self) -> float:
        if self.max_norm is None:
            return float("inf")
        if self.percentile is not None and len(self.history) >= self.window:
            return min(float(np.percentile(self.history, self.percentile)), self.max_norm)
        return self.max_norm

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> float:
        """Clip in place; returns the norm before clipping."""
        limit = self.threshold()
        # clip_grad_norm_ with an infinite limit still has to compute the norm we report.
        norm = float(torch.nn.utils.clip_grad_norm_(list(params), limit if math.isfinite(limit) else 1e30))
        if self.percentile is not None and math.isfinite(norm):
            self.history.append(norm)
            del self.history[: -self.window]
        return norm

    def state(self) -> list[float]:
        return list(self.history)

    def load(self, history: list[float]) -> None:
        self.history = list(history)[-self.window :]


class EMA:
    """An fp32 exponential moving average of a model's parameters, keyed by parameter name.

    Kept as named tensors rather than a second module (torch.optim.swa_utils.AveragedModel)
    because checkpoints store it as a safetensors dict and TRELLIS export needs a plain module
    only once, at the end (`model_copy`). The update is a lerp per parameter rather than
    swa_utils' multi-tensor EMA function: that one needs every fp16/bf16 parameter cast to fp32
    at once, and measured slower on CPU (benchmarks/ema.py; figures in docs/performance.md)."""

    def __init__(self, model: torch.nn.Module, decay: float, *, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.updates = 0  # the step count: a resumed run sets it from its checkpoint's step
        self.shadow = {name: p.detach().clone().float() for name, p in _unwrap(model).named_parameters()}

    def decay_at(self, n: int) -> float:
        """The decay of update n (0-based). With warm-up it is capped at (1 + n)/(10 + n), as in
        TensorFlow's ExponentialMovingAverage(num_updates) and timm's ModelEmaV2 warm-up: without
        it a 200-step run at 0.999 would export weights 0.999^200 = 82 % the initial (teacher's)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def initial_weight(self, n: Optional[int] = None) -> float:
        """Share of the initial weights still in the average after n updates (default: so far)."""
        n = self.updates if n is None else n
        share = 1.0
        for i in range(n):
            share *= self.decay_at(i)
        return share

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.decay_at(self.updates)
        for name, p in _unwrap(model).named_parameters():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1 - decay)
        self.updates += 1

    def describe(self) -> str:
        """Which weights an evaluation of the average scores, for its report."""
        warm = ", warm-up (1+n)/(10+n)" if self.warmup else ""
        return (f"EMA weights (decay {self.decay:g}{warm}; {self.updates} updates, "
                f"{self.initial_weight():.1%} of the initial weights left)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for name in self.shadow:
            self.shadow[name] = tensors[name].detach().to(self.shadow[name].device).float().clone()

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, p in _unwrap(model).named_parameters():
            p.copy_(self.shadow[name])
        return model

    def model_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A new module: `model`'s architecture with the averaged weights."""
        return self.copy_to(copy.deepcopy(_unwrap(model)))


def averaged(model: torch.nn.Module, ema: Optional[EMA]) -> torch.nn.Module:
    """The weights to evaluate or export: the EMA's when one is kept, else the model itself."""
    return ema.model_copy(model) if ema is not None else _unwrap(model)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def autocast_for(mode: str, device: torch.device):
    """bf16/fp16 autocast on CUDA as `train.mixed_precision` asks; CPU always runs fp32."""
    if device.type != "cuda" or mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


@dataclass
class StepTerms:
    """What one step's forward/backward measured, before the update."""

    terms: dict[str, float]  # "loss", "loss_vm", ... averaged over micro-batches
    t_bins: torch.Tensor  # (2, NUM_T_BINS): per-t-bin loss sums and counts
    t_range: tuple[float, float]
    finite: bool = field(init=False)

    def __post_init__(self) -> None:
        self.finite = math.isfinite(self.terms.get("loss", float("nan")))


class Engine:
    """One network's optimizer step on (x0, cond) batches of a stage (mdt_ray.stages).

    `student` is the module whose parameters train; `forward_model` is what the objective calls
    (the DDP wrapper in a distributed run, else the student); `teacher` is frozen or None (flow
    matching). `train` is a TrainConfig (lr, betas, weight_decay, grad_clip*, ema, batch_split,
    mixed_precision, seed); `distill` a DistillConfig (the objective and its settings).
    `lr_at(step)`, when given, sets the learning rate of each step (pre-training's schedule).
    """

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module], *, stage, distill, train,
                 rank: int = 0, forward_model: Optional[torch.nn.Module] = None, keep_ema: bool = True,
                 lr_at: Optional[Callable[[int], float]] = None):
        self.student, self.teacher, self.stage = student, teacher, stage
        self.forward_model = forward_model if forward_model is not None else student
        self.distill, self.train, self.rank, self.lr_at = distill, train, rank, lr_at
        self.device = next(student.parameters()).device
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=train.lr, betas=tuple(train.betas),
                                           weight_decay=train.weight_decay)
        self.clipper = GradClipper(train.grad_clip, train.grad_clip_percentile, train.grad_clip_window)
        self.ema = EMA(student, train.ema, warmup=train.ema_warmup) if keep_ema and train.ema > 0 else None
        self.param_names = {i: n for i, (n, _) in enumerate(student.named_parameters())}

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _sync_context(self, last: bool):
        """DDP all-reduces gradients on every backward; accumulation only needs the last one."""
        if last or self.forward_model is self.student or not hasattr(self.forward_model, "no_sync"):
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def forward_backward(self, batch: dict[str, Any], step: int) -> StepTerms:
        """Accumulate the gradients of `batch` (split into `train.batch_split` micro-batches)."""
        n = self.train.batch_split
        terms: dict[str, float] = {}
        bins = torch.zeros(2, NUM_T_BINS, device=self.device)
        t_lo, t_hi = float("inf"), float("-inf")
        for m, (x0, cond) in enumerate(self.stage.micro_batches(batch, n)):
            gen = torch.Generator(device=self.device).manual_seed(step_seed(self.train.seed, self.rank, step, m))
            with self._sync_context(m == n - 1), autocast_for(self.train.mixed_precision, self.device):
                draws = draw_inputs(x0, self.distill, gen)
                out = compute_loss(self.distill, self.forward_model, self.teacher, x0, cond, draws, gen)
                if self.train.diagnostics:
                    out.update(self._term_grad_norms(out.get("loss_terms", {})))
                (out["loss"] / n).backward()
            for k, v in out.items():
                if k.startswith(("loss", "diag_")) and k != "loss_terms":
                    terms[k] = terms.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / n
            if "t_bin_sum" in out:
                bins[0] += out["t_bin_sum"]
                bins[1] += out["t_bin_count"]
            t_lo, t_hi = min(t_lo, float(draws["t"].min())), max(t_hi, float(draws["t"].max()))
        return StepTerms(terms, bins, (t_lo, t_hi))

    def _term_grad_norms(self, loss_terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """`train.diagnostics`: the gradient norm of each weighted loss term on its own (one extra
        backward pass per term, graphs kept for the real backward that follows). torch.autograd.grad
        fills no .grad and fires no DDP reducer hook, so the update is the same with or without it."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        norms = {}
        for name, term in loss_terms.items():
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
            norms[f"diag_grad_{name}"] = sq ** 0.5
        return norms

    def apply(self, step: int) -> float:
        """Clip, step AdamW (at `lr_at(step)` when scheduled), update the EMA; returns the
        gradient norm before clipping."""
        if self.lr_at is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
        grad_norm = self.clipper(self.student.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.student)
        return grad_norm

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: dict[str, Any], step: int) -> tuple[StepTerms, float]:
        """Both halves in one process; a non-finite loss raises FloatingPointError, no update."""
        measured = self.forward_backward(batch, step)
        if not measured.finite:
            self.discard()
            raise FloatingPointError(
                f"non-finite loss at step {step} ({self.distill.method}, lr {self.lr:.3g}): "
                + ", ".join(f"{k}={v:.4g}" for k, v in measured.terms.items()))
        return measured, self.apply(step)

    def averaged_model(self) -> torch.nn.Module:
        return averaged(self.student, self.ema)

    # Health of the weights after `apply`: the loss guard sees the weights before the update only.
    @torch.no_grad()
    def weights_finite(self) -> torch.Tensor:
        """Whether every student parameter (and EMA tensor) is finite: a 0-dim bool tensor on the
        engine's device, for a distributed caller to all-reduce. One max-|w| per tensor, which
        (unlike a sum or a 2-norm) cannot overflow on finite weights."""
        tensors = [p.detach() for p in self.student.parameters()]
        if self.ema is not None:
            tensors += list(self.ema.shadow.values())
        maxima = torch._foreach_norm(tensors, float("inf"))
        return torch.isfinite(torch.stack([m.float() for m in maxima])).all()

    @torch.no_grad()
    def outputs_finite(self, batch: dict[str, Any]) -> torch.Tensor:
        """Whether the student, and the network with the EMA weights, give finite velocities on
        the first micro-batch of `batch` at t = 0.5 (a 0-dim bool tensor). Finite weights can
        still overflow in the forward pass (activations too large for attention), and a checkpoint
        of them is no good checkpoint: call this before writing one."""
        x0, cond = self.stage.micro_batches(batch, self.train.batch_split)[0]
        t = torch.full((batch_size(x0),), 500.0, device=self.device)
        ok = torch.ones((), dtype=torch.bool, device=self.device)
        weights = [None] + ([self.ema.shadow] if self.ema is not None else [])
        with autocast_for(self.train.mixed_precision, self.device):
            for named in weights:
                out = (self.student(x0, t, cond) if named is None
                       else torch.func.functional_call(self.student, named, (x0, t, cond)))
                ok &= torch.isfinite(out if isinstance(out, torch.Tensor) else out.feats).all()
        return ok

    # Checkpoint contents (mdt_ray/train/state.py writes them to safetensors + JSON).
    def optimizer_tensors(self) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """AdamW state as `<param name>.<state key>` tensors plus the JSON-able param groups."""
        sd = self.optimizer.state_dict()
        tensors = {}
        for idx, st in sd["state"].items():
            for key, value in st.items():
                tensors[f"{self.param_names[idx]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return tensors, [dict(g) for g in sd["param_groups"]]

    def load_optimizer(self, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for idx, name in self.param_names.items():
            prefix = name + "."
            entry = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
            if entry:
                state[idx] = entry
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
