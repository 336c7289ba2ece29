"""Object storage behind one small interface: a local folder or S3 (any endpoint).

The registry and the bulk-job inputs and outputs are written once against `ObjectStore`;
`LocalStore` is the embedded single-machine default, `S3Store` speaks the S3 protocol through
boto3 to AWS, MinIO or any compatible server.

Reads are bounded: `read_bytes` and `open_read` take `max_bytes`, checked against the object's
size before anything is read (`stat` locally, `ContentLength` on S3) and enforced again while
reading, and a local read opens only regular files (a FIFO would block the reader forever).

Keys are opaque strings: `split_s3_uri` and `local_path_of` take URIs apart literally, so `#`,
`?`, `%`, `+` and spaces in a key are just characters (no URL syntax, no percent-decoding).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from perito_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidImage,
    NotFound,
    PeritoError,
    StorageUnavailable,
    echo,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_READ_CHUNK = 1 << 20
_CLIENT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ListedObject:
    """One entry of a listing.

    Attributes:
        key: the key, relative to the store's root (local: a `/`-separated path).
        size: its size in bytes (local: of the entry itself, a symlink not followed).
    """

    key: str
    size: int


class ObjectStore(Protocol):
    """Keys are `/`-separated paths relative to the store's root."""

    description: str

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes: ...
    def open_read(
        self, key: str, max_bytes: int | None = None
    ) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str) -> Iterator[str]: ...
    def iter_objects(self, prefix: str) -> Iterator[ListedObject]: ...
    def list_children(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` as (bucket, key), the key taken literally.

    Everything after the first `/` following the bucket is the key, byte for byte: `#`, `?`,
    `%`, `+`, spaces and non-ASCII are part of it (no URL fragment or query, no
    percent-decoding), because S3 keys are opaque and people name photos `claim #1234.jpg`.

    Raises:
        InvalidArgument: not an `s3://` URI, or no bucket.
    """
    if uri[:5].lower() != "s3://":
        raise InvalidArgument(f"{echo_uri(uri)} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidArgument(f"{echo_uri(uri)} has no bucket; expected s3://bucket/key")
    return bucket, key


def local_path_of(uri: str) -> Path:
    """The local path named by `uri`: a plain path, or `file://` followed by an absolute path.

    Taken literally, like S3 keys: `#`, `?`, `%` and spaces are part of the file name (a
    `file://` URI is not percent-decoded). `file://localhost/path` is accepted.

    Raises:
        InvalidArgument: a `file://` URI naming another host.
    """
    if uri[:7].lower() != "file://":
        return Path(uri)
    rest = uri[7:]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise InvalidArgument(f"{echo_uri(uri)}: a file:// URI must name an absolute local path")
    return Path(rest)


MAX_URI_BYTES = 4096
"""The longest location a caller may name (UTF-8 bytes): Linux's PATH_MAX."""
MAX_S3_KEY_BYTES = 1024
"""The longest S3 key (UTF-8 bytes), as S3 itself allows."""
URI_ECHO_CHARS = 200
"""The characters of a location quoted back in a refusal (`echo_uri`)."""


def echo_uri(uri: str) -> str:
    """`uri` quoted back to the caller who gave it: `repr` of its first `URI_ECHO_CHARS`
    characters, with '…' when cut (`perito_core.errors.echo`)."""
    return repr(echo(uri, URI_ECHO_CHARS))


def is_other_scheme(uri: str) -> bool:
    """Whether `uri` names a scheme other than `s3://` and `file://` (`https://host/x`,
    `gs://bucket/x`): letters and digits before its first `://`. No store here reads one."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.isalnum() and scheme.lower() not in ("s3", "file")


def absolute_local_path(uri: str, field: str | None = None) -> Path:
    """The local path that a plain path or `file://` URI names (`local_path_of`), refused
    unless absolute: a relative one would be read relative to the working directory.

    Raises:
        InvalidArgument: a relative path (naming `field`), or a `file://` URI naming another
            host or no path.
    """
    path = local_path_of(uri)
    if not path.is_absolute():
        raise InvalidArgument(
            f"{echo_uri(uri)} is a relative path; a local path must be absolute", field=field
        )
    return path


def check_uri_text(uri: str, field: str, *, names_object: bool = False) -> None:
    """Refuse a location a caller named (a job's input or output) that is malformed as
    text, before anything is resolved or created: nothing here looks at a disk or a bucket.

    `.` and `..` segments are refused in local paths and S3 keys alike, never resolved: on
    S3 they are literal characters of a key, on a local disk a step up (after a symbolic
    link, a step up from where the link leads), so the same text would name different
    things on the two backends, and the path checked would not be the path read.

    Args:
        uri: the location as the caller sent it.
        field: the request field it came from, named in a refusal.
        names_object: the location must name one object (an image, a manifest), not a
            folder: an S3 URI without a key (`s3://bucket`, `s3://bucket/`) is refused.

    Raises:
        InvalidArgument: naming `field`: empty or only whitespace, not UTF-8 (a lone
            surrogate), longer than `MAX_URI_BYTES`, a NUL byte, an S3 URI without a bucket
            (or with whitespace in it), an S3 key longer than `MAX_S3_KEY_BYTES` or
            starting with `/`, a `.` or `..` segment, a `file://` URI naming another host
            or no path, or a local path that is not absolute (it would be read relative to
            the server's working directory).
    """
    if not uri.strip():
        raise InvalidArgument(
            f"{field}: empty; name an s3://bucket/key URI or an absolute local path",
            field=field,
        )
    try:
        size = len(uri.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field}: not valid UTF-8 text", field=field) from None
    if size > MAX_URI_BYTES:
        raise InvalidArgument(
            f"{field}: {size:,} bytes long; a location is at most {MAX_URI_BYTES:,} bytes",
            field=field,
        )
    if "\0" in uri:
        raise InvalidArgument(f"{field}: a location may not hold a NUL byte", field=field)
    if uri[:5].lower() == "s3://":
        _check_s3_text(uri, field, names_object)
        return
    if is_other_scheme(uri):
        return  # refused by whoever reads it, naming the scheme
    try:
        absolute_local_path(uri)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}: {exc.message}", field=field) from None
    # The text, not the path: pathlib drops `.` segments and keeps `..` ones.
    _, sep, rest = uri.partition("://")
    if has_dot_segments(rest if sep else uri):
        raise InvalidArgument(
            f"{field}: {echo_uri(uri)} holds a '.' or '..' segment; name the path without them",
            field=field,
        )


def _check_s3_text(uri: str, field: str, names_object: bool) -> None:
    """`check_uri_text` for an `s3://` URI."""
    bucket, _, key = uri[5:].partition("/")
    if not bucket or any(char.isspace() for char in bucket):
        raise InvalidArgument(
            f"{field}: {echo_uri(uri)} names no bucket; expected s3://bucket/key", field=field
        )
    if len(key.encode()) > MAX_S3_KEY_BYTES:
        raise InvalidArgument(
            f"{field}: an S3 key is at most {MAX_S3_KEY_BYTES:,} bytes", field=field
        )
    if key.startswith("/"):
        raise InvalidArgument(
            f"{field}: {echo_uri(uri)}: a key starting with '/' (two after the bucket) is "
            "not accepted",
            field=field,
        )
    if has_dot_segments(key):
        raise InvalidArgument(
            f"{field}: {echo_uri(uri)}: '.' and '..' segments are not accepted in a key (S3 "
            "would read them as characters, a local folder as a step up)",
            field=field,
        )
    if names_object and (not key or key.endswith("/")):
        raise InvalidArgument(
            f"{field}: {echo_uri(uri)} names no object; expected s3://bucket/key", field=field
        )


def has_dot_segments(path: str) -> bool:
    """Whether a `/`-separated path or key holds a `.` or `..` segment."""
    return any(part in (".", "..") for part in path.split("/"))


def _too_large(key: str, size: int | str, max_bytes: int) -> InvalidImage:
    return InvalidImage(
        f"{key} is {size if isinstance(size, str) else f'{size:,} bytes'}; "
        f"the limit is {max_bytes:,} bytes",
        reason="TOO_LARGE",
    )


def _unreadable(path: Path, error: OSError) -> PeritoError | OSError:
    """What a caller is told of a file the system would not let this process read: a name
    longer than the file system allows is NOT_FOUND (no such file can exist), no permission
    FAILED_PRECONDITION (the worker's account may not read it); any other OSError as it is."""
    if error.errno == errno.ENAMETOOLONG:
        return NotFound(
            f"{path} not found: a name in its path is longer than the file system allows "
            "(255 bytes a name)"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return FailedPrecondition(
            f"{path} cannot be read: the worker's account has no permission to read it",
            reason="PERMISSION_DENIED_ON_FILE",
        )
    return error


def _open_beneath(root: Path, relative: Path) -> int:
    """Open `root / relative` for reading without following a symbolic link anywhere below
    `root`: each folder is opened relative to its parent with O_NOFOLLOW, as `openat2`'s
    RESOLVE_NO_SYMLINKS would (Python has no binding for it). The path was resolved and
    checked against the root just before; a link swapped into it since is refused, not
    followed out of the root.

    Raises:
        OSError: ELOOP where a link stands in the path; FileNotFoundError, NotADirectoryError.
    """
    parts = relative.parts
    if not parts:
        raise IsADirectoryError(f"{root} is a folder")
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder
            )
            os.close(folder)
            folder = inner
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(parts[-1], flags, dir_fd=folder)
    finally:
        os.close(folder)


class _CappedReader(io.RawIOBase):
    """A raw binary stream over `read(n)` that refuses to go past `max_bytes`."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        max_bytes: int | None,
        too_large: Callable[[], Exception],
    ) -> None:
        super().__init__()
        self._read = read
        self._max_bytes = max_bytes
        self._too_large = too_large
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if self._max_bytes is not None:
            want = min(want, self._max_bytes - self._count + 1)
        data = self._read(want)
        self._count += len(data)
        if self._max_bytes is not None and self._count > self._max_bytes:
            raise self._too_large()
        view[: len(data)] = data
        return len(data)


class LocalStore:
    """A folder on local disk. Writes are atomic (temp file + rename).

    Args:
        root: the folder (resolved).
        follow_links: False: a key is read as written, no symbolic link below the root
            followed, not even one that stays inside it (a job's item, whose canonical path
            was checked against its tenant's prefixes at submission: a link swapped into it
            since is refused, wherever it leads).
    """

    def __init__(self, root: Path, *, follow_links: bool = True) -> None:
        self.root = root.resolve()
        self.description = str(self.root)
        self.follow_links = follow_links

    def _path(self, key: str) -> Path:
        if not self.follow_links:
            if Path(key).is_absolute() or ".." in Path(key).parts:
                raise InvalidArgument(f"key {key!r} escapes the store root")
            return self.root / key
        try:
            path = (self.root / key).resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop
            raise InvalidArgument(f"key {key!r} cannot be resolved: {exc}") from None
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"key {key!r} escapes the store root")
        return path

    def _open_regular(self, key: str, max_bytes: int | None) -> tuple[int, Path]:
        """Open `key` for reading if it is a regular file within the size bound: (fd, path).

        The type is checked with `stat` before the file is opened (opening a FIFO for reading
        blocks until a writer comes) and again with `fstat` on what was opened, so a file
        swapped in between is caught too.
        """
        path = self._path(key)
        swapped = InvalidArgument(
            f"{self.root / key}: a symbolic link took the place of part of its path after it "
            "was checked; it is not followed"
        )
        try:
            mode = (os.stat if self.follow_links else os.lstat)(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self.root / key} not found") from None
        except OSError as error:
            raise _unreadable(self.root / key, error) from None
        if stat.S_ISLNK(mode):
            raise swapped
        if not stat.S_ISREG(mode):
            raise _not_regular(str(path), mode)
        try:
            fd = _open_beneath(self.root, path.relative_to(self.root))
        except FileNotFoundError:
            raise NotFound(f"{self.root / key} not found") from None
        except OSError as error:
            # A folder of a path just found whole that will not open as a folder without
            # following links (ENOTDIR from O_DIRECTORY | O_NOFOLLOW, ELOOP): a link.
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise _unreadable(self.root / key, error) from None
            raise swapped from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(str(path), info.st_mode)
            if max_bytes is not None and info.st_size > max_bytes:
                raise _too_large(str(path), info.st_size, max_bytes)
        except BaseException:
            os.close(fd)
            raise
        return fd, path

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole of `key`.

        Args:
            key: the file, relative to the root.
            max_bytes: refuse a file larger than this, before reading it.

        Raises:
            NotFound: no such file.
            InvalidImage: reason NOT_A_REGULAR_FILE (a directory, FIFO, socket or device) or
                TOO_LARGE.
            InvalidArgument: the key resolves outside the root (a symlink pointing out).
        """
        fd, path = self._open_regular(key, max_bytes)
        with open(fd, "rb", closefd=True) as file:
            data = file.read() if max_bytes is None else file.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew since it was checked
            raise _too_large(str(path), f"over {max_bytes:,} bytes", max_bytes)
        return data

    @contextlib.contextmanager
    def open_read(self, key: str, max_bytes: int | None = None) -> Iterator[IO[bytes]]:
        """`key` as a binary stream, for reading it piece by piece (a manifest).

        Raises:
            The errors of `read_bytes`, on opening; TOO_LARGE also while reading, if the file
            grows past `max_bytes`.
        """
        fd, path = self._open_regular(key, max_bytes)
        with open(fd, "rb", buffering=0, closefd=True) as raw:
            capped = _CappedReader(
                raw.read,
                max_bytes,
                lambda: _too_large(str(path), f"over {max_bytes:,} bytes", max_bytes or 0),
            )
            yield io.BufferedReader(capped, _READ_CHUNK)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda file: file.write(data))

    def upload_file(self, key: str, path: Path) -> None:
        with path.open("rb") as source:
            self._write(key, lambda file: shutil.copyfileobj(source, file))

    def _write(self, key: str, write: Callable[[IO[bytes]], object]) -> None:
        """Write `key` whole or not at all: into a temporary file beside it, renamed over it
        when written (a reader never sees half a file), removed if writing fails."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=".tmp-") as tmp:
            try:
                write(tmp)
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, target)

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"{self.root / key} not found")
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

    def iter_objects(self, prefix: str) -> Iterator[ListedObject]:
        """Every entry under the folder `prefix` (or that one file), in key order.

        Nothing is filtered: regular files, symlinks (never followed, wherever they point),
        FIFOs, sockets and devices are all entries, to be accepted or refused when read. Real
        folders are walked; an empty or unreadable folder is an entry itself (it fails when
        read), so nothing under the prefix goes unaccounted for. The order is that of the
        keys as strings (S3's listing order), walked folder by folder: only one folder's
        names are held at a time. An empty prefix folder lists nothing, as an empty S3 prefix
        does.

        Raises:
            InvalidArgument: the prefix resolves outside the root.
        """
        base = self._path(prefix) if prefix else self.root
        try:
            base_stat = base.stat()
        except (FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISDIR(base_stat.st_mode):
            yield ListedObject(base.relative_to(self.root).as_posix(), base_stat.st_size)
            return
        yield from self._walk(base, top=True)

    def _walk(self, folder: Path, top: bool = False) -> Iterator[ListedObject]:
        """`folder`'s entries, its sub-folders walked; an empty sub-folder is an entry, the
        empty `top` folder (the prefix itself) lists nothing."""
        try:
            with os.scandir(folder) as scan:
                entries = [(e.name, e.is_dir(follow_symlinks=False), e) for e in scan]
        except OSError:
            yield ListedObject(folder.relative_to(self.root).as_posix(), 0)
            return
        if not entries:
            if not top:
                yield ListedObject(folder.relative_to(self.root).as_posix(), 0)
            return
        # Sorting a folder's names with "/" after each sub-folder's gives the order of the
        # full keys as strings, the order S3 lists them in.
        entries.sort(key=lambda entry: entry[0] + "/" if entry[1] else entry[0])
        for name, is_dir, entry in entries:
            path = folder / name
            if is_dir:
                yield from self._walk(path)
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                size = 0
            yield ListedObject(path.relative_to(self.root).as_posix(), size)

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
    """A boto3 S3 client for `options` (path-style addressing, bounded timeouts and retries);
    safe to call from several threads at once."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        # Path-style works with every S3-compatible server (MinIO, moto, Ceph ...).
        s3={"addressing_style": "path"},
    )
    # boto3's default session is not safe to build clients from several threads at once (the
    # client itself is); decode pools and worker threads may each open a bucket.
    with _CLIENT_LOCK:
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

    def _get(self, key: str, max_bytes: int | None) -> Any:
        """`get_object` with the size checked against `max_bytes` before the body is read;
        a refused body is closed unread."""
        response = self._call(key, self.client.get_object, Key=self._key(key))
        size = response.get("ContentLength")
        if max_bytes is not None and size is not None and size > max_bytes:
            response["Body"].close()
            raise _too_large(self._uri(key), size, max_bytes)
        return response

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _read_body(self, key: str, body: Any, amount: int | None) -> bytes:
        """Up to `amount` bytes of a response body (None: all of it); a connection that
        breaks mid-body is StorageUnavailable, like one that never opened."""
        from botocore.exceptions import BotoCoreError

        try:
            data: bytes = body.read(amount)
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(
                f"reading {self._uri(key)} from {self.description} failed: {exc}"
            ) from None
        return data

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole object `key`.

        Args:
            key: the object, relative to the store's prefix.
            max_bytes: refuse an object larger than this: checked against its ContentLength
                before the body is read, and the body read no further than one byte past it.

        Raises:
            NotFound: no such object.
            InvalidImage: reason TOO_LARGE.
            StorageUnavailable: the server cannot be reached or refused the read.
        """
        body = self._get(key, max_bytes)["Body"]
        try:
            if max_bytes is None:
                return self._read_body(key, body, None)
            data = self._read_body(key, body, max_bytes + 1)
            # On to the end of the body, where botocore checks it against ContentLength.
            while len(data) <= max_bytes:
                more = self._read_body(key, body, max_bytes + 1 - len(data))
                if not more:
                    break
                data += more
            if len(data) > max_bytes:
                raise _too_large(self._uri(key), f"over {max_bytes:,} bytes", max_bytes)
            return data
        finally:
            body.close()

    @contextlib.contextmanager
    def open_read(self, key: str, max_bytes: int | None = None) -> Iterator[IO[bytes]]:
        """The object `key` as a binary stream, read from the network as it is consumed.

        Raises:
            The errors of `read_bytes`: TOO_LARGE before reading when the ContentLength says
            so, or while reading past `max_bytes`; StorageUnavailable on a broken connection.
        """
        body = self._get(key, max_bytes)["Body"]
        try:
            capped = _CappedReader(
                lambda amount: self._read_body(key, body, amount),
                max_bytes,
                lambda: _too_large(self._uri(key), f"over {max_bytes:,} bytes", max_bytes or 0),
            )
            yield io.BufferedReader(capped, _READ_CHUNK)
        finally:
            body.close()

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
        return (listed.key for listed in self.iter_objects(prefix))

    def iter_objects(self, prefix: str) -> Iterator[ListedObject]:
        """Every object whose key starts with `prefix`, in S3's order (by key, as UTF-8
        bytes), a page of up to 1,000 at a time; keys relative to the store's prefix."""
        full = self._key(prefix)
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(prefix, self.client.list_objects_v2, Prefix=full, **extra)
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
                yield ListedObject(key, int(item.get("Size", 0)))
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
    """Open `s3://bucket/prefix`, `file:///path` or a plain path (see `split_s3_uri` and
    `local_path_of` for how URIs are read: literally).

    Raises:
        InvalidArgument: an S3 URI without a bucket, or another scheme.
    """
    if uri[:5].lower() == "s3://":
        bucket, prefix = split_s3_uri(uri)
        return S3Store(bucket, prefix, s3 or S3Options())
    if is_other_scheme(uri):
        raise InvalidArgument(
            f"unsupported storage URI {uri!r}; use s3://..., file://... or a path"
        )
    return LocalStore(local_path_of(uri))


def _not_regular(key: str, mode: int) -> InvalidImage:
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return InvalidImage(f"{key} is {kind}, not a regular file", reason="NOT_A_REGULAR_FILE")
