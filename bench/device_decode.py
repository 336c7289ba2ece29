"""How far the device decode path's model inputs and quality measures are from the Pillow path.

`perito_core.imaging_device` decodes a batch of JPEGs together and resizes them on the model's
device (a GPU worker's path); here it runs on the CPU (torchvision's decoder gives libjpeg-turbo's
pixels, as Pillow does), so what is measured is the recipe's own difference from
`perito_core.imaging.load_model_input_with_info`: the box average standing in for libjpeg's
reduced-scale inverse DCT, and the resize. On a GPU, nvJPEG's inverse DCT and chroma
upsampling add theirs (`bench/gpu.py` prints them).

The photos and recipes are `tests/unit/test_imaging_device.py`'s (which asserts looser bounds):
scikit-image's and scikit-learn's six photos as JPEG (quality 90) at their own size and enlarged
to where Pillow decodes at 1/2, 1/4 and 1/8, each through four input recipes. Per DCT scale
(and interpolation, at full scale), over those pairs: the largest mean difference of a model
input in grey levels, the largest 99th percentile, the largest difference; and how far the
quality measures moved (sharpness relative, brightness and contrast in levels, clipped shares).

Run: `.venv/bin/python bench/device_decode.py` (a few seconds; no GPU needed).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from perito_core.imaging import load_model_input_with_info  # noqa: E402
from perito_core.imaging_device import draft_scale  # noqa: E402
from scripts.sample_photos import write_sample_photos  # noqa: E402
from tests.unit.test_imaging_device import RECIPES, SIZES, device_input, jpeg  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        photos = {path.stem: path for path in write_sample_photos(Path(tmp))}
        inputs: dict[str, list[tuple[float, float, int]]] = {}
        measures: dict[str, list[tuple[float, float, float, float]]] = {}
        for name, size in SIZES:
            with Image.open(photos[name]) as opened:
                image = opened.convert("RGB")
                data = jpeg(image if size is None else image.resize(size))
            for spec in RECIPES:
                want, want_info = load_model_input_with_info(data, spec)
                got, info = device_input(data, spec)
                scale = draft_scale(info.width, info.height, spec)
                row = f"1/{scale}" + (f", {spec.interpolation}" if scale == 1 else "")
                diff = np.abs(got.astype(int) - want.astype(int))
                inputs.setdefault(row, []).append(
                    (float(diff.mean()), float(np.percentile(diff, 99)), int(diff.max()))
                )
                a, b = info.quality, want_info.quality
                assert a is not None and b is not None
                measures.setdefault(f"1/{scale}", []).append(
                    (
                        abs(a.sharpness - b.sharpness) / max(b.sharpness, 1e-9),
                        abs(a.brightness - b.brightness),
                        abs(a.contrast - b.contrast),
                        max(
                            abs(a.dark_fraction - b.dark_fraction),
                            abs(a.bright_fraction - b.bright_fraction),
                        ),
                    )
                )
    print(f"# {sum(map(len, inputs.values()))} photo x recipe pairs")
    print("| DCT scale | pairs | largest mean diff | largest 99th percentile | largest diff |")
    print("|---|---|---|---|---|")
    for row, values in sorted(inputs.items()):
        figures = np.array(values)
        print(
            f"| {row} | {len(values)} | {figures[:, 0].max():.2f} | {figures[:, 1].max():.0f} "
            f"| {figures[:, 2].max():.0f} |"
        )
    print("\n| DCT scale | sharpness | brightness | contrast | clipped shares |")
    print("|---|---|---|---|---|")
    for row, values in sorted(measures.items()):
        worst = np.array(values).max(axis=0)
        print(f"| {row} | {worst[0]:.2%} | {worst[1]:.3f} | {worst[2]:.3f} | {worst[3]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
