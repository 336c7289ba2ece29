"""A local store reads only what it checked: a symbolic link swapped into a file's path after
the path was resolved and checked against the root is refused, never followed out of it (the
time-of-check to time-of-use gap between a job's submission and a worker's read)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from perito_core.errors import InvalidArgument, NotFound
from perito_core.storage import LocalStore


@pytest.fixture
def layout(tmp_path: Path) -> tuple[LocalStore, Path]:
    root = tmp_path / "root"
    (root / "claims" / "a").mkdir(parents=True)
    (root / "claims" / "a" / "photo.jpg").write_bytes(b"mine")
    other = tmp_path / "other-tenant"
    (other / "a").mkdir(parents=True)
    (other / "a" / "photo.jpg").write_bytes(b"theirs")
    return LocalStore(root), other


def test_a_file_reads_through_links_that_stay_inside_the_root(
    layout: tuple[LocalStore, Path],
) -> None:
    store, _ = layout
    (store.root / "alias").symlink_to(store.root / "claims")
    assert store.read_bytes("claims/a/photo.jpg") == b"mine"
    assert store.read_bytes("alias/a/photo.jpg") == b"mine"  # resolved, then read link-free


@pytest.mark.parametrize("swapped", ["claims", "claims/a", "claims/a/photo.jpg"])
def test_a_link_swapped_in_after_the_check_is_refused(
    layout: tuple[LocalStore, Path], monkeypatch: pytest.MonkeyPatch, swapped: str
) -> None:
    store, other = layout
    checked = store._path("claims/a/photo.jpg")  # what the check saw, inside the root
    monkeypatch.setattr(store, "_path", lambda key: checked)
    target = store.root / swapped
    outside = other / Path(swapped).relative_to("claims") if swapped != "claims" else other
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(outside)
    assert (store.root / "claims/a/photo.jpg").read_bytes() == b"theirs"  # the swap worked
    with pytest.raises((InvalidArgument, NotFound)) as refused:
        store.read_bytes("claims/a/photo.jpg")
    assert "theirs" not in str(refused.value)


def test_a_write_that_fails_leaves_neither_half_a_file_nor_its_temporary(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("models/m/1/manifest.json", b"{}")

    class Unreadable:
        def read(self, size: int = -1) -> bytes:
            raise OSError("the disk went away")

    source = tmp_path / "model.pt"
    source.write_bytes(b"weights")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", lambda *_args, **_kwargs: contextlib.nullcontext(Unreadable()))
        with pytest.raises(OSError, match="disk went away"):
            store.upload_file("models/m/1/manifest.json", source)
    assert sorted(p.name for p in (tmp_path / "models/m/1").iterdir()) == ["manifest.json"]
    assert (tmp_path / "models/m/1/manifest.json").read_bytes() == b"{}"


def test_a_name_longer_than_the_file_system_allows_is_not_found(
    layout: tuple[LocalStore, Path],
) -> None:
    store, _ = layout
    with pytest.raises(NotFound, match="longer than the file system allows"):
        store.read_bytes("claims/a/" + "x" * 300 + ".jpg")
