"""Whether a run, or a sweep's trials at once, leave Ray Data room to read on the cluster.

Ray 2.60 gives every Ray Data read task 1 CPU (a map task's default `num_cpus`, set in
ray/data/_internal/execution/operators/map_operator.py) and schedules it only where a whole CPU
is free, while Ray Train's workers and Tune's trial drivers hold their CPUs for the whole run.
When they leave less than one CPU per run reading at once, Ray Data starts no read task ("Tasks:
0 [backpressured: tasks(ResourceBudget)]") and the run waits at 0 rows forever, without an error.
So before a run or a sweep starts, `Plan` adds up what it reserves, and `Plan.problem` says, with
the numbers and the keys to change, when what is left cannot hold one read task per run.

How big the cluster is (`cluster_capacity`) is known for a local cluster this process started, and
for one whose autoscaler publishes its node types (the most they allow). A cluster joined without
that (`ray job submit` to a head started by hand, or by a launcher or KubeRay whose autoscaler
does not publish) may grow: the run is then refused only when its trainers fit the cluster as it
is and leave Ray Data short. Trainers that do not fit it yet wait for new nodes: Ray Train 2.60
retries starting their workers without end (a `WorkerGroupStartupTimeoutError` a minute, logged),
which on a head started by hand that never grows is a wait this check cannot see. The arithmetic
is on the cluster's totals: free CPUs split across nodes in fractions below one count as if they
were together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

READ_TASK_CPUS = 1.0
# The Tune function trainable of a sweep trial only drives its TorchTrainer; Ray 2.60 rejects
# {"cpu": 0} for it, so it takes a sliver (tune.py wraps it with these resources).
TRIAL_DRIVER_CPUS = 0.01
# Sums of fractional CPUs (0.5 + 0.01 + ...) are compared with this slack.
_SLACK = 1e-6


def _n(x: float) -> str:
    return f"{round(x, 3):g}"


@dataclass(frozen=True)
class Plan:
    """`runs` trainers at once on a cluster of `cluster_cpus` CPUs (and `cluster_gpus` GPUs), each
    with `num_workers` workers of `cpus_per_worker` CPUs (`gpus_per_worker` GPUs; 0 on CPU) and a
    driver of `driver_cpus` (a sweep trial's; 0 for `mdt-ray distill`, whose driver holds none)."""

    cluster_cpus: float
    cluster_gpus: float
    runs: int
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.0
    # False: the cluster may grow beyond cluster_cpus / cluster_gpus (see the module docstring).
    bounded: bool = True

    @property
    def trainer_cpus(self) -> float:
        return self.runs * self.num_workers * self.cpus_per_worker

    @property
    def drivers_cpus(self) -> float:
        return self.runs * self.driver_cpus

    @property
    def read_cpus(self) -> float:
        """What the trainers and drivers leave of the cluster's CPUs (negative: not even they fit)."""
        return self.cluster_cpus - self.trainer_cpus - self.drivers_cpus

    @property
    def read_cpus_needed(self) -> float:
        return self.runs * READ_TASK_CPUS

    @property
    def gpus(self) -> float:
        return self.runs * self.num_workers * self.gpus_per_worker

    def problem(self, *, sweep: bool = False) -> Optional[str]:
        """Why this plan cannot run on the cluster (one line), or None when it fits. `sweep`: the
        runs are trials, and their number is a key to change."""
        more = ", or sweep.max_concurrent_trials" if sweep and self.runs > 1 else ""
        trainers_wait = self.gpus > self.cluster_gpus + _SLACK or self.read_cpus < -_SLACK
        if trainers_wait and not self.bounded:
            return None
        if self.gpus > self.cluster_gpus + _SLACK:
            return (f"the Ray cluster has {_n(self.cluster_gpus)} GPUs but the trainer workers need "
                    f"{_n(self.gpus)} ({self._times(sweep, 'gpus_per_worker', self.gpus_per_worker)}): lower "
                    f"scale.num_workers or scale.gpus_per_worker{more}")
        if self.read_cpus + _SLACK >= self.read_cpus_needed:
            return None
        drivers = (f", the trial drivers {_n(self.drivers_cpus)} ({self._runs(sweep)}{_n(self.driver_cpus)})"
                   if self.driver_cpus else "")
        return (f"the Ray cluster has {_n(self.cluster_cpus)} CPUs: the trainer workers take "
                f"{_n(self.trainer_cpus)} ({self._times(sweep, 'cpus_per_worker', self.cpus_per_worker)}){drivers}, "
                f"which leaves {_n(max(self.read_cpus, 0.0))} for Ray Data's read tasks, short of the "
                f"{_n(self.read_cpus_needed)} they need ({_n(READ_TASK_CPUS)} CPU per task, a task per run at a "
                f"time; without it a run waits forever at 0 rows): lower scale.cpus_per_worker or "
                f"scale.num_workers{more}")

    def _runs(self, sweep: bool) -> str:
        if sweep:
            return f"{self.runs} trial{'s' if self.runs > 1 else ''} at a time × "
        return f"{self.runs} runs × " if self.runs > 1 else ""

    def _times(self, sweep: bool, key: str, per_worker: float) -> str:
        return f"{self._runs(sweep)}scale.num_workers={self.num_workers} × scale.{key}={_n(per_worker)}"


def plan_of(scale, cluster: dict[str, float], *, runs: int = 1, driver_cpus: float = 0.0) -> Plan:
    """The plan of `runs` runs of a config's `scale` block on a cluster of `cluster` resources
    ({"CPU": ..., "GPU": ...}, as `ray.cluster_resources()` gives them; `"bounded": False` when the
    cluster may grow, as `cluster_capacity` says)."""
    return Plan(cluster_cpus=float(cluster.get("CPU", 0.0)), cluster_gpus=float(cluster.get("GPU", 0.0)),
                runs=runs, num_workers=scale.num_workers, cpus_per_worker=scale.cpus_per_worker,
                gpus_per_worker=scale.gpus_per_worker if scale.use_gpu else 0.0, driver_cpus=driver_cpus,
                bounded=bool(cluster.get("bounded", True)))


def fitting_runs(scale, cluster: dict[str, float], *, driver_cpus: float = 0.0) -> int:
    """The most runs of `scale` that fit at once, each with its own read CPU (0: not even one)."""
    one = plan_of(scale, cluster, driver_cpus=driver_cpus)
    per_run = one.trainer_cpus + one.drivers_cpus + READ_TASK_CPUS
    runs = math.floor((one.cluster_cpus + _SLACK) / per_run)
    if one.gpus > 0:
        runs = min(runs, math.floor((one.cluster_gpus + _SLACK) / one.gpus))
    return max(runs, 0)


def cluster_capacity(extra: Sequence[str] = ()) -> dict[str, float]:
    """{"CPU": ..., "GPU": ..., "bounded": ...} of the connected Ray cluster (and the resources
    named in `extra`, such as a sweep's driver resource): the most it may grow to when its
    autoscaler publishes its node types, else what it has now; `bounded` is False when it may
    grow beyond that (see the module docstring).

    Ray 2.60 keeps the published node types in the GCS, and Ray Train reads them through the same
    private call (`get_max_resources_from_cluster_config`) to refuse a worker group that no node
    type can hold. Whether this process started the cluster is the `head` flag of the node that
    `ray.init` made (a connecting process gets a non-head one).
    """
    import ray

    names = ("CPU", "GPU", *extra)
    now = {k: float(v) for k, v in ray.cluster_resources().items() if k in names}
    try:
        from ray._private import worker
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
        started_here = bool(getattr(worker._global_node, "head", False))
    except Exception:  # the private calls moved: treat the cluster as one that may grow
        most, started_here = {}, False
    out: dict[str, float] = {k: max(now.get(k, 0.0), float(most.get(k, 0.0))) for k in names}
    out["bounded"] = bool(most) or started_here
    return out
