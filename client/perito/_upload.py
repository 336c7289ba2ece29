"""Upload a local folder to S3 so a bulk job can read it (`submit_job(..., upload_to=...)`).

Workers read jobs from S3; a user with photos on a laptop uploads them first. boto3 is an
optional dependency of the SDK (`pip install 'perito[s3]'`); credentials and the endpoint come
from the usual AWS settings (`AWS_ENDPOINT_URL_S3` for MinIO and other S3-compatible stores).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from perito._requests import image_files


def upload_folder(folder: str | os.PathLike[str], destination: str, s3_client: Any = None) -> str:
    """Upload the images under `folder` to `s3://bucket/prefix/`; returns the prefix URI.

    Keys keep the files' paths relative to `folder`, so job results name the same files.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if not destination.startswith("s3://"):
        raise ValueError(f"upload_to must be an s3:// URI, not {destination!r}")
    bucket, _, prefix = destination.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"upload_to {destination!r} names no bucket")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    files = image_files(root)
    if not files:
        raise ValueError(f"no images under {root}")
    if s3_client is None:
        try:
            import boto3
        except ImportError:
            raise ImportError("uploading needs boto3: pip install 'perito[s3]'") from None
        s3_client = boto3.client("s3")

    def put(path: Path) -> None:
        key = prefix + path.relative_to(root).as_posix()
        s3_client.upload_file(str(path), bucket, key)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, files))
    return f"s3://{bucket}/{prefix}"
