"""One tenant's large images do not hold another tenant's small ones behind them.

The server's decode threads served every request's images in order of arrival: two requests
of large PNGs made another tenant's small JPEG, sent just after, wait for every one of them.
They are now served in turns by tenant (`perito_server.turns`). Real server, real gRPC calls
from the SDK, two threads of decode.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import perito
from tests.conftest import two_tenants_serving
from tests.helpers import ServerThread, red_jpeg

pytestmark = pytest.mark.integration


def _large_png() -> bytes:
    """A 4000x3000 PNG (12 megapixels, ~0.1 s to decode and measure on one thread here)."""
    y, x = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([x * 255 // 4000, y * 255 // 3000, (x + y) % 256], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


@pytest.fixture
def server(tmp_path: Path, tiny_model_file: Path) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    with two_tenants_serving(tmp_path, tiny_model_file, decode_threads=2) as served:
        yield served


def test_a_small_photo_is_not_held_behind_another_tenants_large_ones(
    server: tuple[ServerThread, dict[str, str]],
) -> None:
    running, tokens = server
    large = _large_png()
    finished: dict[str, float] = {}

    def globex(call: int) -> None:
        with perito.Client(running.target, token=tokens["globex"], timeout=120) as client:
            answers = client.classify([large] * 16, model="tiny")
        assert len(answers) == 16
        finished[f"globex-{call}"] = time.monotonic()

    calls = [threading.Thread(target=globex, args=(call,)) for call in range(2)]
    with perito.Client(running.target, token=tokens["acme"], timeout=120) as acme:
        acme.classify([red_jpeg()], model="tiny")  # the channel open, the model warm
        for thread in calls:
            thread.start()
        time.sleep(0.5)  # globex's 32 images are in, a few decoded
        assert acme.classify([red_jpeg()], model="tiny")[0].predictions
        answered = time.monotonic()
    for thread in calls:
        thread.join(120)
    # Answered between two of globex's images, before either of globex's calls: in order of
    # arrival it would have waited for all 32.
    assert len(finished) == 2, finished
    assert answered < min(finished.values()), (answered, finished)
