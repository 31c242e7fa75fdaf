"""The benchmark's exact velocity, exact teacher, corpus and scorer (fast: default suite)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdt_ray import flow
from mdt_ray.benchmark.exact import ExactTeacher, exact_velocity

SIGMA_MIN = 1e-5


def _gaussian_conditioning(x_t, t, means, weights, sigma, sigma_min):
    """E[(1 − σ_min)ε − x0 | x_t] by explicit joint-Gaussian conditioning with full covariance
    matrices (Schur complement) and MultivariateNormal densities: no shared algebra with the
    closed form under test."""
    d = means.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    out = []
    for xi, ti in zip(x_t.double(), t.double()):
        a, b = 1 - ti, sigma_min + (1 - sigma_min) * ti
        logs, posts = [], []
        for mu, w in zip(means.double(), weights.double()):
            # z = (x0, ε); x_t = A z with A = [a·I, b·I]; v = B z with B = [−I, (1 − σ_min)·I].
            cov_z = torch.block_diag(sigma**2 * eye, eye)
            mean_z = torch.cat([mu, torch.zeros(d, dtype=torch.float64)])
            A = torch.cat([a * eye, b * eye], dim=1)
            B = torch.cat([-eye, (1 - sigma_min) * eye], dim=1)
            s_xx = A @ cov_z @ A.T
            s_vx = B @ cov_z @ A.T
            m_x = A @ mean_z
            posts.append(B @ mean_z + s_vx @ torch.linalg.solve(s_xx, xi - m_x))
            logs.append(torch.log(w) + torch.distributions.MultivariateNormal(m_x, s_xx).log_prob(xi))
        p = torch.softmax(torch.stack(logs), 0)
        out.append((p[:, None] * torch.stack(posts)).sum(0))
    return torch.stack(out)


def _monte_carlo(x_t, t, means, weights, sigma, sigma_min, n=400_000, seed=0):
    """Self-normalised importance sampling: x0 from the prior, weighted by p(x_t | x0)."""
    g = torch.Generator().manual_seed(seed)
    w = weights.double() / weights.double().sum()
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x0 = means.double()[comp] + sigma * torch.randn(n, means.shape[1], generator=g, dtype=torch.float64)
    out = []
    for xi, ti in zip(x_t.double(), t.double()):
        a, b = 1 - ti, sigma_min + (1 - sigma_min) * ti
        eps = (xi - a * x0) / b
        logw = -0.5 * eps.pow(2).sum(1)
        p = torch.softmax(logw, 0)
        out.append((p[:, None] * ((1 - sigma_min) * eps - x0)).sum(0))
    return torch.stack(out)


def _problem(seed=0, d=3, m=4):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.5
    weights = torch.tensor([0.1, 0.4, 0.2, 0.3][:m], dtype=torch.float64) * 7  # unnormalised on purpose
    return means, weights, g


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("t_val", [1e-4, 0.02, 0.5, 0.97, 1.0])
def test_exact_velocity_matches_gaussian_conditioning(sigma, t_val):
    means, weights, g = _problem()
    x0 = means[torch.tensor([0, 1, 2, 3, 1])] + sigma * torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.full((5,), t_val, dtype=torch.float64)
    x_t = flow.diffuse(x0, torch.randn(5, 3, generator=g, dtype=torch.float64), t, SIGMA_MIN)
    got = exact_velocity(x_t, t, means, weights, sigma, SIGMA_MIN)
    if sigma == 0.0:
        sigma_ref = 1e-9  # the covariance route needs a density; 1e-9 is a Dirac to 1e-12
        want = _gaussian_conditioning(x_t, t, means, weights, sigma_ref, SIGMA_MIN)
    else:
        want = _gaussian_conditioning(x_t, t, means, weights, sigma, SIGMA_MIN)
    scale = want.abs().max().item() + 1
    assert torch.allclose(got, want, atol=1e-6 * scale, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_exact_velocity_matches_monte_carlo(sigma):
    means, weights, g = _problem(1, d=2, m=3)
    t = torch.tensor([0.3, 0.6, 0.9, 1.0], dtype=torch.float64)
    x_t = torch.randn(4, 2, generator=g, dtype=torch.float64)
    got = exact_velocity(x_t, t, means, weights, sigma, SIGMA_MIN)
    want = _monte_carlo(x_t, t, means, weights, sigma, SIGMA_MIN)
    assert torch.allclose(got, want, atol=3e-2), (got, want)


def test_exact_velocity_float32_high_dim_near_zero_and_one():
    """32768-dim Dirac modes (the benchmark's latent size) in float32: finite, and at small t the
    velocity is (1 − σ_min)·ε − x0 of the component the point came from."""
    g = torch.Generator().manual_seed(2)
    means = torch.sign(torch.randn(3, 8, 16, 16, 16, generator=g))
    weights = torch.tensor([0.5, 0.3, 0.2])
    eps = torch.randn(3, 8, 16, 16, 16, generator=g)
    for t_val in (1e-6, 1e-3, 0.1):
        t = torch.full((3,), t_val)
        v32 = exact_velocity(flow.diffuse(means, eps, t, SIGMA_MIN), t, means, weights, 0.0, SIGMA_MIN)
        t64 = t.double()
        x64 = flow.diffuse(means.double(), eps.double(), t64, SIGMA_MIN)
        v64 = exact_velocity(x64, t64, means.double(), weights.double(), 0.0, SIGMA_MIN)
        assert v32.dtype == torch.float32 and v64.dtype == torch.float64 and torch.isfinite(v32).all()
        want = flow.velocity(means.double(), eps.double(), SIGMA_MIN)
        # A float32 x_t carries ~6e-8 relative rounding, which the 1/b factor amplifies at tiny t.
        tol32 = 1e-3 if t_val >= 1e-3 else 0.5
        assert torch.allclose(v32.double(), want, atol=tol32), t_val
        assert torch.allclose(v64, want, atol=1e-6), t_val
    # t = 1: a = 0, so x_1 = ε says nothing about x0 and v* = (1 − σ_min)·x − E[x0] exactly.
    t = torch.ones(3)
    v = exact_velocity(eps, t, means, weights, 0.0, SIGMA_MIN)
    prior_mean = (weights[:, None] * means.reshape(3, -1)).sum(0) / weights.sum()
    assert torch.allclose(v.reshape(3, -1), (1 - SIGMA_MIN) * eps.reshape(3, -1) - prior_mean, atol=1e-5)


def test_exact_velocity_rejects_bad_inputs():
    means = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="weights"):
        exact_velocity(torch.zeros(1, 3), torch.ones(1), means, torch.tensor([-1.0, 2.0]), 0.0)
    with pytest.raises(ValueError, match="sample shape"):
        exact_velocity(torch.zeros(1, 4), torch.ones(1), means, torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="sigma"):
        exact_velocity(torch.zeros(1, 3), torch.ones(1), means, torch.ones(2), -0.1)


def test_exact_teacher_picks_components_and_is_unconditional_on_zero_cond():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(5, 4, generator=g, dtype=torch.float64)
    tokens = torch.randn(2, 3, 6, generator=g)
    comps, weights, prior = [(0, 1), (2, 3, 4)], [(0.7, 0.3), (0.2, 0.5, 0.3)], [0.25, 0.75]
    teacher = ExactTeacher(means, tokens, comps, weights, prior=prior, sigma=0.2)
    x = torch.randn(3, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    cond = torch.stack([tokens[1], tokens[0], torch.zeros(3, 6)])
    got = teacher(x, 1000 * t, cond)
    m = means.float()
    want = torch.stack([
        exact_velocity(x[:1], t[:1], m[[2, 3, 4]], torch.tensor(weights[1]), 0.2)[0],
        exact_velocity(x[1:2], t[1:2], m[[0, 1]], torch.tensor(weights[0]), 0.2)[0],
        exact_velocity(x[2:], t[2:], m, torch.tensor([0.25 * 0.7, 0.25 * 0.3, 0.75 * 0.2, 0.75 * 0.5, 0.75 * 0.3]),
                       0.2)[0],
    ])
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="matches none"):
        teacher(x[:1], t[:1] * 1000, torch.ones(1, 3, 6) * 5)


def test_corpus_modes_share_their_condition_and_decode_exactly():
    from mdt_ray.benchmark.corpus import draw, distribution
    from mdt_ray.data.synthetic import decode_ss

    d = distribution()
    assert np.array_equal(decode_ss(d.latents), d.occupancy)
    assert np.isclose(d.joint().sum(), 1.0)
    # Different modes of one condition never overlap: their average decodes to no valid shape.
    for idx in d.components:
        occ = d.occupancy[list(idx)]
        assert occ.sum(0).max() == 1
    draws = [draw(0, i) for i in range(400)]
    assert draws == [draw(0, i) for i in range(400)]
    assert {k for k, _ in draws} == {0, 1, 2, 3}
    assert all(m in d.components[k] for k, m in draws)


def test_scorer_separates_exact_samples_mode_collapse_and_averages():
    from mdt_ray.benchmark.corpus import distribution
    from mdt_ray.benchmark.score import exact_reference, score

    d = distribution()
    ks = np.arange(400) % 4
    exact = score(exact_reference(d, ks, seed=7), ks, d)
    assert exact["precision"] == 1.0 and exact["coverage"] == 1.0 and exact["mode_tv"] < 0.12
    # Every sample the first mode of its condition: valid but collapsed.
    first = np.array([d.components[k][0] for k in ks])
    collapsed = score(d.latents[first], ks, d)
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] < 0.5 and collapsed["mode_tv"] > 0.4
    assert collapsed["fd"] > exact["fd"]
    # The weighted mean of a condition's modes (a one-step sampler that averages): no valid shape.
    mean = np.stack([sum(w * d.latents[m] for m, w in zip(d.components[k], d.weights[k])) for k in ks])
    averaged = score(mean, ks, d)
    assert averaged["precision"] == 0.0 and averaged["mode_tv"] == 1.0
    # A valid shape of the wrong condition is not valid.
    wrong = np.array([d.components[(k + 1) % 4][0] for k in ks])
    assert score(d.latents[wrong], ks, d)["precision"] == 0.0


def test_exact_teacher_samples_the_distribution_and_its_one_step_sampler_averages():
    from mdt_ray.benchmark.corpus import distribution
    from mdt_ray.benchmark.score import score

    d = distribution()
    teacher = d.exact_teacher()
    ks = np.arange(32) % 4
    cond = torch.from_numpy(d.cond[ks].copy())
    noise = torch.randn(32, 8, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    many = score(flow.sample(teacher, noise, cond, steps=8, rescale_t=3.0), ks, d)
    one = score(flow.sample(teacher, noise, cond, steps=1), ks, d)
    assert many["precision"] == 1.0
    assert one["precision"] == 0.0


def test_corpus_build_kind_multimodal_writes_the_drawn_modes(tmp_path):
    """`mdt-ray corpus build --kind multimodal` through the shared Parquet writer; rows read back
    through the stage-1 loader are the latents and cond tokens of the drawn (condition, mode)."""
    from mdt_ray.benchmark.corpus import distribution, draw
    from mdt_ray.cli import main
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.stages import get_stage

    out = tmp_path / "mm"
    assert main(["corpus", "build", "--kind", "multimodal", "--num-assets", "40", "--seed", "3", "--shards", "2",
                 "--out", str(out), "--no-ray", "--workers", "1", "--quiet"]) == 0
    split = get_stage("ss").load(StorageTarget(str(out)))
    d = distribution()
    assert split.source["kind"] == "multimodal" and tuple(split.manifest.stages) == ("ss",)
    drawn = [draw(3, i) for i in range(40)]
    assert np.array_equal(split.x0.numpy(), d.latents[[m for _, m in drawn]])
    # The cond column is stored in float16; the exact teacher still recognises every row.
    assert np.array_equal(d.exact_teacher().condition_index(split.cond).numpy(), [k for k, _ in drawn])

    # The stage scores this corpus with the exact metrics (the in-training eval, the sweeps and
    # `mdt-ray eval` all go through it): a sample is valid as any mode of its row's condition,
    # not only the row's own shape, and the average of a condition's modes is no shape at all.
    stage = get_stage("ss")
    own = stage.score(split.x0.numpy(), split)
    assert own["precision"] == 1.0 and own["iou"] == 1.0 and set(own) == {"precision", "coverage", "mode_tv", "fd", "iou"}
    other = np.array([d.components[k][(d.components[k].index(m) + 1) % 3] for k, m in drawn])
    assert stage.score(d.latents[other], split)["precision"] == 1.0
    mean = np.stack([sum(w * d.latents[i] for i, w in zip(d.components[k], d.weights[k])) for k, _ in drawn])
    assert stage.score(mean, split)["precision"] == 0.0
    assert stage.decoder(split) is not None
    evals = stage.quick_eval(d.exact_teacher(), split, steps=(1, 2))
    assert evals["eval_precision_1step"] == 0.0 and evals["eval_precision_2step"] == 1.0


def test_trajectory_diagnosis_of_the_exact_field_and_of_a_field_that_ignores_the_data():
    from mdt_ray.benchmark.teacher import trajectory_diagnosis

    from mdt_ray.benchmark.corpus import distribution

    dist = distribution()
    rows = trajectory_diagnosis(dist.exact_teacher(), per_condition=2)
    assert len(rows) == 26 and rows[0]["t"] == 1.0 and rows[-1]["t"] == 0.0
    # The exact field is its own reference: no error, and its trajectory ends on its conditions' modes.
    assert all(r["rel_err"] < 1e-10 and r["iou"] == r["exact_iou"] for r in rows[:-1])
    assert rows[-1]["iou"] == 1.0 and rows[-1]["right_condition"] == 1.0

    class Noise(torch.nn.Module):  # v = x: x̂0 = (1 − t)·x_t, the noise shrunk, never a shape
        def forward(self, x, t, cond):
            return x

    rows = trajectory_diagnosis(Noise(), per_condition=2)
    assert rows[-1]["iou"] < 0.5 and max(r["rel_err"] for r in rows[:-1]) > 0.1


def test_exact_regression_blends_its_inputs_toward_the_partner_and_targets_the_exact_field():
    from mdt_ray.benchmark.corpus import distribution
    from mdt_ray.benchmark.teacher import ExactRegression, exact_regression_loss
    from mdt_ray.flow import diffuse

    dist = distribution()
    exact = dist.exact_teacher()
    lat = torch.tensor(dist.latents, dtype=torch.float32)
    x0, partner = lat[[0, 3]], lat[[1, 4]]
    cond = torch.tensor(dist.cond, dtype=torch.float32)[[0, 1]]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t, mix = torch.tensor([0.5, 0.3]), torch.tensor([0.25, 0.0])
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, tt, c):
            seen.append(x)
            return exact(x, tt, c)

    out = exact_regression_loss(Recording(), exact, x0, cond, noise=noise, t=t, partner=partner, mix=mix)
    blended = x0 + torch.tensor([0.25, 0.0]).reshape(2, 1, 1, 1, 1) * (partner - x0)
    assert torch.allclose(seen[0], diffuse(blended, noise, t))
    assert float(out["loss"]) < 1e-8  # the exact field is its own target, on and off the data
    assert ExactRegression().p_mix == 0.0

    # Through the objective: the partner is a mode of the sample's own condition.
    from mdt_ray import objectives

    seen.clear()
    out = objectives.METHODS["exact"](ExactRegression(p_mix=1.0, p_uncond=0.0), Recording(), exact, x0, cond, None,
                                      {"noise": noise, "t": t}, torch.Generator().manual_seed(1))
    assert float(out["loss"]) < 1e-8
    s = (1 - 1e-5) * t + 1e-5
    x0_seen = (seen[0] - s.reshape(2, 1, 1, 1, 1) * noise) / (1 - t).reshape(2, 1, 1, 1, 1)
    for row, k in enumerate((0, 1)):
        # x0_seen = (1 - m)·x0 + m·partner with m < 0.5: every element lies between x0 and a mode of condition k.
        options = lat[list(dist.components[k])]
        m_hat = [float(((x0_seen[row] - x0[row]) * (p - x0[row])).sum() / max(float((p - x0[row]).pow(2).sum()), 1e-9))
                 for p in options]
        assert any(0 <= m < 0.5 and torch.allclose(x0_seen[row], x0[row] + m * (p - x0[row]), atol=1e-4)
                   for m, p in zip(m_hat, options))


def test_own_trajectories_are_the_network_s_own_euler_states_and_refresh_on_schedule():
    from mdt_ray import objectives
    from mdt_ray.benchmark.corpus import distribution
    from mdt_ray.benchmark.teacher import ExactRegression, OwnTrajectories
    from mdt_ray.flow import time_grid

    exact = distribution().exact_teacher()
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x, tt, c):
            calls.append(x.shape[0])
            return exact(x, tt, c)

    model = Counting().train()
    own = OwnTrajectories(4, every=2, rollouts=3, steps=5)
    g = torch.Generator().manual_seed(0)
    x, t, cond = own.draw(model, exact, g)
    assert calls == [3] * 5 and model.training  # one rollout of 5 steps, training mode restored
    assert x.shape == (4, *exact.means.shape[1:]) and t.shape == (4,) and cond.shape[0] == 4
    grid = time_grid(5, 3.0)
    assert own.x.shape[0] == 15 and np.allclose(sorted(set(own.t.tolist())), sorted(grid[:-1]))
    # State i + 1 of trajectory j is the Euler step from state i (states are stored step by step).
    with torch.no_grad():
        for i in range(4):
            a, b = slice(3 * i, 3 * i + 3), slice(3 * i + 3, 3 * i + 6)
            step = own.x[a] - (grid[i] - grid[i + 1]) * exact(own.x[a], 1000 * own.t[a], own.cond[a])
            assert torch.allclose(own.x[b], step, atol=1e-5)
    assert exact.condition_index(own.cond).max() < exact.cond_tokens.shape[0]  # real conditions, not the zero one
    own.draw(model, exact, g)
    assert len(calls) == 5  # the second draw reuses the states
    own.draw(model, exact, g)
    assert len(calls) == 10  # the third rolls out again (every 2 draws)

    # Through the objective: the batch grows by per_step, and the exact field is its own target there.
    dist = distribution()
    x0 = torch.tensor(dist.latents[:2], dtype=torch.float32)
    c = torch.tensor(dist.cond, dtype=torch.float32)[[0, 0]]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = objectives.METHODS["exact"](ExactRegression(p_uncond=0.0, own=OwnTrajectories(3, rollouts=2, steps=4)),
                                      exact, exact, x0, c, None, {"noise": noise, "t": torch.tensor([0.3, 0.8])},
                                      torch.Generator().manual_seed(2))
    assert out["batch"] == 5 and float(out["loss"]) < 1e-8
    assert ExactRegression(own=OwnTrajectories(3)).settings()["own"]["per_step"] == 3
    with pytest.raises(ValueError, match="per_step 0"):
        OwnTrajectories(0)


def test_a_teacher_recipe_that_cannot_train_is_refused_naming_its_phase_and_setting(tmp_path):
    from mdt_ray.benchmark.teacher import TeacherRecipe

    TeacherRecipe(own_per_step=8, p_mix=0.5).check()
    for bad, key in (({"own_per_step": -1}, "own_per_step"), ({"p_mix": 1.5}, "p_mix"), ({"steps": 0}, "steps"),
                     ({"lr": 0.0}, "lr"), ({"t_std": -1.0}, "t_std")):
        with pytest.raises(ValueError, match=f"phase 3: {key} must be"):
            TeacherRecipe(**bad).check("phase 3")

    # methods.py checks every phase before it builds the corpora or trains: one line, exit 2.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks/methods.py"), "teacher", "--own-per-step", "-2",
                          "--root", str(tmp_path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "phase 1: own_per_step must be an integer >= 0 (0: data only), got -2" in out.stderr
    assert "Traceback" not in out.stderr and list(tmp_path.iterdir()) == []


def test_score_split_names_the_asset_whose_row_has_the_zero_condition():
    from types import SimpleNamespace

    import torch

    from mdt_ray.benchmark.score import score_split
    from mdt_ray.data import synthetic as syn

    split = SimpleNamespace(cond=torch.zeros(2, *syn.COND_SHAPE), asset_id=["mm-000", "mm-001"],
                            manifest=SimpleNamespace(uri="data/mm-test"))
    with pytest.raises(ValueError, match=r"corpus data/mm-test: asset mm-000 has the zero condition"):
        score_split(None, split)
