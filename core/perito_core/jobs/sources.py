"""Where bulk-job images come from: S3 URIs, S3 prefixes, manifests, local folders.

Local paths are honoured only under configured roots (the embedded single-machine mode), so a
job cannot read arbitrary files from the server's or a worker's disk.

URIs are taken literally (`perito_core.storage.split_s3_uri`, `local_path_of`): in
`s3://bucket/key` the key is everything after the first `/` past the bucket, with `#`, `?`,
`%`, `+`, spaces and non-ASCII as plain characters; nothing is percent-decoded. Listings and
manifests are streamed: nothing here holds a whole listing or a whole manifest in memory, so
a caller can stop at its item cap.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from perito_core.errors import InvalidArgument, InvalidImage, NotFound
from perito_core.jobs.store import ItemInput
from perito_core.storage import (
    LocalStore,
    ObjectStore,
    S3Options,
    S3Store,
    absolute_local_path,
    echo_uri,
    is_other_scheme,
    split_s3_uri,
)

MANIFEST_MAX_BYTES = 256 * 1024 * 1024
"""The default bound on a manifest's size (about two million lines of `uri,id`)."""

_IGNORED_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
_URI_HEADERS = ("uri", "url", "path")


def is_ignored_key(key: str, size: int | None = None) -> bool:
    """Whether a listed object is an obvious non-photo that a prefix job leaves out.

    The rule, the only one: a key is ignored when
    - any of its path components (below the listed prefix) starts with `.`: hidden files and
      folders (`.DS_Store`, `._IMG_0001.JPG` from macOS, `.thumbnails/`, `.Trash/`);
    - its file name is `Thumbs.db`, `ehthumbs.db` or `desktop.ini` (any case), Windows'
      folder files;
    - it ends in `/` and is empty (size 0, or unknown): a "folder" placeholder that S3
      consoles create.
    Everything else is an item, whatever its name: an object that is not an image fails as
    that item's error (`NOT_AN_IMAGE`), never silently.

    Args:
        key: the key relative to the listed prefix (`2024/IMG_0001.HEIC`).
        size: the object's size in bytes, if known.
    """
    if key.endswith("/"):
        if not size:
            return True
        key = key.rstrip("/")
    parts = [part for part in key.split("/") if part]
    if any(part.startswith(".") for part in parts):
        return True
    return bool(parts) and parts[-1].lower() in _IGNORED_NAMES


class SourceReader:
    """Reads images, listings and manifests named by URI, within the allowed local roots.

    Safe to share between threads.
    """

    def __init__(self, s3: S3Options, local_roots: Sequence[Path] = ()) -> None:
        self.s3 = s3
        self.local_roots = [root.resolve() for root in local_roots]
        self._buckets: dict[str, S3Store] = {}
        self._lock = threading.Lock()

    def _local_path(self, uri: str, folders: dict[Path, Path] | None = None) -> Path:
        """The path `uri` names, resolved, if it is under an allowed root. The refusals quote
        `uri` as given, and never the roots (one per tenant, perhaps) nor where a symbolic
        link leads (perhaps somewhere the caller may not read). `folders`: see `normalize`."""
        given = absolute_local_path(uri, field="input")
        try:
            path = _resolve(given, folders)
        except (RuntimeError, OSError, ValueError):  # a symlink loop, a NUL byte
            raise InvalidArgument(f"{echo_uri(uri)} cannot be resolved", field="input") from None
        if not any(path.is_relative_to(root) for root in self.local_roots):
            lexical = Path(os.path.normpath(given))
            if any(lexical.is_relative_to(root) for root in self.local_roots):
                raise InvalidArgument(
                    f"{echo_uri(uri)} is a symbolic link that leads out of the allowed local "
                    "roots; links are followed only within them",
                    field="input",
                )
            raise InvalidArgument(
                f"{echo_uri(uri)} is not under an allowed local root; use s3:// URIs, or "
                "start the server and workers with --local-root (PERITO_LOCAL_ROOTS)",
                field="input",
            )
        return path

    def _bucket(self, bucket: str) -> S3Store:
        with self._lock:
            store = self._buckets.get(bucket)
            if store is None:
                store = self._buckets[bucket] = S3Store(bucket, "", self.s3)
            return store

    def _split(self, uri: str, *, as_recorded: bool = False) -> tuple[ObjectStore, str]:
        """The store holding `uri` and the key within it. `as_recorded`: a local `uri` is a
        canonical path recorded after its check (`normalize`), read as written with no
        symbolic link followed (`_recorded`)."""
        if uri[:5].lower() == "s3://":
            try:
                bucket, key = split_s3_uri(uri)
            except InvalidArgument as exc:
                raise InvalidArgument(exc.message, field="input") from None
            return self._bucket(bucket), key
        if is_other_scheme(uri):
            raise InvalidArgument(
                f"unsupported URI {echo_uri(uri)}: use s3://bucket/key or a local path",
                field="input",
            )
        if as_recorded:
            return self._recorded(uri)
        path = self._local_path(uri)
        root = next(r for r in self.local_roots if path.is_relative_to(r))
        return LocalStore(root), path.relative_to(root).as_posix()

    def _recorded(self, uri: str) -> tuple[LocalStore, str]:
        """The store and key of a canonical local path, read with no symbolic link followed.

        Raises:
            InvalidArgument: as `_local_path` for a path under no allowed root, or when
                resolving it leads elsewhere than it says (a symbolic link in its path, swapped
                in after it was checked): the path is quoted as given, never where it leads.
        """
        given = absolute_local_path(uri, field="input")
        for root in self.local_roots:
            if given.is_relative_to(root):
                return LocalStore(root, follow_links=False), given.relative_to(root).as_posix()
        self._local_path(uri)  # refuses a path under no root, or leading out of them
        raise InvalidArgument(
            f"{echo_uri(uri)}: a symbolic link took the place of part of its path after it was "
            "checked; it is not followed",
            field="input",
        )

    def normalize(self, uri: str, folders: dict[Path, Path] | None = None) -> str:
        """The URI as recorded in a job: local paths made absolute (symlinks resolved).

        Args:
            uri: an `s3://` URI or a local path.
            folders: for many paths checked at once (one submission's items), the folders
                resolved so far, filled as they are resolved: a file that is no symbolic
                link is resolved as its folder's resolution joined with its name (one
                `lstat`, not one per path component). Leave it out to resolve the path
                whole. The worker resolves the recorded path again, and checks it against
                the allowed roots, when it reads it (`read`).

        Raises:
            InvalidArgument: at submission, for a URI no worker could read (another scheme,
                no bucket, a local path outside the allowed roots).
        """
        if uri[:5].lower() == "s3://" or is_other_scheme(uri):
            self._split(uri)  # refuses a URI no worker could read
            return uri
        return str(self._local_path(uri, folders))  # a path under an allowed root

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The bytes of one object or file.

        Args:
            uri: `s3://bucket/key` or a local path under an allowed root.
            max_bytes: refuse anything larger, before reading it (S3 `ContentLength`, local
                `stat`), and never read more than one byte past it.

        Raises:
            NotFound: no such object or file.
            InvalidImage: reason TOO_LARGE, or NOT_A_REGULAR_FILE for a local directory, FIFO,
                socket or device (never opened for reading).
            InvalidArgument: a URI that cannot be read here (a local path outside the allowed
                roots), or a local path with a symbolic link in it: a job records its items'
                canonical paths (`normalize`), checked against its tenant's prefixes, and
                each is read as recorded, so a link swapped in since is refused, not followed.
            StorageUnavailable: object storage cannot be reached.
        """
        store, key = self._split(uri, as_recorded=True)
        return store.read_bytes(key, max_bytes)

    def iter_prefix(self, prefix: str) -> Iterator[str]:
        """The URI of every object under an `s3://bucket/prefix` or a local folder, in key order.

        No file-name filter: every object listed is an item (one that is not an image fails
        when decoded), except what `is_ignored_key` leaves out. S3 prefixes are folders
        (`s3://b/2024` lists `2024/...`, not `2024-old/...`). Locally, symlinks, FIFOs,
        sockets, devices and empty folders are items too (refused with a reason when read);
        folders reached through a symlink are not walked.

        Yields:
            `s3://bucket/key` URIs (keys exactly as listed), or absolute local paths.

        Raises:
            InvalidArgument: the prefix is not a readable location (see `normalize`).
            StorageUnavailable: object storage cannot be reached (possibly mid-listing).
        """
        store, key = self._split(prefix)
        if isinstance(store, S3Store):
            if key and not key.endswith("/"):
                key += "/"
            for listed in store.iter_objects(key):
                if not is_ignored_key(listed.key[len(key) :], listed.size):
                    yield f"s3://{store.bucket}/{listed.key}"
            return
        assert isinstance(store, LocalStore)
        key = "" if key == "." else key
        for listed in store.iter_objects(key):
            # The rule looks below the prefix only (a job may list a folder inside `.data/`);
            # a prefix that is itself one file is judged by its name.
            relative = listed.key[len(key) :].lstrip("/") or listed.key.rsplit("/", 1)[-1]
            if not is_ignored_key(relative, listed.size):
                yield str(store.root / listed.key)

    def iter_manifest(self, uri: str, max_bytes: int = MANIFEST_MAX_BYTES) -> Iterator[ItemInput]:
        """Items from a CSV or JSONL manifest, parsed line by line as it is read.

        CSV: `uri[,id]` rows, or a header row naming the columns (`uri` or `url` or `path`,
        and optionally `id`, in any order); whitespace around a field is dropped. JSONL (a
        `.jsonl` / `.ndjson` name, or a first line starting with `{`): one
        `{"uri": ..., "id": ...}` object per line, the URI taken exactly. Blank lines are
        skipped. Yields nothing for an empty manifest (the caller decides what that means).

        Args:
            uri: where the manifest is (`s3://...` or a local path under an allowed root).
            max_bytes: refuse a larger manifest: checked before reading, and while reading.

        Raises:
            NotFound: no manifest there (field `manifest_uri`).
            InvalidArgument: field `manifest_uri`: over `max_bytes`, not UTF-8, not a
                regular file, or a malformed line (named by its number).
            StorageUnavailable: object storage cannot be reached.
        """
        store, key = self._split(uri, as_recorded=True)
        try:
            with store.open_read(key, max_bytes) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
                lines = _numbered(text)
                first = next(lines, None)
                if first is None:
                    return
                jsonl = uri.lower().endswith((".jsonl", ".ndjson")) or first[1].lstrip().startswith(
                    "{"
                )
                rows = _chain(first, lines)
                yield from (_jsonl_items(rows, uri) if jsonl else _csv_items(rows, uri))
        except NotFound:
            raise NotFound(f"manifest {echo_uri(uri)} not found", field="manifest_uri") from None
        except InvalidImage as exc:
            if exc.reason == "TOO_LARGE":
                raise InvalidArgument(
                    f"manifest {echo_uri(uri)} is larger than {max_bytes:,} bytes, the limit",
                    field="manifest_uri",
                    reason="TOO_LARGE",
                ) from None
            raise InvalidArgument(
                f"manifest {echo_uri(uri)}: {exc.message}", field="manifest_uri", reason=exc.reason
            ) from None
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"manifest {echo_uri(uri)} is not UTF-8 text", field="manifest_uri"
            ) from None


def _numbered(text: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers."""
    for number, line in enumerate(text, start=1):
        if line.strip():
            yield number, line


def _chain(first: tuple[int, str], rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    yield first
    yield from rest


def _csv_items(rows: Iterator[tuple[int, str]], uri: str) -> Iterator[ItemInput]:
    numbers: list[int] = [0]

    def lines() -> Iterator[str]:
        for number, line in rows:
            numbers[0] = number
            yield line

    uri_column, id_column = 0, 1
    header_checked = False
    try:
        for row in csv.reader(lines(), strict=True):
            fields = [field.strip() for field in row]
            if not any(fields):
                continue
            if not header_checked:
                header_checked = True
                names = [field.lower() for field in fields]
                found = next((name for name in _URI_HEADERS if name in names), None)
                if found is not None:
                    uri_column = names.index(found)
                    id_column = names.index("id") if "id" in names else -1
                    continue
            item_uri = fields[uri_column] if uri_column < len(fields) else ""
            if not item_uri:
                raise InvalidArgument(
                    f"manifest {echo_uri(uri)} line {numbers[0]}: no URI in column "
                    f"{uri_column + 1}",
                    field="manifest_uri",
                )
            item_id = fields[id_column] if 0 <= id_column < len(fields) else ""
            yield ItemInput(id=item_id, uri=item_uri)
    except csv.Error:  # its text is Python's; what can be wrong is said here
        raise InvalidArgument(
            f"manifest {echo_uri(uri)} line {numbers[0]}: not valid CSV (an unclosed quote, a "
            f"NUL byte, or a field over {csv.field_size_limit():,} characters)",
            field="manifest_uri",
        ) from None


def _jsonl_items(rows: Iterator[tuple[int, str]], uri: str) -> Iterator[ItemInput]:
    for number, line in rows:
        try:
            record = json.loads(line)
            item_uri = record["uri"]
            item_id = record.get("id", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            item_uri = None
        # An id is text (a number is taken as its digits); an object or a list is no id.
        odd_id = isinstance(item_id, bool) or not isinstance(item_id, str | int | None)
        if not isinstance(item_uri, str) or not item_uri or odd_id:
            raise InvalidArgument(
                f'manifest {echo_uri(uri)} line {number}: expected {{"uri": "...", "id": "..."}}',
                field="manifest_uri",
            )
        yield ItemInput(id="" if item_id is None else str(item_id), uri=item_uri)


# The most folders one `normalize` cache holds: past it, it starts again empty.
_FOLDERS_HELD = 10_000


def _resolve(given: Path, folders: dict[Path, Path] | None) -> Path:
    """`given.resolve()` (`os.path.realpath`); with `folders`, a file that exists and is no
    symbolic link is its folder's resolution (cached in `folders`) joined with its name,
    which is what `realpath` makes of it. Anything else is resolved whole.

    Raises:
        RuntimeError, OSError, ValueError: as `Path.resolve` (a symlink loop, a NUL byte).
    """
    if folders is None or given.name in ("", ".."):
        return given.resolve()
    try:
        if stat.S_ISLNK(os.lstat(given).st_mode):
            return given.resolve()
    except OSError:  # missing, or a path through a file: as `resolve` makes it
        return given.resolve()
    folder = folders.get(given.parent)
    if folder is None:
        if len(folders) >= _FOLDERS_HELD:
            folders.clear()
        folder = folders[given.parent] = given.parent.resolve()
    return folder / given.name


def default_item_id(uri: str) -> str:
    """An item's id when none was given: its file name (the last `/`-separated part)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]
