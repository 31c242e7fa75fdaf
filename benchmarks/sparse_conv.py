"""Stage-2 submanifold 3³ convolution: mdt-ray's gather formulation against the pair-list
scatter it replaced, a dense conv3d over the whole 64³ grid, and spconv when it imports.

One process, methods alternating within every repeat (so outside load hits all alike), median
of the repeats, at 1 and at 2 torch threads. Inputs are shell-shaped voxel sets of the 64³
grid (surfaces, as TRELLIS's SLAT voxels are) at the voxel counts TRELLIS sees (~5,000 typical,
8,000 in docs/scaling.md, 32,768 its cap), one asset, `--channels` wide (slat-L's io blocks:
128). Forward only and forward + backward. Every method's output is checked against the gather
one (max relative error printed); the dense grid is zero outside the active sites, so at them
it computes the same sum. Its cost does not depend on the voxel count, so it runs at the first
count only.

    python benchmarks/sparse_conv.py [--voxels 5000 8000 32768] [--channels 128] [--threads 1 2]
        [--repeats 3] [--no-dense] [--device cpu] [--json out.json]

spconv: `pip install spconv` (its CPU build) with its dependencies on PYTHONPATH; it is not a
dependency of mdt-ray, and the method is skipped with the import error printed when missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import shell_voxels, write_json  # noqa: E402
from mdt_ray.models.sparse import _CENTRE, SparseBatch, neighbour_pairs, neighbour_table, submanifold_conv3d  # noqa: E402

RES = 64


def pair_list_conv(x: SparseBatch, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The formulation before: per slot a GEMM over existing pairs, then `index_add`."""
    w = weight.flatten(1, 3)
    out = F.linear(x.feats, w[:, _CENTRE], bias)
    for slot, (out_rows, in_rows) in enumerate(neighbour_pairs(x)):
        if slot != _CENTRE and out_rows.numel():
            out = out.index_add(0, out_rows, F.linear(x.feats.index_select(0, in_rows), w[:, slot]))
    return out


def dense_conv(coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scatter to a zero 64³ grid, conv3d (padding 1), read the active sites back."""
    c = feats.shape[1]
    grid = feats.new_zeros(1, c, RES, RES, RES)
    x, y, z = coords.long().unbind(1)
    grid[0, :, x, y, z] = feats.t()
    w = weight.permute(0, 4, 1, 2, 3)  # (out, in, 3, 3, 3)
    out = F.conv3d(grid, w, bias, padding=1)
    return out[0, :, x, y, z].t()


def spconv_method(coords: torch.Tensor, channels: int, weight: torch.Tensor, bias: torch.Tensor, device):
    import spconv.pytorch as spconv  # noqa: F401 (import error reported by the caller)

    conv = spconv.SubMConv3d(channels, weight.shape[0], 3, bias=True, indice_key="s").to(device)
    with torch.no_grad():
        conv.weight.copy_(weight)  # spconv 2's KRSC layout (out, 3, 3, 3, in), as TRELLIS stores
        conv.bias.copy_(bias)
    idx = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1).int().to(device)

    def run(feats):
        st = spconv.SparseConvTensor(feats, idx, [RES] * 3, 1)
        return conv(st).features
    return run


def median_ms(samples: list[float]) -> float:
    return round(1e3 * statistics.median(samples), 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--voxels", type=int, nargs="+", default=[5000, 8000, 32768])
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-dense", action="store_true", help="skip the dense 64³ conv3d (slow on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    cin = cout = args.channels
    weight = (torch.randn(cout, 3, 3, 3, cin, generator=g) / (27 * cin) ** 0.5).to(device)
    bias = torch.randn(cout, generator=g).to(device)
    rows = []
    for n in args.voxels:
        coords = shell_voxels(n).to(device)
        feats = torch.randn(n, cin, generator=g).to(device)
        x = SparseBatch.from_list([coords], [feats])
        neighbour_table(x)  # built once per coords table (cached), as in the model
        methods = {
            "gather (mdt-ray)": lambda f: submanifold_conv3d(x.replace(f), weight, bias),
            "pair-list index_add (before)": lambda f: pair_list_conv(x.replace(f), weight, bias),
        }
        if not args.no_dense and n == args.voxels[0]:
            # its cost is that of the full grid whatever the voxel count: measured once
            methods["dense conv3d 64³"] = lambda f: dense_conv(coords, f, weight, bias)
        try:
            methods["spconv SubMConv3d"] = spconv_method(coords, cin, weight, bias, device)
        except Exception as e:  # noqa: BLE001 (any import/build failure just drops the method)
            print(f"[bench] spconv unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        with torch.no_grad():
            ref = methods["gather (mdt-ray)"](feats)
            errs = {k: ((m(feats) - ref).norm() / ref.norm()).item() for k, m in methods.items()}
        pairs = sum(o.numel() for o, _ in neighbour_pairs(x))
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = {(k, mode): [] for k in methods for mode in ("fwd", "fwd+bwd")}
            failed: dict = {}
            for rep in range(args.repeats + 1):  # first round: warm-up, dropped
                for k, m in methods.items():
                    for mode in ("fwd", "fwd+bwd"):
                        if (k, mode) in failed:
                            continue
                        f = feats.clone().requires_grad_(mode == "fwd+bwd")
                        sync()
                        t0 = time.perf_counter()
                        try:
                            if mode == "fwd":
                                with torch.no_grad():
                                    m(f)
                            else:
                                m(f).pow(2).sum().backward()
                        except Exception as e:  # noqa: BLE001 (spconv's CPU build has no backward)
                            failed[(k, mode)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            print(f"[bench] {k} {mode} failed: {failed[(k, mode)]}")
                            continue
                        sync()
                        if rep:
                            times[(k, mode)].append(time.perf_counter() - t0)
            for k in methods:
                ms = {mode: (median_ms(times[(k, mode)]) if times[(k, mode)] else None) for mode in ("fwd", "fwd+bwd")}
                row = {"voxels": n, "neighbours_per_voxel": round(pairs / n, 2), "channels": cin,
                       "threads": threads, "method": k, "fwd_ms": ms["fwd"], "fwd_bwd_ms": ms["fwd+bwd"],
                       "rel_err_vs_gather": errs[k]}
                rows.append(row)
                fmt = lambda v: f"{v:9.1f} ms" if v is not None else "      n/a   "  # noqa: E731
                print(f"N={n:6d} threads={threads} {k:30s} fwd {fmt(ms['fwd'])}  "
                      f"fwd+bwd {fmt(ms['fwd+bwd'])}  rel err {errs[k]:.1e}", flush=True)
    res = {"device": str(device), "rows": rows}
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
