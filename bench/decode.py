"""Benchmark decoding what phones write: the same 12-megapixel photo as JPEG, MPO, HEIC, AVIF.

`load_model_input` (decode, colour, orientation, resize to EfficientNet-Lite0's 224x224 input)
on the same pixels in each format, interleaved rounds, median per format and its ratio to the
JPEG measured in the same run. Also a Display P3 JPEG (colour conversion to sRGB on).

Targets: MPO within 1.3x of JPEG, and the MPO's model input the JPEG's exactly; exits 1 when
either is missed. Run: `.venv/bin/python bench/decode.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.classify import cpu_name  # noqa: E402
from bench.targets import report  # noqa: E402
from perito_core.imaging import HEIF_SUPPORTED, decode_image_with_info, load_model_input  # noqa: E402
from perito_training.pretrained import EFFICIENTNET_LITE0_INPUT  # noqa: E402


def photo(width: int, height: int) -> Image.Image:
    """A real photo (skimage's coffee) scaled to `width` x `height`."""
    import skimage.data

    return Image.fromarray(skimage.data.coffee()).resize((width, height), Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def display_p3_jpeg(image: Image.Image) -> bytes:
    """The photo in Display P3 with the profile embedded (as an iPhone saves it)."""
    from tests.unit.test_imaging_formats import DISPLAY_P3, in_profile  # the tests' ICC writer

    return encode(in_profile(image, DISPLAY_P3), "JPEG", quality=92, icc_profile=DISPLAY_P3)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="4000x3000", help="width x height of the photo")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    image = photo(width, height)
    files = {
        "JPEG": encode(image, "JPEG", quality=92),
        "MPO (JPEG + a second picture)": encode(
            image, "MPO", quality=92, save_all=True, append_images=[image.resize((1920, 1440))]
        ),
        "AVIF": encode(image, "AVIF", quality=80),
    }
    if HEIF_SUPPORTED:
        files["HEIC"] = encode(image, "HEIF", quality=80)
    with contextlib.suppress(ImportError):  # the tests are not shipped with a package
        files["JPEG, Display P3 profile"] = display_p3_jpeg(image)
    spec = EFFICIENTNET_LITE0_INPUT.spec()
    for data in files.values():  # warm up, and check every file really is what it says
        load_model_input(data, spec)
    formats = {name: decode_image_with_info(data)[1].format for name, data in files.items()}
    times: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits all alike
        for name, data in files.items():
            started = time.perf_counter()
            load_model_input(data, spec)
            times[name].append((time.perf_counter() - started) * 1000)
    jpeg = statistics.median(times["JPEG"])
    print(
        f"# decode: {width}x{height} photo -> {spec.width}x{spec.height} model input "
        f"(load_model_input), {args.rounds} interleaved rounds; {cpu_name()}, "
        f"{os.cpu_count()} cores"
    )
    print("| file | decoded as | bytes | median ms | min ms | vs JPEG |")
    print("|---|---|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"| {name} | {formats[name]} | {len(files[name]):,} | {median:.1f} | "
            f"{min(samples):.1f} | {median / jpeg:.2f}x |"
        )
    mpo = statistics.median(times["MPO (JPEG + a second picture)"]) / jpeg
    same = np.array_equal(
        load_model_input(files["JPEG"], spec),
        load_model_input(files["MPO (JPEG + a second picture)"], spec),
    )
    print()
    return report(
        [
            (f"MPO: {mpo:.2f} x JPEG (target <= 1.3)", mpo <= 1.3),
            (f"MPO model input identical to the JPEG's: {same}", same),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
