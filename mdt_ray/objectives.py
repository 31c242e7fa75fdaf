"""Distillation objectives: MDT-dist (VM + VD) and the consistency baselines (CM, PCM, sCM).

Pure functions of (student, teacher, batch, random draws). Nothing in here draws randomness that
the caller cannot pass in; `draw_inputs` is the one place that samples t and the noises.

Notation: f_S student, f_T frozen teacher, both called as f(x, 1000·t, c);
w the teacher's CFG scale; guided teacher velocity v_T = (1 + w)·f_T(x, c) − w·f_T(x, c∅).

Cost. One MDT-dist step (discrete derivative, both losses) needs 7 network passes without grad
(teacher c/c∅ at x_t and at the re-noised fake, the student at t − Δt for both, the student at the
re-noised fake) and 2 with grad (student at x_t and at the fake noise). They run as 3 batched
calls: one grad-carrying student call on 2B samples, one teacher call on 4B, one student call on
3B, so the step costs close to its floor of ~13 forward-pass equivalents.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from mdt_ray.flow import (
    Batch,
    batch_size,
    cat_batch,
    diffuse,
    expand_t,
    per_sample_mean,
    per_sample_norm,
    randn_like,
    sample_t,
    split_batch,
    velocity,
)

D_NORM_EPS = 0.1  # MDT-dist normalises D by (‖D‖ + 0.1); sCM's tangent normalisation uses the same constant
NUM_T_BINS = 10


def _net(model: torch.nn.Module) -> torch.nn.Module:
    # Passes without grad bypass a DDP wrapper: DDP's forward hooks expect a matching backward.
    return getattr(model, "module", model)


def _f32(x: Batch) -> Batch:
    # A guided velocity is (1 + w)·v_c − w·v_u with w up to 100: combine in fp32, whatever
    # precision the network ran in, or the cancellation eats the result.
    dtype = x.dtype if isinstance(x, torch.Tensor) else x.feats.dtype
    return x.float() if dtype in (torch.float16, torch.bfloat16) else x


def _forward(model: Callable, xs: Sequence[Batch], ts: Sequence[torch.Tensor], conds: Sequence[torch.Tensor]) -> list[Batch]:
    """One network call over several equal-sized batches, split back into its parts."""
    if len(xs) == 1:
        return [_f32(model(xs[0], 1000 * ts[0], conds[0]))]
    out = model(cat_batch(xs), 1000 * torch.cat(list(ts)), torch.cat(list(conds)))
    return [_f32(o) for o in split_batch(out, len(xs))]


def _teacher_velocities(
    teacher: torch.nn.Module,
    items: Sequence[tuple[Batch, torch.Tensor, float]],
    cond: torch.Tensor,
    neg_cond: torch.Tensor,
) -> list[Batch]:
    """Guided teacher velocities for several (x, t, w), cond and uncond passes in one call."""
    xs, ts, cs = [], [], []
    for x, t, w in items:
        xs.append(x), ts.append(t), cs.append(cond)
        if w > 0:
            xs.append(x), ts.append(t), cs.append(neg_cond)
    outs = iter(_forward(_net(teacher), xs, ts, cs))
    result = []
    for _, _, w in items:
        v = next(outs)
        if w > 0:
            v = (1 + w) * v - w * next(outs)
        result.append(v)
    return result


def _normalize(d: Batch) -> Batch:
    return d * expand_t(1.0 / (per_sample_norm(d) + D_NORM_EPS), d)


def _vm_target_from(v_teacher: Batch, d: Batch, t: torch.Tensor, d_norm: bool) -> Batch:
    """v_T − t·D, the velocity whose one-step jump x_t − t·v lands where the teacher ODE does."""
    if d_norm:
        d = _normalize(d)
    return v_teacher - expand_t(t, d) * d


def _student_jvp(student: torch.nn.Module, x: Batch, t: torch.Tensor, cond: torch.Tensor, tangent_x: Batch) -> tuple[Batch, Batch]:
    """(f_S(x, t), d/dt f_S along (dx/dt, dt/dt) = (tangent_x, 1)) by forward-mode AD."""
    net = _net(student)
    if isinstance(x, torch.Tensor):
        def fn(x_, t_):
            return _f32(net(x_, 1000 * t_, cond))

        out, tan = torch.func.jvp(fn, (x, t), (tangent_x.to(x.dtype), torch.ones_like(t)))
        return out, tan
    # Sparse batches: differentiate through the features only, the coordinates are fixed.
    def fn_sparse(f_, t_):
        return _f32(net(x.replace(f_), 1000 * t_, cond).feats)

    out, tan = torch.func.jvp(fn_sparse, (x.feats, t), (tangent_x.feats.to(x.feats.dtype), torch.ones_like(t)))
    return x.replace(out), x.replace(tan)


def _derivatives(
    student: torch.nn.Module,
    items: Sequence[tuple[Batch, torch.Tensor, Batch, Batch]],
    cond: torch.Tensor,
    *,
    dt: float,
    derivative: str,
    need_current: Sequence[bool],
) -> tuple[list[Batch], list[Optional[Batch]]]:
    """Time derivatives D of the student's velocity along the teacher ODE, for several inputs.

    Each item is (x_t, t, v_teacher, v_current) with v_current the student's (detached) velocity
    at (x_t, t), or None when it has to be computed here (`need_current`). Returns (D list,
    current-velocity list) where the second holds the velocities computed here.
    """
    if derivative == "discrete":
        xs, ts = [], []
        for (x, t, v_t, _), need in zip(items, need_current):
            if need:
                xs.append(x), ts.append(t)
            # One Euler step back toward data with the guided teacher velocity.
            xs.append(x - dt * v_t), ts.append(t - dt)
        outs = iter(_forward(_net(student), xs, ts, [cond] * len(xs)))
        ds, currents = [], []
        for (_, _, _, v_cur), need in zip(items, need_current):
            cur = next(outs) if need else None
            prev = next(outs)
            base = cur if need else v_cur
            ds.append((base - prev) / dt)
            currents.append(cur)
        return ds, currents
    if derivative == "continuous":
        x_all = cat_batch([it[0] for it in items])
        t_all = torch.cat([it[1] for it in items])
        v_all = cat_batch([it[2] for it in items])
        c_all = torch.cat([cond] * len(items))
        out, tan = _student_jvp(student, x_all, t_all, c_all, v_all)
        outs, tans = split_batch(out, len(items)), split_batch(tan, len(items))
        return list(tans), [o if need else None for o, need in zip(outs, need_current)]
    raise ValueError(f"derivative must be 'discrete' or 'continuous', got {derivative!r}")


def _pick(scale: float | Sequence[float], generator: Optional[torch.Generator]) -> float:
    """A CFG scale: the number itself, or one entry of a list drawn for the whole call."""
    if isinstance(scale, (int, float)):
        return float(scale)
    scale = list(scale)
    if not scale:
        raise ValueError("an empty list of CFG scales")
    i = int(torch.randint(len(scale), (1,), generator=generator).item())
    return float(scale[i])


def _mse(a: Batch, b: Batch) -> torch.Tensor:
    diff = a - b
    feats = _f32(diff if isinstance(diff, torch.Tensor) else diff.feats)
    return feats.pow(2).mean()


def _time_bins(per_sample: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum and count of a per-sample loss in 10 equal bins of t on [0, 1] (all-reducible)."""
    idx = (t.detach() * NUM_T_BINS).long().clamp_(0, NUM_T_BINS - 1)
    sums = torch.zeros(NUM_T_BINS, device=t.device).index_add_(0, idx, per_sample.detach().float())
    counts = torch.zeros(NUM_T_BINS, device=t.device).index_add_(0, idx, torch.ones_like(per_sample).float())
    return {"t_bin_sum": sums, "t_bin_count": counts}


# ---------------------------------------------------------------------------------------------
# MDT-dist


def vm_target(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    x0: Batch,
    noise: Batch,
    t: torch.Tensor,
    cond: torch.Tensor,
    neg_cond: torch.Tensor,
    *,
    dt: float,
    cfg_scale: float,
    d_norm: bool,
    sigma_min: float,
    derivative: str = "discrete",
) -> tuple[Batch, Batch]:
    """Velocity Matching prediction and target at (x0, noise, t): returns (v_pred, v_target).

    v_pred = f_S(x_t, t) carries the gradient; v_target = v_T − t·D has none, with D the
    student's time derivative along the guided teacher ODE: (sg(v_pred) − f_S(x_t − Δt·v_T,
    t − Δt))/Δt ("discrete", paper eq. 11) or a JVP along (v_T, 1) ("continuous").
    """
    x_t = diffuse(x0, noise, t, sigma_min)
    with torch.no_grad():
        (v_teacher,) = _teacher_velocities(teacher, [(x_t, t, cfg_scale)], cond, neg_cond)
    v_pred = _f32(student(x_t, 1000 * t, cond))
    with torch.no_grad():
        (d,), _ = _derivatives(
            student, [(x_t, t, v_teacher, v_pred.detach())], cond, dt=dt, derivative=derivative,
            need_current=[False],
        )
        v_target = _vm_target_from(v_teacher, d, t, d_norm)
    return v_pred, v_target


def mdt_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, x0: Batch, cond: torch.Tensor, neg_cond: torch.Tensor,
    *, noise: Batch, t: torch.Tensor,
    fake_noise: Optional[Batch],
    lambda_vm: float = 1.0,
    lambda_vd: float = 1.0,
    dt: float = 0.01,
    cfg_vm: float | Sequence[float] = 40.0,
    cfg_vd: float | Sequence[float] = 100.0,
    d_norm: bool = True,
    sigma_min: float = 1e-5,
    derivative: str = "discrete",
    generator: Optional[torch.Generator] = None,
) -> dict[str, Any]:
    """L = λ_VM·L_VM + λ_VD·L_VD (paper eq. 15). VM and VD share `noise` and `t`.

    VD (paper eq. 14): a one-step fake x_f = ε′ − f_S(ε′, 1) is re-noised with (noise, t); the VM
    residual r = ṽ_S − ṽ_target there, computed without grad, becomes the gradient of the
    student's one-step output: L_VD = λ·mean((r + v_f − sg(v_f))²), so ∂L_VD/∂v_f = 2λ·r/N.
    Returned losses are unweighted means over elements; `loss` carries the weights.
    A list-valued CFG scale is drawn once per call from `generator`.
    """
    w_vm, w_vd = _pick(cfg_vm, generator), _pick(cfg_vd, generator)
    use_vm = lambda_vm > 0
    use_vd = lambda_vd > 0
    if use_vd and fake_noise is None:
        raise ValueError("mdt_loss: lambda_vd > 0 needs fake_noise")
    if not (use_vm or use_vd):
        raise ValueError("mdt_loss: lambda_vm and lambda_vd are both 0; nothing to optimise")
    n = batch_size(x0)
    x_t = diffuse(x0, noise, t, sigma_min)

    # The two grad-carrying student passes as one call (one forward, one backward; DDP-friendly).
    grad_x, grad_t, grad_c = [], [], []
    if use_vm:
        grad_x.append(x_t), grad_t.append(t), grad_c.append(cond)
    if use_vd:
        grad_x.append(fake_noise), grad_t.append(torch.ones_like(t)), grad_c.append(cond)
    grad_out = _forward(student, grad_x, grad_t, grad_c)
    v_pred = grad_out[0] if use_vm else None
    v_fake = grad_out[-1] if use_vd else None

    with torch.no_grad():
        teacher_items = []
        if use_vm:
            teacher_items.append((x_t, t, w_vm))
        if use_vd:
            x_fake = fake_noise - v_fake.detach()
            xf_t = diffuse(x_fake, noise, t, sigma_min)
            teacher_items.append((xf_t, t, w_vd))
        v_teachers = _teacher_velocities(teacher, teacher_items, cond, neg_cond)

        items, need = [], []
        if use_vm:
            items.append((x_t, t, v_teachers[0], v_pred.detach())), need.append(False)
        if use_vd:
            items.append((xf_t, t, v_teachers[-1], None)), need.append(True)
        ds, currents = _derivatives(student, items, cond, dt=dt, derivative=derivative, need_current=need)
        targets = [_vm_target_from(vt, d, t, d_norm) for vt, d in zip(v_teachers, ds)]

    out: dict[str, Any] = {"cfg_vm": w_vm, "cfg_vd": w_vd}
    zero = torch.zeros((), device=t.device)
    loss_vm, loss_vd = zero, zero
    if use_vm:
        resid = v_pred - targets[0]
        loss_vm = _mse(v_pred, targets[0])
        out.update(_time_bins(per_sample_mean(resid.detach() * resid.detach()), t))
        out["d_magnitude"] = per_sample_norm(ds[0]).mean() / max(1, _numel_per_sample(x0)) ** 0.5
        out.update(_diagnostics("vm", resid.detach(), v_teachers[0], ds[0], t, d_norm))
    if use_vd:
        r = currents[-1] - targets[-1]
        loss_vd = _mse(r + v_fake, v_fake.detach())
        out.update(_diagnostics("vd", r, v_teachers[-1], ds[-1], t, d_norm))
    out["loss_vm"] = loss_vm.detach()
    out["loss_vd"] = loss_vd.detach()
    out["loss"] = lambda_vm * loss_vm + lambda_vd * loss_vd
    # The weighted terms with their graphs, for the per-term gradient norms of
    # `train.diagnostics` (mdt_ray/engine.py); the optimizer only ever sees `loss`.
    out["loss_terms"] = {name: w * term for name, w, term, used in
                         (("vm", lambda_vm, loss_vm, use_vm), ("vd", lambda_vd, loss_vd, use_vd)) if used}
    out["batch"] = n
    return out


def _rms(x: Batch) -> torch.Tensor:
    feats = _f32(x if isinstance(x, torch.Tensor) else x.feats)
    return feats.detach().pow(2).mean().sqrt()


def _diagnostics(term: str, resid: Batch, v_teacher: Batch, d: Batch, t: torch.Tensor, d_norm: bool) -> dict[str, torch.Tensor]:
    """Per-element RMS sizes of what a VM-style term sees: its residual, the teacher velocity,
    the raw derivative D and the correction t·D (normalised when `d_norm`) it subtracts from the
    teacher velocity. With d_norm, ‖t·D̂‖ < 1 per sample, so its per-element RMS is below
    1/√(elements): the measure of how little the derivative can move the target."""
    correction = expand_t(t, d) * (_normalize(d) if d_norm else d)
    return {f"diag_resid_{term}": _rms(resid), f"diag_v_teacher_{term}": _rms(v_teacher),
            f"diag_d_{term}": _rms(d), f"diag_correction_{term}": _rms(correction)}


def _numel_per_sample(x: Batch) -> int:
    if isinstance(x, torch.Tensor):
        return x[0].numel()
    return max(1, x.feats.numel() // max(1, x.batch_size))


# ---------------------------------------------------------------------------------------------
# Baselines


def phase_start(t_prev: torch.Tensor, phases: int) -> torch.Tensor:
    """PCM's target time: the largest phase boundary k/M not exceeding t − Δt."""
    return torch.floor(t_prev.clamp(min=0) * phases) / phases


def cm_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, x0: Batch, cond: torch.Tensor, neg_cond: torch.Tensor,
    *, noise: Batch, t: torch.Tensor,
    dt: float = 0.01,
    cfg_scale: float | Sequence[float] = 40.0,
    sigma_min: float = 1e-5,
    phases: int = 1,
    generator: Optional[torch.Generator] = None,
) -> dict[str, Any]:
    """Consistency distillation (Song et al. 2023) in velocity parameterisation.

    The consistency function jumps to the phase start s: F(x, t) = x − (t − s)·f_S(x, t); with
    one phase s = 0, which is plain CM. The target is F at the teacher's one-step-back neighbour
    (x_t − Δt·v_T, t − Δt) under stop-grad, the student's current weights serving as the target
    network as in MDT-dist's `cm` mode; distance is the mean squared error.
    """
    w = _pick(cfg_scale, generator)
    x_t = diffuse(x0, noise, t, sigma_min)
    t_prev = t - dt
    s = phase_start(t_prev, phases)
    v_pred = _f32(student(x_t, 1000 * t, cond))
    pred = x_t - expand_t(t - s, x_t) * v_pred
    with torch.no_grad():
        (v_teacher,) = _teacher_velocities(teacher, [(x_t, t, w)], cond, neg_cond)
        x_prev = x_t - dt * v_teacher
        (v_prev,) = _forward(_net(student), [x_prev], [t_prev], [cond])
        target = x_prev - expand_t(t_prev - s, x_prev) * v_prev
    loss = _mse(pred, target)
    out = {"loss": loss, "loss_cm": loss.detach(), "cfg_vm": w, "batch": batch_size(x0)}
    out.update(_time_bins(per_sample_mean((pred - target).detach() ** 2), t))
    return out


def pcm_loss(student, teacher, x0, cond, neg_cond, *, noise, t, phases: int = 2, **kw) -> dict[str, Any]:
    """Phased consistency (Wang et al. 2024): CM within each of `phases` equal time segments."""
    return cm_loss(student, teacher, x0, cond, neg_cond, noise=noise, t=t, phases=phases, **kw)


def scm_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, x0: Batch, cond: torch.Tensor, neg_cond: torch.Tensor,
    *, noise: Batch, t: torch.Tensor,
    cfg_scale: float | Sequence[float] = 40.0,
    sigma_min: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> dict[str, Any]:
    """Continuous-time consistency distillation (sCM, Lu & Song 2024), velocity parameterisation.

    F_θ(x, t) = x − t·f_S(x, t). The continuous CM gradient is ∇_θ E[F_θᵀ · g] with
    g = dF_θ⁻/dt along the teacher ODE = v_T − f_S − t·(d f_S/dt), the last term a JVP along
    (v_T, 1). With sCM's tangent normalisation g ← g/(‖g‖ + 0.1) that gradient is the gradient of
    mean((F_θ − sg(F_θ − g))²) up to a constant. Left out, as in MDT-dist's comparison: TrigFlow's
    time re-parameterisation, the adaptive weighting network and tangent warm-up.
    """
    w = _pick(cfg_scale, generator)
    x_t = diffuse(x0, noise, t, sigma_min)
    v_pred = _f32(student(x_t, 1000 * t, cond))
    pred = x_t - expand_t(t, x_t) * v_pred
    with torch.no_grad():
        (v_teacher,) = _teacher_velocities(teacher, [(x_t, t, w)], cond, neg_cond)
        (dv,), _ = _derivatives(
            student, [(x_t, t, v_teacher, None)], cond, dt=0.0, derivative="continuous", need_current=[False]
        )
        g = v_teacher - v_pred.detach() - expand_t(t, dv) * dv
        g = _normalize(g)
        target = pred.detach() - g
    loss = _mse(pred, target)
    out = {"loss": loss, "loss_scm": loss.detach(), "cfg_vm": w, "batch": batch_size(x0)}
    out.update(_time_bins(per_sample_mean(g * g), t))
    return out


def traj_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, x0: Batch, cond: torch.Tensor, neg_cond: torch.Tensor,
    *, noise: Batch, t: torch.Tensor,
    teacher_steps: int = 25,
    rescale_t: float = 3.0,
    cfg_scale: float | Sequence[float] = 0.0,
    sigma_min: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> dict[str, Any]:
    """Trajectory distillation (Luhman & Luhman 2021), the benchmark's ceiling: regress the
    student onto the endpoint of the teacher's own `teacher_steps`-step Euler ODE from the same
    noise. x_end = ODE_T(noise, cond); the student learns the straight path from noise to x_end
    (flow matching on the (noise, x_end) coupling, as in rectified-flow reflow), so that one Euler
    step from t = 1 lands on x_end and every Euler grid from noise keeps landing there. `x0`
    supplies only the batch's shape: the targets come from the teacher."""
    from mdt_ray.flow import sample

    del x0
    w = _pick(cfg_scale, generator)
    with torch.no_grad():
        x_end = _f32(sample(_net(teacher), noise, cond, neg_cond, steps=teacher_steps, cfg_strength=w,
                            rescale_t=rescale_t))
    x_t = diffuse(x_end, noise, t, sigma_min)
    v_pred = _f32(student(x_t, 1000 * t, cond))
    target = velocity(x_end, noise, sigma_min)
    loss = _mse(v_pred, target)
    out = {"loss": loss, "loss_traj": loss.detach(), "cfg_vm": w, "batch": batch_size(noise)}
    out.update(_time_bins(per_sample_mean((v_pred - target).detach() ** 2), t))
    return out


def fm_loss(
    model: torch.nn.Module,
    x0: Batch,
    cond: torch.Tensor,
    *,
    noise: Batch,
    t: torch.Tensor,
    drop: Optional[torch.Tensor] = None,
    sigma_min: float = 1e-5,
) -> dict[str, Any]:
    """Plain conditional flow matching (teacher pre-training); `drop` (B,) bool zeroes the cond
    of those samples, TRELLIS's CFG dropout."""
    if drop is not None:
        cond = torch.where(drop.reshape(-1, *([1] * (cond.dim() - 1))), torch.zeros_like(cond), cond)
    x_t = diffuse(x0, noise, t, sigma_min)
    v_pred = _f32(model(x_t, 1000 * t, cond))
    target = velocity(x0, noise, sigma_min)
    loss = _mse(v_pred, target)
    out = {"loss": loss, "loss_fm": loss.detach(), "batch": batch_size(x0)}
    out.update(_time_bins(per_sample_mean((v_pred - target).detach() ** 2), t))
    return out


# ---------------------------------------------------------------------------------------------
# Config glue: the one place that draws the random inputs of a step


def draw_inputs(x0: Batch, distill, generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """Noise, t and (for MDT-dist) fake noise for one step, from a `DistillConfig`."""
    method = distill.method
    steps_back = method in ("mdt", "vm", "cm", "pcm") and not (
        method in ("mdt", "vm") and distill.derivative == "continuous"
    )
    device = x0.device if isinstance(x0, torch.Tensor) else x0.feats.device
    t = sample_t(
        batch_size(x0), schedule=distill.t_schedule, mean=distill.t_mean, std=distill.t_std,
        dt=distill.dt if steps_back else 0.0, sigma_min=distill.sigma_min, generator=generator,
        device=device,
    )
    draws = {"noise": randn_like(x0, generator), "t": _half_at_one(t) if method == "traj" else t}
    if method == "mdt":
        draws["fake_noise"] = randn_like(x0, generator)
    if method in ("mdt", "vm") and distill.lambda_reg > 0:
        draws["reg_noise"] = randn_like(x0, generator)
        draws["reg_t"] = _half_at_one(sample_t(
            batch_size(x0), schedule=distill.t_schedule, mean=distill.t_mean, std=distill.t_std, dt=0.0,
            sigma_min=distill.sigma_min, generator=generator, device=device))
    if method == "fm" and distill.p_uncond > 0:
        draws["drop"] = torch.rand(batch_size(x0), generator=generator, device=device) < distill.p_uncond
    return draws


def _half_at_one(t: torch.Tensor) -> torch.Tensor:
    # Trajectory regression puts half of every batch at t = 1, the only time the 1-step sampler
    # asks the student about; the rest stay on the schedule, for the few-step grids.
    t = t.clone()
    t[::2] = 1.0
    return t


def with_regression(out: dict[str, Any], reg: dict[str, Any], weight: float) -> dict[str, Any]:
    """`out` (an MDT-dist / VM loss) plus `weight` × the trajectory-regression loss `reg`."""
    out = dict(out)
    out["loss"] = out["loss"] + weight * reg["loss"]
    out["loss_reg"] = reg["loss_traj"]
    out["loss_terms"] = {**out.get("loss_terms", {}), "reg": weight * reg["loss"]}
    return out


def _mdt_or_vm(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    out = _mdt_or_vm_only(distill, student, teacher, x0, cond, neg_cond, draws, generator)
    if distill.lambda_reg <= 0:
        return out
    reg = traj_loss(student, teacher, x0, cond, neg_cond, noise=draws["reg_noise"], t=draws["reg_t"],
                    teacher_steps=distill.traj_steps, rescale_t=distill.traj_rescale_t, cfg_scale=distill.cfg_vm,
                    sigma_min=distill.sigma_min, generator=generator)
    return with_regression(out, reg, distill.lambda_reg)


def _mdt_or_vm_only(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    return mdt_loss(
        student, teacher, x0, cond, neg_cond, noise=draws["noise"], t=draws["t"],
        fake_noise=draws.get("fake_noise"), lambda_vm=distill.lambda_vm,
        lambda_vd=distill.lambda_vd if distill.method == "mdt" else 0.0, dt=distill.dt, cfg_vm=distill.cfg_vm,
        cfg_vd=distill.cfg_vd, d_norm=distill.d_norm, derivative=distill.derivative, generator=generator,
        sigma_min=distill.sigma_min,
    )


def _cm_or_pcm(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    return cm_loss(
        student, teacher, x0, cond, neg_cond, noise=draws["noise"], t=draws["t"], dt=distill.dt,
        cfg_scale=distill.cfg_vm, phases=distill.phases if distill.method == "pcm" else 1, generator=generator,
        sigma_min=distill.sigma_min,
    )


def _scm(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    return scm_loss(student, teacher, x0, cond, neg_cond, noise=draws["noise"], t=draws["t"],
                    cfg_scale=distill.cfg_vm, generator=generator, sigma_min=distill.sigma_min)


def _traj(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    return traj_loss(student, teacher, x0, cond, neg_cond, noise=draws["noise"], t=draws["t"],
                     teacher_steps=distill.traj_steps, rescale_t=distill.traj_rescale_t, cfg_scale=distill.cfg_vm,
                     sigma_min=distill.sigma_min, generator=generator)


def _fm(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    return fm_loss(student, x0, cond, noise=draws["noise"], t=draws["t"], drop=draws.get("drop"),
                   sigma_min=distill.sigma_min)


# `distill.method` → the objective with the config's settings. A new objective is a pure loss
# function above plus one entry here (and its name in DistillConfig.method).
METHODS: dict[str, Callable[..., dict[str, Any]]] = {
    "mdt": _mdt_or_vm, "vm": _mdt_or_vm, "cm": _cm_or_pcm, "pcm": _cm_or_pcm, "scm": _scm, "fm": _fm,
    "traj": _traj,
}


def compute_loss(distill, student, teacher, x0: Batch, cond: torch.Tensor, draws: dict[str, Any],
                 generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """The loss of `distill.method` on one batch, with the draws of `draw_inputs`."""
    if distill.method not in METHODS:
        raise ValueError(f"unknown distill.method {distill.method!r}; known: {sorted(METHODS)}")
    return METHODS[distill.method](distill, student, teacher, x0, cond, torch.zeros_like(cond), draws, generator)
