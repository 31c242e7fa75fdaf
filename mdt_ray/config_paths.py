"""Relative paths of a job or sweep config made absolute once, on the driver.

A sweep's trials (and Ray Train's workers) run in another working directory than the command
(Ray Tune changes each trial's cwd to its trial folder), so a relative `data.uri` read there names
nothing. Every local path of the config is resolved against the directory the command was started
in before any trial or worker sees the config; URIs (`s3://`, `http://`, ...) and the built-in
teacher names (`ss-demo`, ...) are left as they are.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

# The dotted keys that hold a local path when they hold no URI.
PATH_KEYS = ("model.teacher", "model.image_encoder", "data.uri", "data.eval_uri", "run.storage_path")
_SQLITE = "sqlite:///"
# The packaged teacher (mdt_ray/assets/...) is found from the repository (or installed package)
# root when the working directory does not hold it: the same fallback models.teachers.from_root has.
_ROOT = Path(__file__).resolve().parents[1]


def _is_hub_id(value: str, cwd: Path) -> bool:
    from mdt_ray.models.pipeline import _HUB_ID

    p = Path(value).expanduser()
    return (not p.is_absolute() and not (cwd / p).exists() and not (_ROOT / p).exists()
            and not value.endswith(".json") and bool(_HUB_ID.match(value)))


def is_local(value: str) -> bool:
    return "://" not in value


def resolve_path(value: str, cwd: Path, *, root_fallback: bool = False) -> str:
    """`value` absolute against `cwd` (after `~`); with `root_fallback` (the teacher), against
    the package root when only that holds it. Outputs and corpora never fall back: a `runs/`
    that happens to exist in the package root is not the user's."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    here = cwd / p
    if root_fallback and not here.exists() and (_ROOT / p).exists():
        return str(_ROOT / p)
    return os.path.normpath(here)


def resolve_tree(tree: dict[str, Any], cwd: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """A copy of the config tree `tree` with its local paths absolute (see the module docstring)."""
    from mdt_ray.models.registry import NAMED_CONFIGS

    base = Path(cwd) if cwd is not None else Path.cwd()
    out = copy.deepcopy(tree)
    for key in PATH_KEYS:
        block, name = key.split(".")
        node = out.get(block)
        if not isinstance(node, dict):
            continue
        value = node.get(name)
        if not isinstance(value, str) or not value or not is_local(value):
            continue
        # A bare word there is a size name (or a typo of one, which its validator names).
        if key == "model.teacher" and (value in NAMED_CONFIGS or not (value.endswith(".json") or "/" in value)):
            continue
        # owner/name[@rev] that is no local path here is a Hugging Face id (mdt_ray.models.pipeline).
        if key == "model.teacher" and _is_hub_id(value, base):
            continue
        node[name] = resolve_path(value, base, root_fallback=key == "model.teacher")
    tracking = out.get("tracking")
    if isinstance(tracking, dict):
        uri = tracking.get("uri")
        if isinstance(uri, str) and uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
            tracking["uri"] = _SQLITE + resolve_path(uri[len(_SQLITE):], base)
    return out
