"""Evaluation of a checkpoint against its teacher, for either stage (mdt_ray.stages says how each
stage samples and scores): the report (`evaluate`, `format_table`, `flat_metrics`), latency
bookkeeping, the render grid; `mdt_ray.eval.command` is what `mdt-ray eval` does with them."""

from mdt_ray.eval.latency import Timing, measure_latency, nfe_ratios, sampler_nfe, speedups, time_interleaved
from mdt_ray.eval.render import grid_size, render_grid
from mdt_ray.eval.report import evaluate, flat_metrics, format_table

__all__ = [
    "Timing",
    "evaluate",
    "flat_metrics",
    "format_table",
    "grid_size",
    "measure_latency",
    "nfe_ratios",
    "render_grid",
    "sampler_nfe",
    "speedups",
    "time_interleaved",
]
