import numpy as np
import torch

from mdt_ray.data import synthetic
from mdt_ray.models import build_model
from mdt_ray.two_stage import StageSampling, sample_two_stage, synthetic_structure


def test_structure_of_a_true_latent_is_the_assets_stage2_support():
    asset = synthetic.make_asset(0, 3)
    latent = torch.as_tensor(np.asarray(asset.ss_latent, dtype=np.float32))[None]
    (coords,) = synthetic_structure(latent)
    got = {tuple(c) for c in coords.tolist()}
    want = {tuple(c) for c in np.asarray(asset.slat_coords).tolist()}
    assert got == want


def test_two_stage_sampler_runs_stage2_on_stage1_voxels_and_unnormalises():
    torch.manual_seed(0)
    ss, slat = build_model("ss-tiny").eval(), build_model("slat-tiny").eval()
    cond = torch.randn(2, 64, 64)
    seen = {}

    def structure(latents):
        seen["latents"] = latents
        return [np.array([[1, 2, 3], [4, 5, 6]]), np.array([[7, 7, 7]])]

    mean, std = [float(i) for i in range(8)], [2.0] * 8
    latents, x = sample_two_stage(ss, slat, cond, ss=StageSampling(2, 1.5), slat=StageSampling(1),
                                  structure_to_coords=structure, slat_mean=mean, slat_std=std,
                                  generator=torch.Generator().manual_seed(1))
    assert latents.shape == (2, 8, 16, 16, 16) and latents is seen["latents"]
    assert x.coords.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6], [1, 7, 7, 7]]
    # Fresh models predict zero velocity, so the sample is the noise, then un-normalised.
    _, raw = sample_two_stage(ss, slat, cond, ss=StageSampling(2, 1.5), slat=StageSampling(1),
                              structure_to_coords=structure, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.feats, raw.feats * 2.0 + torch.arange(8.0))
