"""Cost of one MDT-dist training step in forward-pass equivalents.

Prints, side by side in one run on one model and batch: the wall time of a plain forward pass, a
plain flow-matching training step (forward + backward) and an MDT-dist step (VM + VD, discrete
derivative, forward + backward), and the ratios. The floor of an MDT-dist step is ~13 forward
passes (7 without grad, 2 with grad, their backward ≈ 2 × 2); the target is within 1.3× of it.

    python benchmarks/objective_cost.py [--model ss-demo] [--batch 8] [--repeats 5] [--device cpu]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import random_batch, timed, write_json  # noqa: E402
from mdt_ray.models.teachers import build_teacher, student_from  # noqa: E402
from mdt_ray.objectives import fm_loss, mdt_loss  # noqa: E402

FLOOR = 13.0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ss-demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    teacher = build_teacher(args.model).to(device).eval().requires_grad_(False)
    student = student_from(teacher).to(device)
    g = torch.Generator().manual_seed(0)
    batch = random_batch(args.model, args.batch, g)
    x0, cond = batch["x0"].to(device), batch["cond"].to(device)
    noise, fake = (torch.randn(x0.shape, generator=g).to(device) for _ in range(2))
    neg = torch.zeros_like(cond)
    t = (0.01 + 0.98 * torch.rand(args.batch, generator=g)).to(device)

    def forward():
        with torch.no_grad():
            student(x0, 1000 * t, cond)

    def fm_step():
        fm_loss(student, x0, cond, noise=noise, t=t)["loss"].backward()
        student.zero_grad(set_to_none=True)

    def mdt_step():
        mdt_loss(student, teacher, x0, cond, neg, noise=noise, t=t, fake_noise=fake, cfg_vm=3.0, cfg_vd=5.0)["loss"].backward()
        student.zero_grad(set_to_none=True)

    t_fwd = timed(forward, args.repeats, device)
    t_fm = timed(fm_step, args.repeats, device)
    t_mdt = timed(mdt_step, args.repeats, device)
    res = {
        "model": args.model, "batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
        "forward_s": t_fwd, "fm_step_s": t_fm, "mdt_step_s": t_mdt,
        "mdt_over_forward": t_mdt / t_fwd, "mdt_over_fm_step": t_mdt / t_fm,
        "floor": FLOOR, "mdt_over_floor": t_mdt / t_fwd / FLOOR,
    }
    print(f"model {args.model}, batch {args.batch}, {device} ({res['threads']} threads), median of {args.repeats}")
    print(f"{'':28s}{'seconds':>10s}{'x forward':>11s}")
    for name, v in (("forward pass", t_fwd), ("flow-matching step", t_fm), ("MDT-dist step (VM+VD)", t_mdt)):
        print(f"{name:28s}{v:10.4f}{v / t_fwd:11.2f}")
    print(f"MDT-dist step / forward = {res['mdt_over_forward']:.2f} (floor {FLOOR:.0f}; "
          f"{res['mdt_over_floor']:.2f}x the floor, target <= 1.30)")
    print(f"MDT-dist step / flow-matching step = {res['mdt_over_fm_step']:.2f}")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
