"""Job inputs from local folders and manifests: every object listed is an item (content, not
file names, decides what is an image), odd files fail one by one with a reason instead of
blocking or vanishing, reads are bounded before they start, manifests stream, and names are
opaque strings."""

from __future__ import annotations

import functools
import io
import itertools
import os
import shutil
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perito_core.errors import InvalidArgument, InvalidImage, NotFound, PeritoError
from perito_core.imaging import decode_image_with_info
from perito_core.jobs.sources import SourceReader, default_item_id, is_ignored_key
from perito_core.storage import (
    LocalStore,
    S3Options,
    check_uri_text,
    local_path_of,
    open_store,
    split_s3_uri,
)

# Names people and phones give files, that URL syntax would mangle.
ODD_NAMES = ["claim #1234.jpg", "what?.jpg", "100% done.jpg", "a+b=c.jpg", "café 📷 [2].jpg"]


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo_bytes(fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), fmt)


def outcome(call: Callable[[], object], timeout: float = 5.0) -> str:
    """What `call` did: "ok" or the reason it was refused; fails the test if it blocks."""
    result: list[str] = []

    def run() -> None:
        try:
            call()
            result.append("ok")
        except InvalidImage as exc:
            result.append(exc.reason)
        except PeritoError as exc:
            result.append(type(exc).__name__)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"still blocked after {timeout}s"
    return result[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def test_the_ignore_rule() -> None:
    for ignored in (
        ".DS_Store",
        "2024/._IMG_0001.JPG",
        ".thumbnails/a.jpg",
        "Thumbs.db",
        "sub/THUMBS.DB",
        "desktop.ini",
        "folder/",
    ):
        assert is_ignored_key(ignored, 0), ignored
    for kept in ("IMG_0001.HEIC", "claim #1234.jpg", "notes.txt", "x.jpg", "a.b/c", "db/thumbs"):
        assert not is_ignored_key(kept, 10), kept
    assert not is_ignored_key("weird-but-not-empty/", 12)  # an object with bytes is an item


def test_a_folder_job_lists_every_file_whatever_its_name(root: Path) -> None:
    files = {
        "a.HEIC": encode(Image.new("RGB", (32, 24), (9, 9, 9)), "HEIF"),
        "b.heif": encode(Image.new("RGB", (32, 24), (9, 9, 9)), "HEIF"),
        "c.avif": encode(Image.new("RGB", (32, 24), (9, 9, 9)), "AVIF"),
        "d.jfif": photo_bytes("JPEG"),
        "e.JPG": photo_bytes("JPEG"),
        "f.png": photo_bytes("PNG"),
        "no-suffix": photo_bytes("WEBP"),
        "x.jpg": b"a text file that someone named x.jpg\n",
        "sub/g.tiff": photo_bytes("TIFF"),
        ".DS_Store": b"\0\0\0\1Bud1",
        "Thumbs.db": b"\xd0\xcf\x11\xe0",
        ".hidden/h.jpg": photo_bytes(),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    reader = SourceReader(S3Options(), [root])
    listed = list(reader.iter_prefix(str(root)))
    expected = ["a.HEIC", "b.heif", "c.avif", "d.jfif", "e.JPG", "f.png", "no-suffix"]
    expected += ["sub/g.tiff", "x.jpg"]
    assert listed == [str(root / name) for name in expected]
    formats = {}
    for uri in listed:
        try:
            formats[Path(uri).name] = decode_image_with_info(reader.read(uri))[1].format
        except InvalidImage as exc:
            formats[Path(uri).name] = exc.reason
    assert formats == {
        "a.HEIC": "HEIF",
        "b.heif": "HEIF",
        "c.avif": "AVIF",
        "d.jfif": "JPEG",
        "e.JPG": "JPEG",
        "f.png": "PNG",
        "no-suffix": "WEBP",
        "g.tiff": "TIFF",
        "x.jpg": "NOT_AN_IMAGE",
    }


def test_odd_local_entries_are_items_that_fail_alone_with_a_reason(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(photo_bytes())
    (root / "good.jpg").write_bytes(photo_bytes())
    (root / "empty.jpg").mkdir()  # a folder named like a photo
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block forever
    (root / "link.jpg").symlink_to(root / "good.jpg")
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "outside-folder").symlink_to(outside)  # never walked
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "socket.jpg"))
        (root / "sparse.jpg").touch()
        os.truncate(root / "sparse.jpg", 2 * 1024**3)  # 2 GB, no blocks on disk

        reader = SourceReader(S3Options(), [root])
        listed = [Path(uri).name for uri in reader.iter_prefix(str(root))]
        assert listed == [
            "dangling.jpg",
            "empty.jpg",
            "escape.jpg",
            "good.jpg",
            "link.jpg",
            "loop.jpg",
            "outside-folder",
            "pipe.jpg",
            "socket.jpg",
            "sparse.jpg",
        ]
        started = time.monotonic()

        def submitted_then_read(name: str) -> bytes:
            # As a job does: the server records the canonical path, the worker reads it.
            return reader.read(reader.normalize(str(root / name)), max_bytes=32 << 20)

        outcomes = {name: outcome(functools.partial(submitted_then_read, name)) for name in listed}
        assert time.monotonic() - started < 5  # nothing read 2 GB, nothing blocked
    assert outcomes == {
        "dangling.jpg": "NotFound",
        "empty.jpg": "NOT_A_REGULAR_FILE",
        "escape.jpg": "InvalidArgument",  # resolves outside the allowed root
        "good.jpg": "ok",
        "link.jpg": "ok",  # a symlink within the root is read through
        "loop.jpg": "InvalidArgument",
        "outside-folder": "InvalidArgument",
        "pipe.jpg": "NOT_A_REGULAR_FILE",
        "socket.jpg": "NOT_A_REGULAR_FILE",
        "sparse.jpg": "TOO_LARGE",
    }


@pytest.mark.parametrize("swapped", ["acme", "acme/claims", "acme/claims/photo.jpg"])
def test_an_item_is_read_as_recorded_never_through_a_link_swapped_in_since(
    root: Path, swapped: str
) -> None:
    """Between a job's submission (its items' canonical paths checked against the tenant's
    prefixes) and a worker's read, a link put in place of part of a path is refused, even
    one leading to another tenant's folder under the same root; the refusal names the path
    as recorded, not where the link leads."""
    (root / "acme" / "claims").mkdir(parents=True)
    (root / "acme" / "claims" / "photo.jpg").write_bytes(b"mine")
    (root / "globex" / "claims").mkdir(parents=True)
    (root / "globex" / "claims" / "photo.jpg").write_bytes(b"theirs")
    reader = SourceReader(S3Options(), [root])
    recorded = reader.normalize(str(root / "acme" / "claims" / "photo.jpg"))
    assert reader.read(recorded) == b"mine"
    target = root / swapped
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(root / "globex" / Path(swapped).relative_to("acme"))
    assert Path(recorded).read_bytes() == b"theirs"  # the swap worked
    with pytest.raises(InvalidArgument, match="a symbolic link took the place") as refused:
        reader.read(recorded)
    assert refused.value.message.startswith(recorded) and "globex" not in refused.value.message


def test_refusals_name_the_file_and_the_limit(root: Path) -> None:
    (root / "big.jpg").write_bytes(b"x" * 1000)
    store = LocalStore(root)
    assert store.read_bytes("big.jpg", max_bytes=1000) == b"x" * 1000
    with pytest.raises(InvalidImage) as caught:
        store.read_bytes("big.jpg", max_bytes=999)
    assert caught.value.reason == "TOO_LARGE"
    assert str(root / "big.jpg") in caught.value.message and "999" in caught.value.message
    (root / "folder").mkdir()
    with pytest.raises(InvalidImage) as caught:
        store.read_bytes("folder")
    assert caught.value.reason == "NOT_A_REGULAR_FILE" and "a directory" in caught.value.message
    with pytest.raises(NotFound):
        store.read_bytes("missing.jpg")


def test_listing_is_in_key_order_as_s3_lists_it(root: Path) -> None:
    names = ["a-b.jpg", "a/x.jpg", "a b.jpg", "A.jpg", "a.jpg", "a/b/c.jpg", "a0.jpg", "é.jpg"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    listed = list(SourceReader(S3Options(), [root]).iter_prefix(str(root)))
    assert [Path(uri).relative_to(root).as_posix() for uri in listed] == sorted(names)


def test_a_prefix_may_be_one_file_or_a_sub_folder(root: Path) -> None:
    (root / "2024" / "march").mkdir(parents=True)
    (root / "2024" / "march" / "a.jpg").write_bytes(b"x")
    (root / "2024-old.jpg").write_bytes(b"x")
    reader = SourceReader(S3Options(), [root])
    assert list(reader.iter_prefix(str(root / "2024"))) == [str(root / "2024/march/a.jpg")]
    assert list(reader.iter_prefix(str(root / "2024-old.jpg"))) == [str(root / "2024-old.jpg")]
    assert list(reader.iter_prefix(str(root / "nothing-here"))) == []
    with pytest.raises(InvalidArgument):
        list(reader.iter_prefix(str(root.parent)))


def test_local_names_are_opaque(root: Path) -> None:
    for index, name in enumerate(ODD_NAMES):
        (root / name).write_bytes(bytes([index]) * 10)
    reader = SourceReader(S3Options(), [root])
    listed = list(reader.iter_prefix(str(root)))
    assert sorted(Path(uri).name for uri in listed) == sorted(ODD_NAMES)
    for index, name in enumerate(ODD_NAMES):
        path = str(root / name)
        assert path in listed
        assert reader.read(path) == bytes([index]) * 10
        assert reader.read(f"file://{path}") == bytes([index]) * 10  # taken literally
        assert reader.normalize(f"file://{path}") == path
        assert default_item_id(path) == name


def test_uris_are_split_literally() -> None:
    assert split_s3_uri("s3://claims/2026/claim #1234.jpg") == ("claims", "2026/claim #1234.jpg")
    assert split_s3_uri("s3://claims/what?x=1&y=%20.jpg") == ("claims", "what?x=1&y=%20.jpg")
    assert split_s3_uri("s3://claims") == ("claims", "")
    assert split_s3_uri("s3://claims//double") == ("claims", "/double")
    with pytest.raises(InvalidArgument):
        split_s3_uri("s3:///no-bucket.jpg")
    assert local_path_of("file:///data/a #1?.jpg") == Path("/data/a #1?.jpg")
    assert local_path_of("file://localhost/data/%41.jpg") == Path("/data/%41.jpg")
    assert local_path_of("relative/a #1.jpg") == Path("relative/a #1.jpg")
    with pytest.raises(InvalidArgument):
        local_path_of("file://fileserver/share/a.jpg")
    store = open_store("s3://results/job #7/", S3Options(endpoint_url="http://127.0.0.1:9"))
    assert store.description.startswith("s3://results/job #7")
    with pytest.raises(InvalidArgument):
        open_store("https://example.invalid/x")
    reader = SourceReader(S3Options(), [])
    with pytest.raises(InvalidArgument):
        reader.normalize("ftp://host/a.jpg")
    assert reader.normalize("s3://claims/a #1.jpg") == "s3://claims/a #1.jpg"


def test_another_scheme_and_a_relative_path_are_refused_alike_everywhere(root: Path) -> None:
    """The job's text check, the reader and the store opener tell another scheme from a path
    that holds `://` the same way, and refuse a relative path in the same words."""
    reader = SourceReader(S3Options(), [root])
    check_uri_text("gs://claims/a.jpg", "uris[0]")  # the reader refuses it, naming the scheme
    for refuse in (reader.normalize, open_store):
        with pytest.raises(InvalidArgument, match=r"^unsupported .*'gs://claims/a\.jpg'"):
            refuse("gs://claims/a.jpg")
    colon = root / "a+b:" / "x.jpg"
    colon.parent.mkdir()
    colon.write_bytes(b"x")
    weird = f"{root}/a+b://x.jpg"  # not letters and digits before '://': a path
    assert reader.normalize(weird) == str(colon)
    with pytest.raises(InvalidArgument, match=r"^uris\[0\]: 'claims/a\.jpg' is a relative path"):
        check_uri_text("claims/a.jpg", "uris[0]")
    with pytest.raises(InvalidArgument, match=r"^'claims/a\.jpg' is a relative path") as refused:
        reader.normalize("claims/a.jpg")
    assert refused.value.field == "input"


# --- manifests


def write(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


def items(reader: SourceReader, uri: str, max_bytes: int = 1 << 20) -> list[tuple[str, str]]:
    return [(item.uri, item.id) for item in reader.iter_manifest(uri, max_bytes)]


def test_csv_manifests(root: Path) -> None:
    reader = SourceReader(S3Options(), [root])
    plain = write(root / "plain.csv", "s3://b/claim #1.jpg,first\n\ns3://b/a+b.jpg\n")
    assert items(reader, plain) == [("s3://b/claim #1.jpg", "first"), ("s3://b/a+b.jpg", "")]
    header = write(
        root / "header.csv",
        '\ufeffid,URI\r\nx,"s3://b/a, b.jpg"\r\ny, s3://b/100% done.jpg \r\n',
    )
    assert items(reader, header) == [("s3://b/a, b.jpg", "x"), ("s3://b/100% done.jpg", "y")]
    missing_uri = write(root / "missing.csv", "uri,id\ns3://b/a.jpg,1\n,2\n")
    with pytest.raises(InvalidArgument) as caught:
        items(reader, missing_uri)
    assert caught.value.field == "manifest_uri" and "line 3" in caught.value.message
    assert items(reader, write(root / "empty.csv", "\n\n")) == []
    # A quote never closed swallowed the rest of the file into one id.
    unclosed = write(root / "unclosed.csv", 'uri,id\ns3://b/a.jpg,"first\ns3://b/b.jpg,2\n')
    with pytest.raises(InvalidArgument) as caught:
        items(reader, unclosed)
    assert caught.value.field == "manifest_uri" and "unclosed quote" in caught.value.message


def test_jsonl_manifests(root: Path) -> None:
    reader = SourceReader(S3Options(), [root])
    lines = '{"uri": "s3://b/claim #1.jpg", "id": 7}\n\n{"uri": " s3://b/ spaced.jpg"}\n'
    for name in ("m.jsonl", "m.ndjson", "m.txt"):  # by name, or by content
        assert items(reader, write(root / name, lines)) == [
            ("s3://b/claim #1.jpg", "7"),
            (" s3://b/ spaced.jpg", ""),  # JSON keeps a URI exactly
        ]
    broken = write(root / "broken.jsonl", '{"uri": "s3://b/a.jpg"}\n{"url": "s3://b/b.jpg"}\n')
    with pytest.raises(InvalidArgument) as caught:
        items(reader, broken)
    assert caught.value.field == "manifest_uri" and "line 2" in caught.value.message


def test_bad_manifests_are_refused_naming_the_field(root: Path) -> None:
    reader = SourceReader(S3Options(), [root])
    big = write(root / "big.csv", "s3://b/a.jpg\n" * 100)
    with pytest.raises(InvalidArgument) as caught:
        items(reader, big, max_bytes=1000)
    assert (caught.value.field, caught.value.reason) == ("manifest_uri", "TOO_LARGE")
    latin1 = write(root / "latin1.csv", "s3://b/caf\u00e9.jpg\n", encoding="latin-1")
    with pytest.raises(InvalidArgument) as caught:
        items(reader, latin1)
    assert caught.value.field == "manifest_uri" and "UTF-8" in caught.value.message
    with pytest.raises(NotFound) as not_found:
        items(reader, str(root / "nope.csv"))
    assert not_found.value.field == "manifest_uri"
    (root / "folder.csv").mkdir()
    with pytest.raises(InvalidArgument) as caught:
        items(reader, str(root / "folder.csv"))
    assert caught.value.field == "manifest_uri"


def test_a_manifest_streams_and_a_caller_may_stop_early(root: Path) -> None:
    reader = SourceReader(S3Options(), [root])
    lines = (f"s3://bucket/photos/{i:07d}.jpg,id-{i}\n" for i in range(120_000))
    manifest = root / "big.csv"
    with manifest.open("w") as out:
        out.writelines(lines)
        out.write('this line,is,"broken\n')  # never reached by a caller that stops early
    size = manifest.stat().st_size
    assert size > 4_000_000
    stream: Iterator[object] = reader.iter_manifest(str(manifest), max_bytes=size)
    first = [next(stream) for _ in range(1001)]  # a caller enforcing a cap of 1,000
    assert len(first) == 1001
    del stream
    tracemalloc.start()
    try:
        rows = itertools.islice(reader.iter_manifest(str(manifest), size), 120_000)
        count = sum(1 for _ in rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 120_000
    # The 1 MiB read buffer and a line at a time; reading the file whole would hold its
    # ~5 MB of bytes plus the decoded text plus every parsed row.
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB manifest"


def test_normalizing_with_resolved_folders_is_resolving_each_path_whole(
    root: Path, tmp_path: Path
) -> None:
    (root / "real").mkdir()
    (root / "real" / "a.jpg").write_bytes(b"x")
    (root / "real" / "b.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(root / "real")  # a folder link within the root
    (root / "real" / "to-b.jpg").symlink_to(root / "real" / "b.jpg")  # a file link
    (tmp_path / "outside.jpg").write_bytes(b"x")
    (root / "real" / "out.jpg").symlink_to(tmp_path / "outside.jpg")  # a file link out
    reader = SourceReader(S3Options(), [root])
    folders: dict[Path, Path] = {}
    for name in ("linked/a.jpg", "linked/b.jpg", "linked/to-b.jpg", "linked/missing.jpg"):
        given = str(root / name)
        assert reader.normalize(given, folders) == reader.normalize(given)
        assert reader.normalize(given) == str((root / name).resolve())
    assert folders == {root / "linked": root.resolve() / "real"}
    for cache in (folders, None):  # a link out of the roots is refused either way
        with pytest.raises(InvalidArgument, match="leads out of the allowed local roots"):
            reader.normalize(str(root / "linked" / "out.jpg"), cache)
    assert reader.normalize("s3://photos/a.jpg", folders) == "s3://photos/a.jpg"


def test_an_empty_folder_lists_nothing_and_an_empty_sub_folder_is_an_item(root: Path) -> None:
    """An empty folder given as a job's prefix made a job of one failed item, the folder
    itself; now it lists nothing (the server refuses it: no images under it), as an empty S3
    prefix does, while an empty folder inside it still fails as an item."""
    reader = SourceReader(S3Options(), [root])
    (root / "empty").mkdir()
    assert list(reader.iter_prefix(str(root / "empty"))) == []
    (root / "site" / "nothing-here").mkdir(parents=True)
    assert list(reader.iter_prefix(str(root / "site"))) == [str(root / "site" / "nothing-here")]
