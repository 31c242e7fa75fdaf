"""The one optimizer step and its parts: seeding, clipping, EMA, micro-batching, the step itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdt_ray.config import DistillConfig, TrainConfig
from mdt_ray.engine import EMA, Engine, GradClipper, averaged, step_seed
from mdt_ray.models import build_model
from mdt_ray.models.teachers import student_from
from mdt_ray.stages import balanced_groups, get_stage


def test_step_seed_depends_on_every_part_and_nothing_else():
    base = step_seed(0, 0, 0, 0)
    assert step_seed(0, 0, 0, 0) == base
    others = {step_seed(1, 0, 0, 0), step_seed(0, 1, 0, 0), step_seed(0, 0, 1, 0), step_seed(0, 0, 0, 1)}
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63
    # (rank 1, step 11) and (rank 11, step 1) must not collide through string concatenation.
    assert step_seed(0, 1, 11, 0) != step_seed(0, 11, 1, 0)


def _params_with_grad(grads):
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=torch.float32)
    return params


def test_fixed_clip_scales_to_max_norm_and_reports_the_norm_before():
    params = _params_with_grad([[3.0, 0.0], [0.0, 4.0]])
    clip = GradClipper(1.0)
    assert clip(params) == pytest.approx(5.0)
    total = torch.cat([p.grad for p in params]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    assert clip.history == []  # only the adaptive clip keeps a history


def test_no_clip_leaves_gradients_alone():
    params = _params_with_grad([[30.0, 40.0]])
    assert GradClipper(None)(params) == pytest.approx(50.0)
    assert params[0].grad.tolist() == [30.0, 40.0]


def test_percentile_clip_waits_for_its_window_then_clips_to_the_percentile():
    clip = GradClipper(100.0, percentile=50, window=4)
    for norm in (1.0, 2.0, 3.0):
        clip(_params_with_grad([[norm]]))
        assert clip.threshold() == 100.0  # window not yet full
    clip(_params_with_grad([[4.0]]))
    assert clip.threshold() == pytest.approx(2.5)  # median of 1..4, below max_norm
    params = _params_with_grad([[10.0]])
    assert clip(params) == pytest.approx(10.0)
    assert float(params[0].grad.norm()) == pytest.approx(2.5, rel=1e-5)
    assert clip.history == [2.0, 3.0, 4.0, 10.0]  # a sliding window
    restored = GradClipper(100.0, percentile=50, window=4)
    restored.load([0.5] + clip.state())
    assert restored.history == clip.history and restored.threshold() == clip.threshold()


def test_percentile_clip_never_exceeds_max_norm_and_skips_non_finite_norms():
    clip = GradClipper(1.0, percentile=90, window=2)
    clip(_params_with_grad([[50.0]]))
    clip(_params_with_grad([[60.0]]))
    assert clip.threshold() == 1.0
    clip(_params_with_grad([[float("inf")]]))
    assert len(clip.history) == 2


def test_ema_follows_the_lerp_rule_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(ema.state_dict()[name], expected, atol=1e-6)
    copy_ = ema.model_copy(model)
    assert copy_ is not model
    assert torch.equal(copy_.weight, ema.state_dict()["weight"])
    assert not torch.equal(model.weight, copy_.weight)
    other = EMA(torch.nn.Linear(3, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({"weight": torch.zeros(2, 3)})
    assert averaged(model, None) is model
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_ema_warm_up_caps_the_decay_so_a_short_run_is_mostly_its_trained_weights():
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in EMA(model, 0.999).state_dict().items()}
    ema = EMA(model, 0.999)
    assert ema.warmup
    # Update n uses min(decay, (1 + n)/(10 + n)): 0.1, 2/11, ... and the decay itself once
    # (1 + n)/(10 + n) passes it (n >= 8991 for 0.999).
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10_000) == 0.999
    target = {k: v + 1.0 for k, v in start.items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(target[name])
    share = 1.0
    for n in range(200):
        ema.update(model)
        share *= ema.decay_at(n)
    for name in start:
        # The average is share·start + (1 − share)·target: the initial weights keep `share`.
        expected = share * start[name] + (1 - share) * target[name]
        assert torch.allclose(ema.state_dict()[name], expected, atol=1e-5)
    assert ema.initial_weight() == pytest.approx(share)
    # The trap the warm-up removes: at 0.999 without it, 200 updates keep 82 % of the start.
    assert EMA(model, 0.999, warmup=False).initial_weight(200) == pytest.approx(0.999 ** 200)
    assert share < 0.06 < 0.8 < 0.999 ** 200
    assert "warm-up" in ema.describe() and "200 updates" in ema.describe()


def test_dense_micro_batches_split_rows_in_order():
    stage = get_stage("ss")
    batch = {"x0": torch.arange(6.0).reshape(6, 1), "cond": torch.arange(6.0).reshape(6, 1, 1)}
    parts = stage.micro_batches(batch, 3)
    assert [p[0].flatten().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p[1].flatten().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="micro-batches"):
        stage.micro_batches(batch, 7)


def test_balanced_groups_even_out_voxels_and_keep_order():
    counts = [100, 10, 60, 50, 40, 5]
    groups = balanced_groups(counts, 2)
    assert sorted(i for g in groups for i in g) == list(range(6))
    loads = [sum(counts[i] for i in g) for g in groups]
    # Longest first into the lightest group: 100 | 60+50, then 40 | 10, then 5 into the lighter.
    assert sorted(loads) == [125, 140]
    assert all(g == sorted(g) for g in groups)
    with pytest.raises(ValueError):
        balanced_groups([1, 2], 3)


def test_sparse_micro_batches_carry_each_asset_whole():
    stage = get_stage("slat")
    counts = [3, 1, 2, 4]
    coords = torch.cat([torch.cat([torch.full((c, 1), b), torch.arange(c * 3).reshape(c, 3)], 1)
                        for b, c in enumerate(counts)]).int()
    feats = torch.arange(sum(counts), dtype=torch.float32)[:, None].repeat(1, 2)
    batch = {"coords": coords, "feats": feats, "cond": torch.arange(4.0).reshape(4, 1, 1),
             "counts": torch.tensor(counts)}
    parts = stage.micro_batches(batch, 2)
    seen = []
    for x, cond in parts:
        assert x.batch_size == cond.shape[0]
        seen += cond.flatten().int().tolist()
        for (c, f), asset in zip(x.to_list(), cond.flatten().int().tolist()):
            start = sum(counts[:asset])
            assert torch.equal(f, feats[start : start + counts[asset]])
            assert torch.equal(c, coords[start : start + counts[asset], 1:])
    assert sorted(seen) == [0, 1, 2, 3]
    assert sorted(x.num_voxels for x, _ in parts) == [5, 5]


def _engine(method="mdt", **train):
    torch.manual_seed(0)
    teacher = build_model("ss-tiny").eval().requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    student = student_from(teacher)
    tc = TrainConfig(**{"batch_size": 4, "lr": 1e-3, "ema": 0.9, **train})
    dc = DistillConfig(method=method, cfg_vm=2.0, cfg_vd=2.0)
    return Engine(student, teacher if method != "fm" else None, stage=get_stage("ss"), distill=dc, train=tc)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(4, 8, 16, 16, 16, generator=g), "cond": torch.randn(4, 64, 64, generator=g)}


def test_engine_step_updates_student_and_ema_and_is_deterministic():
    runs = []
    for _ in range(2):
        engine = _engine()
        start = {k: v.clone() for k, v in engine.student.state_dict().items()}
        terms, grad_norm = engine.step(_batch(), 0)
        terms2, _ = engine.step(_batch(1), 1)
        assert terms.finite and {"loss", "loss_vm", "loss_vd"} <= set(terms.terms)
        assert grad_norm > 0 and np.isfinite(grad_norm)
        assert float(terms.t_bins[1].sum()) == 4  # one count per sample
        changed = [k for k, v in engine.student.state_dict().items() if not torch.equal(v, start[k])]
        assert changed
        ema = engine.averaged_model()
        name = changed[0]
        assert not torch.equal(ema.state_dict()[name], engine.student.state_dict()[name])
        runs.append((terms.terms, terms2.terms, engine.student.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(v, runs[1][2][k]) for k, v in runs[0][2].items())


def test_diagnostics_measure_each_terms_gradient_and_leave_the_update_unchanged():
    plain, diag = _engine(), _engine(diagnostics=True)
    a = plain.forward_backward(_batch(), 0)
    b = diag.forward_backward(_batch(), 0)
    assert a.terms == {k: v for k, v in b.terms.items() if k in a.terms}
    assert {"diag_grad_vm", "diag_grad_vd", "diag_resid_vm", "diag_resid_vd"} <= set(b.terms)
    # The terms' gradients computed on their own, by hand.
    params = [p for p in diag.student.parameters() if p.requires_grad]
    for p, q in zip(plain.student.parameters(), params):
        assert torch.equal(p.grad, q.grad)
    from mdt_ray.engine import step_seed
    from mdt_ray.objectives import compute_loss, draw_inputs

    x0, cond = _batch()["x0"], _batch()["cond"]
    gen = torch.Generator().manual_seed(step_seed(0, 0, 0, 0))
    out = compute_loss(diag.distill, diag.student, diag.teacher, x0, cond, draw_inputs(x0, diag.distill, gen), gen)
    for name in ("vm", "vd"):
        grads = torch.autograd.grad(out["loss_terms"][name], params, retain_graph=True, allow_unused=True)
        norm = sum(float(g.pow(2).sum()) for g in grads if g is not None) ** 0.5
        assert b.terms[f"diag_grad_{name}"] == pytest.approx(norm, rel=1e-4)
    assert plain.apply(0) == pytest.approx(diag.apply(0), rel=1e-6)


def test_accumulated_micro_batches_average_to_the_whole_batch_loss():
    whole = _engine(method="fm", batch_split=1)
    split = _engine(method="fm", batch_split=2)
    a = whole.forward_backward(_batch(), 0)
    b = split.forward_backward(_batch(), 0)
    assert a.finite and b.finite
    # Different draws per micro-batch (their seeds differ), so equal only in expectation; but
    # every parameter receives a gradient and the terms are averages, not sums.
    assert 0.2 < b.terms["loss"] / a.terms["loss"] < 5
    assert all(p.grad is not None for p in split.student.parameters() if p.requires_grad)


def test_engine_refuses_a_non_finite_loss_without_updating():
    engine = _engine(method="fm")
    before = {k: v.clone() for k, v in engine.student.state_dict().items()}
    bad = _batch()
    bad["x0"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        engine.step(bad, 3)
    assert all(torch.equal(v, before[k]) for k, v in engine.student.state_dict().items())
    assert all(p.grad is None for p in engine.student.parameters())


def test_lr_schedule_is_applied_per_step():
    engine = _engine(method="fm")
    engine.lr_at = lambda step: 0.5 * (step + 1)
    engine.step(_batch(), 2)
    assert engine.lr == 1.5


def test_optimizer_state_round_trips_through_named_tensors():
    engine = _engine(method="fm")
    engine.step(_batch(), 0)
    tensors, groups = engine.optimizer_tensors()
    assert any(k.endswith(".exp_avg") for k in tensors)
    fresh = _engine(method="fm")
    fresh.load_optimizer(tensors, groups)
    again, _ = fresh.optimizer_tensors()
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_weights_finite_sees_the_student_and_the_ema():
    engine = _engine(method="fm")
    engine.step(_batch(), 0)
    assert bool(engine.weights_finite()) and engine.weights_finite().dtype == torch.bool
    name = next(iter(engine.ema.shadow))
    engine.ema.shadow[name][0] = float("nan")
    assert not bool(engine.weights_finite())
    engine.ema = None
    assert bool(engine.weights_finite())
    with torch.no_grad():
        next(engine.student.parameters()).view(-1)[0] = float("inf")
    assert not bool(engine.weights_finite())


def test_an_overflowing_update_leaves_non_finite_weights_that_the_loss_guard_cannot_see():
    # AdamW's decoupled decay multiplies every weight by (1 - lr·weight_decay): here by -1e39.
    engine = _engine(weight_decay=1e42)
    terms, _ = engine.step(_batch(), 0)
    assert terms.finite  # the loss came from the weights before the update
    assert not bool(engine.weights_finite())


def test_finite_but_huge_weights_are_caught_by_their_outputs():
    # train.lr=1e6 as in the issue: every weight moves by ~1e6, all finite, the outputs are not.
    engine = _engine(lr=1e6, grad_clip=None)
    assert bool(engine.outputs_finite(_batch()))
    engine.step(_batch(), 0)
    assert bool(engine.weights_finite())
    assert not bool(engine.outputs_finite(_batch(1)))


def test_the_output_probe_checks_the_ema_weights_too_and_leaves_the_student_alone():
    engine = _engine(method="fm", batch_split=2)
    engine.step(_batch(), 0)
    before = {k: v.clone() for k, v in engine.student.state_dict().items()}
    assert bool(engine.outputs_finite(_batch(1)))
    for v in engine.ema.shadow.values():
        v.mul_(1e30)
    assert not bool(engine.outputs_finite(_batch(1)))
    assert all(torch.equal(v, before[k]) for k, v in engine.student.state_dict().items())
