"""Put a checkpoint folder onto this node, from S3 or the Hugging Face Hub, skipping files already there.

Every Ray Train worker loads its own frozen teacher from `model.teacher`, a local path in
jobs/configs/trellis_*.yaml (/mnt/models/...), so the checkpoint must be on each node a worker
can land on. cluster/aws.yaml runs this in its node setup commands and cluster/kuberay/* in an
init container, before Ray starts on the node:

    python cluster/fetch_models.py s3://BUCKET/TRELLIS-image-large/ckpts/ /mnt/models/TRELLIS-image-large/ckpts
    python cluster/fetch_models.py microsoft/TRELLIS-image-large[@REVISION] /mnt/models/TRELLIS-image-large

DEST receives SRC's files at their paths below SRC: the objects under the S3 prefix, or the files
of the Hub repository (its `ckpts/` folder then lies in DEST/ckpts). The copying is the libraries'
own: s3fs fetches the missing objects concurrently (`S3FileSystem.get` with the list of them), and
huggingface_hub's `snapshot_download(local_dir=DEST)` the repository. A file already in DEST with
the source's size is kept, so a node restart costs one listing; a copy cut short leaves a shorter
file, which the next run fetches again. (pyarrow.fs.copy_files copies every file again on each
start, and the teachers are several GB.)

With HF_HUB_OFFLINE=1, huggingface_hub fills no local_dir; the repository then comes from the local
Hub cache (HF_HOME / HF_HUB_CACHE, e.g. a volume or the image) and is copied out of it like an S3
prefix. S3 is reached as mdt_ray.data.storage reaches it: AWS_ENDPOINT_URL(_S3) for an
S3-compatible store, AWS_* keys, else boto's chain (instance profile on the launcher, IRSA or the
credentials Secret on KubeRay); a dead endpoint fails within seconds. The Hub takes HF_TOKEN and
HF_ENDPOINT. Any bad input is one line on stderr and exit status 2.

The script lives in cluster/ and not in mdt_ray because it is node set-up, not part of a run; it
uses the mdt_ray installed in the image (cluster/Dockerfile).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Paths below a local_dir that huggingface_hub keeps for itself (download metadata, tree listings).
HF_LOCAL_DIR_CACHE = ".cache"


def _files(fs, root: str) -> dict[str, int]:
    """{path relative to `root`: size} of every file below `root` on `fs`. s3fs lists the empty
    "folder/" marker objects some tools create as files; they are no files to fetch."""
    found = fs.find(root, detail=True)
    return {path[len(root):].lstrip("/"): info["size"] for path, info in found.items()
            if info["type"] == "file" and not path.endswith("/")}


def _progress(count: int):
    """An fsspec callback that prints a line as each of `count` files is done."""
    from fsspec.callbacks import Callback

    def line(size, value, **_):
        if value:
            print(f"fetch_models: {value}/{count} file(s) done", flush=True)

    return Callback(hooks={"line": line})


def copy_missing(fs, root: str, dest: str | os.PathLike, what: str) -> list[Path]:
    """Fetch the files below `root` on `fs` that `dest` lacks (missing, or of another size) into
    `dest`, keeping sub-folders; returns the files written. `what` names the source in messages."""
    from mdt_ray.data.storage import retry

    files = retry(lambda: _files(fs, root), what=f"listing {what}")
    if not files:
        raise FileNotFoundError(f"no files under {what}")
    if "" in files:
        raise ValueError(f"{what} is a single file; give the folder (prefix) that holds it")
    dest = Path(dest).resolve()
    missing: dict[str, Path] = {}
    for rel, size in sorted(files.items()):
        target = (dest / rel).resolve()
        if not target.is_relative_to(dest):
            raise ValueError(f"{what}: file {rel!r} would be written outside {dest}")
        if not (target.is_file() and target.stat().st_size == size):
            missing[rel] = target
    print(f"fetch_models: {len(files) - len(missing)} of {len(files)} file(s) already in {dest}", flush=True)
    if missing:
        gigabytes = sum(files[rel] for rel in missing) / 1e9
        print(f"fetch_models: fetching {len(missing)} file(s), {gigabytes:.2f} GB, from {what}", flush=True)
        fs.get([f"{root}/{rel}" for rel in missing], [str(t) for t in missing.values()],
               callback=_progress(len(missing)))
    return list(missing.values())


def _local_state(folder: Path) -> dict[Path, tuple[int, int]]:
    """(size, mtime) of every file below `folder`, huggingface_hub's own bookkeeping left out."""
    if not folder.is_dir():
        return {}
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] != HF_LOCAL_DIR_CACHE}


def fetch_hub(repo: str, revision: str | None, dest: str | os.PathLike) -> list[Path]:
    """Repository `repo` at `revision` (None: main) into `dest`; returns the files written."""
    import fsspec
    import huggingface_hub

    name = f"{repo}@{revision or 'main'}"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        snapshot = huggingface_hub.snapshot_download(repo, revision=revision)
        local = fsspec.filesystem("file", auto_mkdir=True)  # s3fs makes the sub-folders; this must be told
        return copy_missing(local, snapshot, dest, f"{name} in the Hub cache ({snapshot})")
    dest, endpoint = Path(dest).resolve(), huggingface_hub.constants.ENDPOINT
    before = _local_state(dest)
    print(f"fetch_models: {name} from {endpoint} into {dest}", flush=True)
    try:
        huggingface_hub.snapshot_download(repo, revision=revision, local_dir=dest)  # shows its own progress
    except OSError as e:  # its errors do not say which Hub they asked
        raise OSError(f"Hub at {endpoint}: {_one_line(e)}") from e
    return sorted(p for p, state in _local_state(dest).items() if before.get(p) != state)


def fetch_s3(uri: str, dest: str | os.PathLike) -> list[Path]:
    """Every object under the S3 prefix `uri` into `dest`; returns the files written."""
    from mdt_ray.data.storage import StorageTarget

    target = StorageTarget(uri)
    target.check_bucket()  # a dead endpoint or a missing bucket: one StorageError naming it
    fs, root = target.s3fs()
    return copy_missing(fs, root, dest, target.describe())


def parse_source(src: str) -> tuple[str, str, str | None]:
    """("s3", bucket, prefix) or ("hub", repository, revision or None) of SRC; a ValueError saying
    what is wrong for anything else. cluster/check.py runs it on the SRC of every cluster file."""
    from mdt_ray.data.storage import split_s3
    from mdt_ray.models.pipeline import split_hub_id

    if src.startswith("s3://"):
        return ("s3", *split_s3(src))  # a URI without a bucket is a ValueError
    hub = split_hub_id(src)
    if hub is None:
        raise ValueError("SRC is neither an s3://bucket/prefix URI nor a Hugging Face repository id "
                         "owner/name[@revision]")
    return ("hub", *hub)


def fetch(src: str, dest: str | os.PathLike) -> list[Path]:
    """`src` (s3://bucket/prefix or a Hub id owner/name[@revision]) into `dest`; the files written."""
    kind, name, revision = parse_source(src)  # checked before anything is contacted
    return fetch_s3(src, dest) if kind == "s3" else fetch_hub(name, revision, dest)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch_models.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="s3://bucket/prefix/, or a Hugging Face repository id owner/name[@revision]")
    parser.add_argument("dest", help="local folder that receives SRC's files (created if missing)")
    args = parser.parse_args(argv)
    try:
        written = fetch(args.src, args.dest)
    except (ValueError, OSError) as e:  # huggingface_hub's and the storage errors are OSErrors
        print(f"fetch_models.py: error: {args.src}: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"fetch_models: {len(written)} file(s) written to {args.dest} from {args.src}")
    return 0


if __name__ == "__main__":
    # `python cluster/fetch_models.py` puts cluster/, not the repository, first on sys.path; the
    # image has mdt_ray installed, a checkout has it here.
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
