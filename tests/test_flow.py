import pytest
import torch

from mdt_ray import flow
from tests.toy import ToyFlow


def test_time_grid_matches_trellis_rescale():
    grid = flow.time_grid(25, rescale_t=3.0)
    assert len(grid) == 26
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert grid[1] == pytest.approx(0.9863, abs=5e-5)
    assert grid[2] == pytest.approx(0.9718, abs=5e-5)
    assert flow.time_grid(2, 1.0) == [1.0, 0.5, 0.0]
    assert flow.time_grid(2, 3.0) == pytest.approx([1.0, 0.75, 0.0])
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(0)


def test_diffuse_and_velocity_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    x_t = flow.diffuse(x0, eps, t, 1e-5)
    assert torch.allclose(x_t[0], x0[0] + 1e-5 * eps[0])
    assert torch.allclose(x_t[3], eps[3])
    # x_t is linear in t with slope v, and predict_x0 inverts the path.
    v = flow.velocity(x0, eps, 1e-5)
    dt = 1e-3
    x_next = flow.diffuse(x0, eps, t.clamp(max=1 - dt) + dt, 1e-5)
    assert torch.allclose((x_next - flow.diffuse(x0, eps, t.clamp(max=1 - dt), 1e-5)) / dt, v, atol=1e-9)
    assert torch.allclose(flow.predict_x0(x_t, v, t, 1e-5), x0, atol=1e-12)


def test_sample_t_keeps_room_for_the_step_back():
    g = torch.Generator().manual_seed(1)
    t = flow.sample_t(10000, dt=0.01, sigma_min=1e-5, generator=g)
    assert float(t.min()) >= 0.01 + 1e-5 and float(t.max()) < 1
    assert float((t - 0.01).min()) >= 1e-5
    # logit-normal(1, 1): the median of sigmoid(N(1,1)) is sigmoid(1) = 0.731, shifted slightly.
    assert float(t.median()) == pytest.approx(1e-5 + 0.01 + 0.99 * 0.7311, abs=0.02)
    u = flow.sample_t(1000, schedule="uniform", generator=g)
    assert 0.4 < float(u.mean()) < 0.6
    with pytest.raises(ValueError, match="schedule"):
        flow.sample_t(2, schedule="cosine")


def test_sampler_one_batched_forward_per_guided_step_and_interval():
    model = ToyFlow()
    noise = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64)
    cond = torch.randn(3, 4, 3, dtype=torch.float64)
    model.calls = 0
    flow.sample(model, noise, cond, steps=4, cfg_strength=2.0)
    assert model.calls == 4  # cond and uncond run as one batched call per step
    model.calls = 0
    flow.sample(model, noise, cond, steps=4, cfg_strength=0.0)
    assert model.calls == 4
    assert flow.num_function_evals(25, 7.5, (0.5, 1.0), 3.0) == 25 + 19


def test_sampler_matches_hand_euler_with_guidance_interval():
    torch.manual_seed(0)
    model = ToyFlow()
    noise = torch.randn(2, 2, 2, 2, 2, dtype=torch.float64)
    cond = torch.randn(2, 4, 3, dtype=torch.float64)
    neg = torch.zeros_like(cond)
    w, interval = 3.0, (0.5, 1.0)
    out = flow.sample(model, noise, cond, neg, steps=3, cfg_strength=w, cfg_interval=interval, rescale_t=3.0)
    x = noise.clone()
    grid = flow.time_grid(3, 3.0)
    for a, b in zip(grid[:-1], grid[1:]):
        tt = torch.full((2,), 1000 * a, dtype=torch.float64)
        v = model(x, tt, cond)
        if interval[0] <= a <= interval[1]:
            v = (1 + w) * v - w * model(x, tt, neg)
        x = x - (a - b) * v
    assert torch.allclose(out, x, atol=1e-12)
