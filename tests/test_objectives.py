"""MDT-dist and baseline objectives against independent hand computations."""

import copy

import pytest
import torch

from mdt_ray import objectives as obj
from mdt_ray.config import DistillConfig
from tests.toy import ToyFlow

SIG = 1e-5


def _setup(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    teacher = ToyFlow(seed=1)
    student = ToyFlow(seed=2)
    x0 = torch.randn(b, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(b, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(b, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(b, 4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.55, 0.93], dtype=torch.float64)[:b]
    return teacher, student, x0, noise, fake, cond, t


def _hand_vm_target(student, teacher, x0, noise, t, cond, *, dt, w, d_norm):
    """The VM target (paper eq. for L_VM), written out sample by sample with no batching tricks."""
    out = []
    for i in range(x0.shape[0]):
        ti = float(t[i])
        xt = (1 - ti) * x0[i : i + 1] + (SIG + (1 - SIG) * ti) * noise[i : i + 1]
        c, tt = cond[i : i + 1], torch.tensor([1000 * ti], dtype=torch.float64)
        vt = teacher(xt, tt, c)
        vt = (1 + w) * vt - w * teacher(xt, tt, torch.zeros_like(c))
        vs = student(xt, tt, c)
        vprev = student(xt - dt * vt, torch.tensor([1000 * (ti - dt)], dtype=torch.float64), c)
        d = (vs - vprev) / dt
        if d_norm:
            d = d / (d.norm() + 0.1)
        out.append((vs, vt - ti * d))
    return torch.cat([o[0] for o in out]).detach(), torch.cat([o[1] for o in out]).detach()


@pytest.mark.parametrize("d_norm", [True, False])
def test_vm_target_equals_hand_computation(d_norm):
    teacher, student, x0, noise, _, cond, t = _setup()
    v_pred, v_tgt = obj.vm_target(student, teacher, x0, noise, t, cond, torch.zeros_like(cond),
                                  dt=0.01, cfg_scale=4.0, d_norm=d_norm, sigma_min=SIG)
    hp, ht = _hand_vm_target(student, teacher, x0, noise, t, cond, dt=0.01, w=4.0, d_norm=d_norm)
    assert v_pred.requires_grad and not v_tgt.requires_grad
    torch.testing.assert_close(v_pred.detach(), hp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_tgt, ht, rtol=1e-10, atol=1e-12)


def test_mdt_loss_batched_path_agrees_with_vm_target():
    teacher, student, x0, noise, fake, cond, t = _setup()
    neg = torch.zeros_like(cond)
    out = obj.mdt_loss(student, teacher, x0, cond, neg, noise=noise, t=t, fake_noise=fake,
                       lambda_vm=1.0, lambda_vd=0.5, dt=0.01, cfg_vm=3.0, cfg_vd=6.0)
    v_pred, v_tgt = obj.vm_target(student, teacher, x0, noise, t, cond, neg, dt=0.01, cfg_scale=3.0,
                                  d_norm=True, sigma_min=SIG)
    torch.testing.assert_close(out["loss_vm"], ((v_pred - v_tgt) ** 2).mean().detach())
    x_fake = (fake - student(fake, torch.full((3,), 1000.0, dtype=torch.float64), cond)).detach()
    vs_f, vt_f = obj.vm_target(student, teacher, x_fake, noise, t, cond, neg, dt=0.01, cfg_scale=6.0,
                               d_norm=True, sigma_min=SIG)
    torch.testing.assert_close(out["loss_vd"], ((vs_f - vt_f) ** 2).mean().detach())
    torch.testing.assert_close(out["loss"].detach(), out["loss_vm"] + 0.5 * out["loss_vd"])
    assert out["t_bin_count"].sum() == 3


class _Recorder(torch.nn.Module):
    """Wraps a student and keeps its last grad-carrying output, so a test can read the gradient
    that the loss sends into it."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.last = None

    def forward(self, x, t, c):
        y = self.net(x, t, c)
        if torch.is_grad_enabled() and y.requires_grad:
            y.retain_grad()
            self.last = y
        return y


def test_vd_gradient_on_the_fake_sample_is_2_lambda_residual():
    teacher, student, x0, noise, fake, cond, t = _setup()
    rec, neg, lam = _Recorder(student), torch.zeros_like(cond), 0.7
    out = obj.mdt_loss(rec, teacher, x0, cond, neg, noise=noise, t=t, fake_noise=fake,
                       lambda_vm=1.0, lambda_vd=lam, dt=0.01, cfg_vm=2.0, cfg_vd=5.0)
    out["loss"].backward()
    grad_vf = rec.last.grad[3:]  # the grad call is [x_t (B), fake noise (B)]
    x_fake = (fake - student(fake, torch.full((3,), 1000.0, dtype=torch.float64), cond)).detach()
    vs_f, vt_f = obj.vm_target(student, teacher, x_fake, noise, t, cond, neg, dt=0.01, cfg_scale=5.0,
                               d_norm=True, sigma_min=SIG)
    residual = (vs_f - vt_f).detach()
    # mean over N elements: dL/dv_f = 2λ·r/N; the fake x_f = ε' − v_f moves along +2λ·r.
    torch.testing.assert_close(grad_vf * residual.numel(), 2 * lam * residual, rtol=1e-9, atol=1e-12)


def test_continuous_and_discrete_targets_agree_as_dt_shrinks():
    teacher, student, x0, noise, _, cond, t = _setup()
    neg = torch.zeros_like(cond)
    kw = dict(cfg_scale=2.0, d_norm=False, sigma_min=SIG)
    _, cont = obj.vm_target(student, teacher, x0, noise, t, cond, neg, dt=0.01, derivative="continuous", **kw)
    errs = []
    for dt in (1e-2, 1e-3, 1e-4):
        _, disc = obj.vm_target(student, teacher, x0, noise, t, cond, neg, dt=dt, derivative="discrete", **kw)
        errs.append(float((disc - cont).norm() / cont.norm()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4
    with pytest.raises(ValueError, match="derivative"):
        obj.vm_target(student, teacher, x0, noise, t, cond, neg, dt=0.01, derivative="spline", **kw)


def test_mdt_loss_pass_count_is_three_batched_calls():
    teacher, student, x0, noise, fake, cond, t = _setup()
    teacher.calls = student.calls = 0
    obj.mdt_loss(student, teacher, x0, cond, torch.zeros_like(cond), noise=noise, t=t, fake_noise=fake,
                 cfg_vm=1.0, cfg_vd=1.0)
    assert (teacher.calls, student.calls) == (1, 2)


def test_list_cfg_scale_is_drawn_from_the_list_per_call():
    teacher, student, x0, noise, fake, cond, t = _setup()
    seen = set()
    for s in range(12):
        out = obj.mdt_loss(student, teacher, x0, cond, torch.zeros_like(cond), noise=noise, t=t,
                           fake_noise=fake, cfg_vm=[1.0, 7.0], cfg_vd=2.0,
                           generator=torch.Generator().manual_seed(s))
        seen.add(out["cfg_vm"])
    assert seen == {1.0, 7.0}


def test_cm_and_pcm_targets_by_hand():
    teacher, student, x0, noise, _, cond, t = _setup()
    neg = torch.zeros_like(cond)
    dt, w = 0.02, 1.5
    for phases in (1, 2, 4):
        if phases == 1:
            out = obj.cm_loss(student, teacher, x0, cond, neg, noise=noise, t=t, dt=dt, cfg_scale=w)
        else:  # the public PCM entry point, checked against the same hand computation
            out = obj.pcm_loss(student, teacher, x0, cond, neg, noise=noise, t=t, dt=dt, cfg_scale=w, phases=phases)
        total = 0.0
        for i in range(3):
            ti = float(t[i])
            s = int((ti - dt) * phases) / phases
            xt = (1 - ti) * x0[i : i + 1] + (SIG + (1 - SIG) * ti) * noise[i : i + 1]
            c, tt = cond[i : i + 1], torch.tensor([1000 * ti], dtype=torch.float64)
            vt = (1 + w) * teacher(xt, tt, c) - w * teacher(xt, tt, neg[:1])
            pred = xt - (ti - s) * student(xt, tt, c)
            xp = xt - dt * vt
            tgt = xp - (ti - dt - s) * student(xp, torch.tensor([1000 * (ti - dt)], dtype=torch.float64), c)
            total += float(((pred - tgt) ** 2).sum().detach())
        assert float(out["loss"]) == pytest.approx(total / x0.numel(), rel=1e-10)
    assert obj.phase_start(torch.tensor([0.26, 0.5, 0.74, 0.999]), 4).tolist() == [0.25, 0.5, 0.5, 0.75]


def test_scm_gradient_is_the_normalised_tangent():
    teacher, student, x0, noise, _, cond, t = _setup()
    rec, neg, w = _Recorder(student), torch.zeros_like(cond), 2.0
    out = obj.scm_loss(rec, teacher, x0, cond, neg, noise=noise, t=t, cfg_scale=w)
    out["loss"].backward()
    grad_v = rec.last.grad
    # Independent tangent: dF/dt along the teacher ODE by central finite differences in t.
    xt = (1 - t.reshape(-1, 1, 1, 1, 1)) * x0 + (SIG + (1 - SIG) * t.reshape(-1, 1, 1, 1, 1)) * noise
    with torch.no_grad():
        tt = 1000 * t
        vt = (1 + w) * teacher(xt, tt, cond) - w * teacher(xt, tt, neg)
        h = 1e-6
        def F(x, s):
            return x - s.reshape(-1, 1, 1, 1, 1) * student(x, 1000 * s, cond)
        g = (F(xt + h * vt, t + h) - F(xt - h * vt, t - h)) / (2 * h)
        g = g / (g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1, 1) + 0.1)
    # loss = mean((F − sg(F − g))²) with F = x − t·v: dL/dv = −2·t·g/N.
    expected = -2 * t.reshape(-1, 1, 1, 1, 1) * g / g.numel()
    torch.testing.assert_close(grad_v, expected, rtol=1e-6, atol=1e-12)


def test_fm_loss_with_cond_dropout():
    teacher, _, x0, noise, _, cond, t = _setup()
    drop = torch.tensor([True, False, True])
    out = obj.fm_loss(teacher, x0, cond, noise=noise, t=t, drop=drop)
    c = cond.clone()
    c[drop] = 0
    xt = (1 - t.reshape(-1, 1, 1, 1, 1)) * x0 + (SIG + (1 - SIG) * t.reshape(-1, 1, 1, 1, 1)) * noise
    ref = ((teacher(xt, 1000 * t, c) - ((1 - SIG) * noise - x0)) ** 2).mean()
    torch.testing.assert_close(out["loss"], ref)


def test_traj_loss_regresses_the_straight_path_to_the_teacher_ode_endpoint():
    teacher, student, x0, noise, _, cond, t = _setup()
    neg = torch.zeros_like(cond)
    out = obj.traj_loss(student, teacher, x0, cond, neg, noise=noise, t=t, teacher_steps=4, rescale_t=1.0,
                        cfg_scale=2.0)
    # The endpoint by hand: four guided Euler steps of the teacher from the noise, t 1 → 0.
    x = noise.clone()
    for k in range(4):
        tk, tn = 1 - k / 4, 1 - (k + 1) / 4
        tt = torch.full((3,), 1000 * tk, dtype=torch.float64)
        v = 3.0 * teacher(x, tt, cond) - 2.0 * teacher(x, tt, neg)
        x = x - (tk - tn) * v
    tb = t.reshape(-1, 1, 1, 1, 1)
    xt = (1 - tb) * x + (SIG + (1 - SIG) * tb) * noise
    ref = ((student(xt, 1000 * t, cond) - ((1 - SIG) * noise - x)) ** 2).mean()
    torch.testing.assert_close(out["loss"], ref)
    # x0 only gives the shape: another batch of data gives the same loss.
    again = obj.traj_loss(student, teacher, x0 * 7, cond, neg, noise=noise, t=t, teacher_steps=4, rescale_t=1.0,
                          cfg_scale=2.0)
    torch.testing.assert_close(again["loss"], out["loss"])
    # Half of a traj batch sits at t = 1, where the 1-step sampler asks the student.
    draws = obj.draw_inputs(torch.zeros(6, 2, 3, 3, 3), DistillConfig(method="traj"), torch.Generator().manual_seed(0))
    assert draws["t"][::2].eq(1.0).all() and draws["t"][1::2].lt(1.0).all()


def test_mdt_loss_reports_residual_sizes_and_the_d_norm_bound():
    teacher, student, x0, noise, fake, cond, t = _setup()
    neg = torch.zeros_like(cond)
    kw = dict(noise=noise, t=t, fake_noise=fake, dt=0.05, cfg_vm=0.0, cfg_vd=0.0)
    on = obj.mdt_loss(student, teacher, x0, cond, neg, d_norm=True, **kw)
    off = obj.mdt_loss(student, teacher, x0, cond, neg, d_norm=False, **kw)
    v_pred, target = obj.vm_target(student, teacher, x0, noise, t, cond, neg, dt=0.05, cfg_scale=0.0, d_norm=True,
                                   sigma_min=SIG)
    torch.testing.assert_close(on["diag_resid_vm"], (v_pred - target).pow(2).mean().sqrt())
    # With d_norm each sample's correction t·D̂ has norm t·‖D‖/(‖D‖ + 0.1) < t, so its RMS per
    # element is below 1/√(elements per sample); without it the correction is t·D itself.
    per_sample = x0[0].numel()
    assert float(on["diag_correction_vm"]) < 1 / per_sample ** 0.5
    torch.testing.assert_close(on["diag_d_vm"], off["diag_d_vm"])
    assert set(on["loss_terms"]) == {"vm", "vd"}
    torch.testing.assert_close(on["loss_terms"]["vm"] + on["loss_terms"]["vd"], on["loss"])


@pytest.mark.parametrize("method", ["mdt", "vm", "cm", "pcm", "scm", "fm", "traj"])
def test_every_method_runs_from_config_and_backpropagates(method):
    teacher, student, x0, _, _, cond, _ = _setup()
    distill = DistillConfig(method=method, cfg_vm=1.0, cfg_vd=2.0, phases=2, p_uncond=0.2)
    g = torch.Generator().manual_seed(3)
    draws = obj.draw_inputs(x0, distill, g)
    if method in ("mdt", "vm", "cm", "pcm"):
        assert float((draws["t"] - distill.dt).min()) >= distill.sigma_min
    assert ("fake_noise" in draws) == (method == "mdt")
    s = copy.deepcopy(student)
    out = obj.compute_loss(distill, s, teacher, x0, cond, draws, g)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in s.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_mdt_loss_rejects_nonsense():
    teacher, student, x0, noise, fake, cond, t = _setup()
    neg = torch.zeros_like(cond)
    with pytest.raises(ValueError, match="fake_noise"):
        obj.mdt_loss(student, teacher, x0, cond, neg, noise=noise, t=t, fake_noise=None)
    with pytest.raises(ValueError, match="both 0"):
        obj.mdt_loss(student, teacher, x0, cond, neg, noise=noise, t=t, fake_noise=fake, lambda_vm=0, lambda_vd=0)


def test_mdt_with_regression_adds_the_traj_term_on_its_own_draws():
    teacher, student, x0, _, _, cond, _ = _setup()
    neg = torch.zeros_like(cond)
    plain, anchored = DistillConfig(cfg_vm=0.0, cfg_vd=0.0), DistillConfig(cfg_vm=0.0, cfg_vd=0.0, lambda_reg=0.5,
                                                                          traj_steps=4, traj_rescale_t=1.0)
    d0 = obj.draw_inputs(x0, plain, torch.Generator().manual_seed(5))
    d1 = obj.draw_inputs(x0, anchored, torch.Generator().manual_seed(5))
    # The MDT-dist draws come first and are unchanged, so lambda_reg 0 keeps every old run's stream.
    assert set(d0) == {"noise", "t", "fake_noise"} and set(d1) == set(d0) | {"reg_noise", "reg_t"}
    for k in d0:
        torch.testing.assert_close(d0[k], d1[k])
    assert d1["reg_t"][::2].eq(1.0).all()
    base = obj.compute_loss(plain, student, teacher, x0, cond, d1)
    out = obj.compute_loss(anchored, student, teacher, x0, cond, d1)
    reg = obj.traj_loss(student, teacher, x0, cond, neg, noise=d1["reg_noise"], t=d1["reg_t"], teacher_steps=4,
                        rescale_t=1.0, cfg_scale=0.0)
    torch.testing.assert_close(out["loss"], base["loss"] + 0.5 * reg["loss"])
    torch.testing.assert_close(out["loss_reg"], reg["loss_traj"])
    assert set(out["loss_terms"]) == {"vm", "vd", "reg"}
    torch.testing.assert_close(sum(out["loss_terms"].values()), out["loss"])


def test_lambda_reg_with_a_method_that_ignores_it_is_refused():
    with pytest.raises(ValueError, match="lambda_reg applies to method mdt or vm only"):
        DistillConfig(method="pcm", lambda_reg=0.1)
