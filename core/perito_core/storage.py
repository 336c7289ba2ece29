"""Object storage behind one small interface: a local folder or S3 (any endpoint).

The registry and the bulk-job inputs and outputs are written once against `ObjectStore`;
`LocalStore` is the embedded single-machine default, `S3Store` speaks the S3 protocol through
boto3 to AWS, MinIO or any compatible server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from perito_core.errors import InvalidArgument, NotFound, StorageUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class ObjectStore(Protocol):
    """Keys are `/`-separated paths relative to the store's root."""

    description: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str) -> Iterator[str]: ...
    def list_children(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


class LocalStore:
    """A folder on local disk. Writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"key {key!r} escapes the store root")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{key} not found in {self.description}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def upload_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=".tmp-") as tmp,
            path.open("rb") as source,
        ):
            shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, target)

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"{key} not found in {self.description}")
        shutil.copyfile(source, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def list_children(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if not p.name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible endpoint. None means boto3's default chain."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0
    max_attempts: int = 3


def make_s3_client(options: S3Options) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        # Path-style works with every S3-compatible server (MinIO, moto, Ceph ...).
        s3={"addressing_style": "path"},
    )
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region or "us-east-1",
        aws_access_key_id=options.access_key_id,
        aws_secret_access_key=options.secret_access_key,
        config=config,
    )
    return client


class S3Store:
    """A bucket and key prefix on an S3-compatible server."""

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options
        self.client = make_s3_client(options)
        where = f" at {options.endpoint_url}" if options.endpoint_url else ""
        self.description = f"s3://{bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, /, **kwargs: Any) -> Any:
        """Run one boto3 call, turning its failures into Perito errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{what} not found in {self.description}") from None
            if code == "NoSuchBucket":
                raise StorageUnavailable(
                    f"bucket {self.bucket!r} does not exist ({self.description})"
                ) from None
            detail = f"{code} {error.get('Message', '')}".strip()
            raise StorageUnavailable(
                f"object storage {self.description} refused {what}: {detail}"
            ) from None
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"object storage {self.description} is unreachable: {exc}"
            ) from None

    def read_bytes(self, key: str) -> bytes:
        response = self._call(key, self.client.get_object, Key=self._key(key))
        body: bytes = response["Body"].read()
        return body

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Key=self._key(key), Body=data)

    def upload_file(self, key: str, path: Path) -> None:
        with path.open("rb") as body:
            self._call(key, self.client.put_object, Key=self._key(key), Body=body)

    def download_file(self, key: str, path: Path) -> None:
        response = self._call(key, self.client.get_object, Key=self._key(key))
        with path.open("wb") as out:
            for chunk in response["Body"].iter_chunks(1 << 20):
                out.write(chunk)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Key=self._key(key))
        except NotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix)
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(prefix, self.client.list_objects_v2, Prefix=full, **extra)
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def list_children(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        names: list[str] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(
                prefix, self.client.list_objects_v2, Prefix=full, Delimiter="/", **extra
            )
            names += [p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            names += [o["Key"][len(full) :] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(n for n in names if n)
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Key=self._key(key))


def open_store(uri: str, s3: S3Options | None = None) -> ObjectStore:
    """Open `s3://bucket/prefix`, `file:///path` or a plain path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidArgument(f"{uri!r} has no bucket; expected s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, s3 or S3Options())
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "":
        return LocalStore(Path(uri))
    raise InvalidArgument(f"unsupported storage URI {uri!r}; use s3://..., file://... or a path")
