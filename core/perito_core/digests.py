"""The sha256 digests Perito writes down: of an image's bytes as received (provenance, the
prediction log, training's per-image hashes), of a model's files (the manifest), of a token.

Each is 64 lowercase hex digits, as `sha256sum` prints it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK_BYTES = 1 << 20


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The sha256 of `data`, 64 lowercase hex digits (as `sha256sum` prints it)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of the file at `path`, 64 lowercase hex digits, read 1 MiB at a time.

    Raises:
        OSError: the file cannot be opened or read.
    """
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
