"""The EMA update: mdt-ray's (a lerp_ per parameter into the named fp32 shadow, mdt_ray/engine.py)
against torch.optim.swa_utils' multi-tensor EMA function over the same shadow, on the parameters
of the named model sizes, timed alternately in one process. Both give the same weights, bit for
bit (checked here).

    python benchmarks/ema.py --sizes ss-demo ss-B --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._common import set_threads, write_json


def _swa_update(shadow: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    # The multi-tensor lerp wants one dtype on both sides: fp16/bf16 parameters are cast first.
    get_ema_multi_avg_fn(decay)(shadow, [p.to(s.dtype) for s, p in zip(shadow, current)], None)


def measure(size: str, repeats: int, decay: float = 0.999) -> dict:
    from mdt_ray.engine import EMA
    from mdt_ray.models import build_model

    model = build_model(size)
    ema_a, ema_b = EMA(model, decay), EMA(model, decay)
    names = list(ema_b.shadow)
    params = dict(model.named_parameters())
    swa_s, ours_s = [], []
    with torch.no_grad():
        for _ in range(repeats):
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
            t0 = time.perf_counter()
            ema_a.update(model)
            t1 = time.perf_counter()
            _swa_update([ema_b.shadow[n] for n in names], [params[n].detach() for n in names], decay)
            t2 = time.perf_counter()
            ours_s.append(t1 - t0)
            swa_s.append(t2 - t1)
    same = all(torch.equal(ema_a.shadow[n], ema_b.shadow[n]) for n in names)
    n_params = sum(p.numel() for p in model.parameters())
    ours, swa = statistics.median(ours_s), statistics.median(swa_s)
    return {"size": size, "params": n_params, "tensors": len(names), "ours_ms": ours * 1e3, "swa_utils_ms": swa * 1e3,
            "swa_utils_over_ours": swa / ours, "bitwise_equal": same}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["ss-demo", "ss-B"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    rows = [measure(size, args.repeats) for size in args.sizes]
    for r in rows:
        print(f"{r['size']:>8}: {r['params'] / 1e6:7.1f}M params in {r['tensors']} tensors  "
              f"mdt-ray (lerp per tensor) {r['ours_ms']:8.2f} ms  swa_utils multi-tensor {r['swa_utils_ms']:8.2f} ms  "
              f"swa_utils/ours {r['swa_utils_over_ours']:.2f}x  same weights: {r['bitwise_equal']}", flush=True)
    write_json(args.json, rows)
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
