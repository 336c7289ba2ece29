"""Where bulk-job images come from: S3 URIs, S3 prefixes, manifests, local folders.

Local paths are honoured only under configured roots (the embedded single-machine mode), so a
job cannot read arbitrary files from the server's or a worker's disk.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from perito_core.errors import InvalidArgument, NotFound
from perito_core.jobs import ItemInput
from perito_core.storage import LocalStore, ObjectStore, S3Options, S3Store

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class SourceReader:
    """Reads images, listings and manifests named by URI, within the allowed local roots."""

    def __init__(self, s3: S3Options, local_roots: Sequence[Path] = ()) -> None:
        self.s3 = s3
        self.local_roots = [root.resolve() for root in local_roots]
        self._buckets: dict[str, S3Store] = {}

    def _local_path(self, uri: str) -> Path:
        path = Path(urlparse(uri).path if uri.startswith("file://") else uri).resolve()
        if not any(path.is_relative_to(root) for root in self.local_roots):
            allowed = ", ".join(map(str, self.local_roots)) or "none configured"
            raise InvalidArgument(
                f"{uri!r} is not under an allowed local root ({allowed}); use s3:// URIs, "
                "or start the server and workers with --local-root",
                field="input",
            )
        return path

    def _split(self, uri: str) -> tuple[ObjectStore, str]:
        """The store holding `uri` and the key within it."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise InvalidArgument(f"{uri!r} has no bucket", field="input")
            store = self._buckets.get(parsed.netloc)
            if store is None:
                store = self._buckets[parsed.netloc] = S3Store(parsed.netloc, "", self.s3)
            return store, parsed.path.lstrip("/")
        if parsed.scheme in ("", "file"):
            path = self._local_path(uri)
            root = next(r for r in self.local_roots if path.is_relative_to(r))
            return LocalStore(root), path.relative_to(root).as_posix()
        raise InvalidArgument(f"unsupported URI {uri!r}: use s3://bucket/key or a local path")

    def normalize(self, uri: str) -> str:
        """The URI as recorded in a job: local paths made absolute. Raises InvalidArgument,
        at submission, for a URI no worker could read."""
        store, key = self._split(uri)
        if isinstance(store, LocalStore):
            return str(store.root / key)
        return uri

    def read(self, uri: str) -> bytes:
        store, key = self._split(uri)
        return store.read_bytes(key)

    def list_images(self, prefix: str) -> list[str]:
        """Every image URI under an `s3://bucket/prefix` or a local folder, in key order."""
        store, key = self._split(prefix)
        if key and not key.endswith("/") and isinstance(store, S3Store):
            key += "/"
        keys = sorted(k for k in store.list_keys(key) if Path(k).suffix.lower() in IMAGE_SUFFIXES)
        if isinstance(store, S3Store):
            return [f"s3://{store.bucket}/{k}" for k in keys]
        assert isinstance(store, LocalStore)
        return [str(store.root / k) for k in keys]

    def read_manifest(self, uri: str) -> list[ItemInput]:
        """Items from a CSV (`uri[,id]`, header optional) or JSONL (`{"uri", "id"}`) file."""
        try:
            text = self.read(uri).decode("utf-8-sig")
        except NotFound:
            raise NotFound(f"manifest {uri!r} not found", field="manifest_uri") from None
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"manifest {uri!r} is not UTF-8 text", field="manifest_uri"
            ) from None
        items = (
            _jsonl_items(text, uri)
            if uri.lower().endswith((".jsonl", ".ndjson"))
            else _csv_items(text)
        )
        if not items:
            raise InvalidArgument(f"manifest {uri!r} lists no images", field="manifest_uri")
        return items


def _csv_items(text: str) -> list[ItemInput]:
    rows = [row for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
    if rows and rows[0][0].strip().lower() in ("uri", "url", "path"):
        rows = rows[1:]
    return [
        ItemInput(id=(row[1].strip() if len(row) > 1 else ""), uri=row[0].strip()) for row in rows
    ]


def _jsonl_items(text: str, uri: str) -> list[ItemInput]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            items.append(ItemInput(id=str(record.get("id", "")), uri=str(record["uri"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidArgument(
                f'manifest {uri!r} line {number}: expected {{"uri": ..., "id": ...}}',
                field="manifest_uri",
            ) from None
    return items


def default_item_id(uri: str) -> str:
    """An item's id when none was given: its file name."""
    return uri.rstrip("/").rsplit("/", 1)[-1]
