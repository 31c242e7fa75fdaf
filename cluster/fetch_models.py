"""Copy a checkpoint folder from S3 onto this node, skipping files that are already there.

Every Ray Train worker loads its own frozen teacher from `model.teacher`, a local path in
jobs/configs/trellis_*.yaml (/mnt/models/...), so the checkpoint must be on each node a worker
can land on. cluster/aws.yaml runs this in its node setup commands and cluster/kuberay/* in an
init container, before Ray starts on the node:

    python cluster/fetch_models.py s3://BUCKET/TRELLIS-image-large/ckpts/ /mnt/models/TRELLIS-image-large/ckpts

Credentials, region and endpoint come from boto3's usual chain: the instance profile (launcher),
IRSA or the AWS_* variables of the credentials Secret (KubeRay), AWS_ENDPOINT_URL for an
S3-compatible store. The script lives in cluster/ and not in mdt_ray because it is node set-up,
not part of a run; it needs only boto3, which requirements.txt pins.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def split_s3_uri(uri: str) -> tuple[str, str]:
    """("bucket", "prefix/") of s3://bucket/prefix; the prefix always ends in "/" or is empty."""
    if not uri.startswith("s3://"):
        raise ValueError(f"expected an s3:// URI, got {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # so s3://b/ckpts does not also match s3://b/ckpts-old/...
    return bucket, prefix


def fetch(src_uri: str, dest: str | os.PathLike, client=None) -> list[Path]:
    """Download every object under `src_uri` into `dest`, keeping sub-folders.

    A file already present with the object's size is kept, so re-running set-up on a node that
    has the checkpoints costs one listing. Returns the files written.

    Not pyarrow.fs.copy_files: it copies every file again on each node start (multi-GB teachers)
    and writes straight to the final name, so a node that dies mid-copy keeps a truncated
    checkpoint that the next start would take as present; boto3's download_file already does
    the multipart, threaded transfer.
    """
    if client is None:
        import boto3

        client = boto3.client("s3")
    bucket, prefix = split_s3_uri(src_uri)
    dest = Path(dest).resolve()
    written, seen = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):  # "folder" marker objects some tools create
                continue
            seen += 1
            target = (dest / key[len(prefix):]).resolve()
            if not target.is_relative_to(dest):
                raise ValueError(f"object key {key!r} would be written outside {dest}")
            if target.is_file() and target.stat().st_size == obj["Size"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # Download beside the target and rename: a node that dies mid-copy leaves a hidden
            # temporary file, never a truncated checkpoint under the real name.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            os.close(fd)
            try:
                client.download_file(bucket, key, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(target)
    if seen == 0:
        raise FileNotFoundError(f"no objects under {src_uri}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="s3://bucket/prefix/ holding the checkpoint files")
    parser.add_argument("dest", help="local folder (created if missing)")
    args = parser.parse_args(argv)
    written = fetch(args.src, args.dest)
    print(f"fetch_models: {len(written)} file(s) written to {args.dest} from {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
