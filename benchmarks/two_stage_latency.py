"""End-to-end two-stage latency: students at 1 and 2 steps per stage versus the two 25-step
teachers (TRELLIS's sampler settings: guidance interval [0.5, 1], rescale_t 3), same device,
same batch, same conditions — the paper's 9.0× (1×2 steps) and 6.5× (2×2 steps) figures.

Latency does not depend on the weights, only on the architecture and the number of network
evaluations, so the models are the named sizes (default: the CPU demo sizes) with their init.
The students run without CFG (guidance is distilled in); the teachers use CFG as TRELLIS does.

    python benchmarks/two_stage_latency.py [--ss ss-demo --slat slat-demo --batch 4 --repeats 3]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cond_tokens, write_json  # noqa: E402
from mdt_ray.eval.latency import time_interleaved  # noqa: E402
from mdt_ray.models import build_model  # noqa: E402
from mdt_ray.two_stage import StageSampling, sample_two_stage  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ss", default="ss-demo")
    p.add_argument("--slat", default="slat-demo")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ss_model = build_model(args.ss).to(device).eval()
    slat_model = build_model(args.slat).to(device).eval()
    channels = ss_model.config_args["cond_channels"]
    cond = torch.randn(args.batch, cond_tokens(channels), channels).to(device)
    # A fixed structure (a centred ball) for every variant, so stage 2 sees the same voxels and
    # the comparison isolates sampling cost.
    g = torch.arange(32)
    ball = ((g[:, None, None] - 15.5) ** 2 + (g[None, :, None] - 15.5) ** 2 + (g[None, None, :] - 15.5) ** 2) < 12 ** 2
    from mdt_ray.data.synthetic import surface_voxels

    coords = surface_voxels(ball.numpy())

    def structure(latents):
        return [coords] * latents.shape[0]

    teacher = (StageSampling(args.teacher_steps, 7.5, (0.5, 1.0), 3.0), StageSampling(args.teacher_steps, 3.0, (0.5, 1.0), 3.0))
    variants = {
        f"teacher {args.teacher_steps}+{args.teacher_steps} steps (CFG)": teacher,
        "student 1+1 steps": (StageSampling(1), StageSampling(1)),
        "student 2+2 steps": (StageSampling(2), StageSampling(2)),
    }

    def run(ss, slat):
        sample_two_stage(ss_model, slat_model, cond, ss=ss, slat=slat, structure_to_coords=structure,
                         generator=torch.Generator().manual_seed(0))

    def call(ss, slat):
        return lambda: run(ss, slat)

    with torch.no_grad():
        per_call = time_interleaved({name: call(*v) for name, v in variants.items()}, repeats=args.repeats,
                                    device=device)
    times = {name: seconds / args.batch for name, seconds in per_call.items()}
    base = times[next(iter(variants))]
    print(f"two-stage sampling, {args.ss} + {args.slat}, batch {args.batch}, {len(coords)} voxels/asset, {device}, "
          f"median of {args.repeats} interleaved rounds of equal length")
    print(f"{'':36s}{'s/asset':>10s}{'speed-up':>10s}")
    for name, t in times.items():
        print(f"{name:36s}{t:10.4f}{base / t:9.1f}x")
    res = {"device": str(device), "batch": args.batch, "voxels": int(len(coords)),
           "seconds_per_asset": times, "speedup_1x2": base / times["student 1+1 steps"],
           "speedup_2x2": base / times["student 2+2 steps"]}
    print(f"speed-up 1x2 steps: {res['speedup_1x2']:.1f}x (paper, TRELLIS-L on A800: 9.0x); "
          f"2x2 steps: {res['speedup_2x2']:.1f}x (paper: 6.5x)")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
