"""Benchmark the JPEG decoders and resizers that could turn a photo into a model input.

What every image pays before the forward pass (`perito_core.imaging.load_model_input`): decode
(with DCT scaling for big JPEGs), then resize the shorter side to 256 and crop the centre
224x224. For a 640x480 and a 4000x3000 JPEG, each decoder x resizer combination is timed from
the JPEG's bytes to the uint8 model input (bilinear and bicubic, the interpolations model specs
use), single-threaded, in interleaved rounds (drift on a shared machine hits all alike): median
ms and ratio to Pillow's pipeline (decode, resize, then crop) measured in the same run. Beside each
time: the largest absolute difference of its model input from Pillow's, in grey levels, over
every sample photo (scikit-image's and scikit-learn's) at that size; and for each decoder,
whether its decoded pixels are Pillow's exactly (the photo-quality measures are taken from them,
so a decoder that changes one pixel changes the thresholds stored in model cards).

Decoders: Pillow (`Image.draft`, libjpeg's scales 1/2, 1/4, 1/8, as `load_model_input`);
simplejpeg at Pillow's scale and with its own `min_height`/`min_width` choice (any M/8 scale);
PyTurboJPEG (`scaling_factor`, Pillow's scale); OpenCV (`cv2.imdecode`, `IMREAD_REDUCED_COLOR_*`).
Resizers: Pillow resize then crop (the reference: the pixels torchvision's PIL transforms give a
model in training); torch's antialiased uint8 interpolation (`torch.nn.functional.interpolate(
..., antialias=True)` on a channels-last uint8 tensor, what `resize_for_model` adopted); Pillow
resize of the crop's source box only (`Image.resize(..., box=)`); the same with `reducing_gap` 2
and 3; OpenCV `INTER_AREA` and `INTER_LINEAR` (`INTER_CUBIC` for bicubic specs), resize then
crop.
The last row is `perito_core.imaging.load_model_input` as committed (it also reads EXIF and ICC).

Run: `.venv/bin/pip install -c constraints.txt -e '.[bench]'` (simplejpeg, PyTurboJPEG,
opencv-python-headless; PyTurboJPEG also needs libjpeg-turbo's TurboJPEG library:
`apt-get install libturbojpeg0`), then `.venv/bin/python bench/decoders.py`. A decoder whose
package is missing is left out and named.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.classify import machine_line  # noqa: E402
from perito_core.imaging import (  # noqa: E402
    InputSpec,
    load_model_input,
    resize_for_model,
    resize_geometry,
)

RESIZE = 256
CROP = 224
SPECS = {
    name: InputSpec(height=CROP, width=CROP, resize_size=RESIZE, interpolation=name)
    for name in ("bilinear", "bicubic")
}
PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Decoded = Image.Image | np.ndarray  # a PIL image or an RGB uint8 array
Decoder = Callable[[bytes], Decoded]
Resizer = Callable[[Decoded, str], np.ndarray]


def photos(width: int, height: int) -> list[Image.Image]:
    """The sample photos shipped with scikit-image and scikit-learn, each scaled (Lanczos)
    and cropped to `width` x `height`; the first (coffee) is the one timed."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut()]
    arrays += list(load_sample_images().images)
    out = []
    for array in arrays:
        image = Image.fromarray(array).convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (math.ceil(image.width * scale), math.ceil(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        out.append(image.crop((left, top, left + width, top + height)))
    return out


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def pillow_draft(data: bytes) -> Image.Image:
    """Today's decode: libjpeg's DCT scaling down to no less than 256 on either side."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (RESIZE, RESIZE))
    image.load()
    return image


def pillow_scale(data: bytes) -> int:
    """The scale denominator (1, 2, 4 or 8) `Image.draft` picks for this JPEG."""
    image = Image.open(io.BytesIO(data))
    full = image.width
    image.draft("RGB", (RESIZE, RESIZE))
    return full // image.width


def decoders() -> tuple[dict[str, Decoder], list[str]]:
    """The decoders whose packages are installed, and a note for each one that is not."""
    found: dict[str, Decoder] = {"Pillow (draft)": pillow_draft}
    missing = []
    try:
        import simplejpeg
    except ImportError:
        missing.append("simplejpeg (pip install simplejpeg)")
    else:

        def simplejpeg_pillow_scale(data: bytes) -> np.ndarray:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            denominator = pillow_scale(data)
            return simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_height=-(-height // denominator),
                min_width=-(-width // denominator),
            )

        def simplejpeg_own_scale(data: bytes) -> np.ndarray:
            return simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=RESIZE, min_width=RESIZE
            )

        found["simplejpeg (Pillow's scale)"] = simplejpeg_pillow_scale
        found["simplejpeg (min 256, M/8 scales)"] = simplejpeg_own_scale
    try:
        import turbojpeg

        turbo = turbojpeg.TurboJPEG()
    except (ImportError, OSError, RuntimeError) as exc:
        missing.append(f"PyTurboJPEG ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    else:

        def pyturbojpeg(data: bytes) -> np.ndarray:
            factor = (1, pillow_scale(data))
            return turbo.decode(
                data,
                pixel_format=turbojpeg.TJPF_RGB,
                scaling_factor=None if factor == (1, 1) else factor,
            )

        found["PyTurboJPEG (Pillow's scale)"] = pyturbojpeg
    try:
        import cv2
    except ImportError:
        missing.append("OpenCV (pip install opencv-python-headless)")
    else:
        cv2.setNumThreads(1)
        reduced = {
            1: cv2.IMREAD_COLOR_RGB,
            2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8,
        }

        def opencv(data: bytes) -> np.ndarray:
            denominator = pillow_scale(data)
            array = cv2.imdecode(np.frombuffer(data, np.uint8), reduced[denominator])
            if denominator != 1:  # the reduced modes give BGR
                array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
            return array

        found["OpenCV imdecode (IMREAD_REDUCED_*)"] = opencv
    return found, missing


def as_image(decoded: Decoded) -> Image.Image:
    return decoded if isinstance(decoded, Image.Image) else Image.fromarray(decoded)


def as_array(decoded: Decoded) -> np.ndarray:
    return np.asarray(decoded) if isinstance(decoded, Image.Image) else decoded


def crop_geometry(width: int, height: int) -> tuple[tuple[int, int], int, int]:
    """The resize size (shorter side 256) and the centre crop's top-left corner in it, as
    `resize_for_model` has them (`resize_geometry`)."""
    new_size, (left, top) = resize_geometry(width, height, SPECS["bilinear"])
    return new_size, left, top


def pillow_resize_then_crop(decoded: Decoded, interpolation: str) -> np.ndarray:
    """Today's resize: the whole image to 256 on its shorter side, then the centre crop."""
    image = as_image(decoded)
    new_size, left, top = crop_geometry(*image.size)
    resized = image.resize(new_size, PIL_RESAMPLE[interpolation])
    return np.asarray(resized.crop((left, top, left + CROP, top + CROP)))


def crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The region of the source image that the centre crop comes from."""
    (new_width, new_height), left, top = crop_geometry(width, height)
    x_scale, y_scale = width / new_width, height / new_height
    return (left * x_scale, top * y_scale, (left + CROP) * x_scale, (top + CROP) * y_scale)


def pillow_box(reducing_gap: float | None = None) -> Resizer:
    def resize(decoded: Decoded, interpolation: str) -> np.ndarray:
        image = as_image(decoded)
        box = crop_box(*image.size)
        return np.asarray(
            image.resize(
                (CROP, CROP), PIL_RESAMPLE[interpolation], box=box, reducing_gap=reducing_gap
            )
        )

    return resize


def torch_antialiased(decoded: Decoded, interpolation: str) -> np.ndarray:
    """What `perito_core.imaging.resize_for_model` does now: torch's antialiased uint8
    interpolation (written to give Pillow's pixels), in Pillow's order of passes, then the
    crop."""
    return resize_for_model(as_image(decoded), SPECS[interpolation])


def opencv_resize(area: bool) -> Resizer:
    import cv2

    def resize(decoded: Decoded, interpolation: str) -> np.ndarray:
        array = as_array(decoded)
        new_size, left, top = crop_geometry(array.shape[1], array.shape[0])
        if area:
            flag = cv2.INTER_AREA
        else:
            flag = cv2.INTER_LINEAR if interpolation == "bilinear" else cv2.INTER_CUBIC
        resized = cv2.resize(array, new_size, interpolation=flag)
        return resized[top : top + CROP, left : left + CROP]

    return resize


def resizers(have_opencv: bool) -> dict[str, Resizer]:
    found: dict[str, Resizer] = {
        "Pillow resize, then crop (reference)": pillow_resize_then_crop,
        "torch interpolate, antialiased uint8 (adopted)": torch_antialiased,
        "Pillow resize of the crop box": pillow_box(),
        "Pillow crop box, reducing_gap=2": pillow_box(2.0),
        "Pillow crop box, reducing_gap=3": pillow_box(3.0),
    }
    if have_opencv:
        found["OpenCV INTER_AREA, then crop"] = opencv_resize(area=True)
        found["OpenCV INTER_LINEAR/CUBIC, then crop"] = opencv_resize(area=False)
    return found


def max_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """Largest absolute difference in grey levels; None when the shapes differ."""
    if a.shape != b.shape:
        return None
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def text(difference: int | None) -> str:
    return "size differs" if difference is None else str(difference)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--sizes", default="640x480,4000x3000", help="comma-separated width x height"
    )
    args = parser.parse_args()
    found_decoders, missing = decoders()
    found_resizers = resizers(any(name.startswith("OpenCV") for name in found_decoders))
    print(machine_line())
    print(
        f"# decoders: JPEG (quality 90) -> {CROP}x{CROP} model input (shorter side {RESIZE}, "
        f"centre crop), single-threaded, {args.rounds} interleaved rounds, median ms; "
        "max diff: largest |difference| from Pillow's model input in grey levels over "
        "6 photos"
    )
    if missing:
        print(f"# left out: {'; '.join(missing)}")
    for size in args.sizes.split(","):
        width, height = (int(x) for x in size.split("x"))
        files = [jpeg(image) for image in photos(width, height)]
        # What each decoder gives against Pillow's decode, on every photo.
        same_decode: dict[str, str] = {}
        for decoder_name, decoder in found_decoders.items():
            worst: int | None = 0
            for data in files:
                difference = max_difference(as_array(decoder(data)), as_array(pillow_draft(data)))
                worst = None if difference is None or worst is None else max(worst, difference)
            same_decode[decoder_name] = (
                "no: another size" if worst is None else "yes" if worst == 0 else f"no ({worst})"
            )
        pipelines: dict[tuple[str, str], Callable[[bytes, str], np.ndarray]] = {}
        for decoder_name, decoder in found_decoders.items():
            for resizer_name, resizer in found_resizers.items():
                pipelines[(decoder_name, resizer_name)] = (
                    lambda data, interpolation, d=decoder, r=resizer: r(d(data), interpolation)
                )
        pipelines[("load_model_input (as committed)", "")] = lambda data, interpolation: (
            load_model_input(data, SPECS[interpolation])
        )
        reference = pipelines[("Pillow (draft)", "Pillow resize, then crop (reference)")]
        differences = {
            (key, interpolation): max(
                (
                    max_difference(pipeline(data, interpolation), reference(data, interpolation))
                    for data in files
                ),
                key=lambda d: 256 if d is None else d,
            )
            for key, pipeline in pipelines.items()
            for interpolation in SPECS
        }
        timed = files[0]
        times: dict[tuple[tuple[str, str], str], list[float]] = {
            (key, interpolation): [] for key in pipelines for interpolation in SPECS
        }
        for pipeline in pipelines.values():  # warm up
            pipeline(timed, "bilinear")
        for _ in range(args.rounds):
            for key, pipeline in pipelines.items():
                for interpolation in SPECS:
                    started = time.perf_counter()
                    pipeline(timed, interpolation)
                    times[(key, interpolation)].append((time.perf_counter() - started) * 1000)
        base = {i: statistics.median(times[(next(iter(pipelines)), i)]) for i in SPECS}
        print()
        print(
            f"## {width}x{height} JPEG, {len(timed):,} bytes (Pillow decodes at 1/"
            f"{pillow_scale(timed)})"
        )
        print()
        print(
            "| decoder | decode = Pillow's | resizer | bilinear ms | x Pillow | max diff | "
            "bicubic ms | x Pillow | max diff |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for key in pipelines:
            decoder_name, resizer_name = key
            cells = []
            for interpolation in SPECS:
                median = statistics.median(times[(key, interpolation)])
                cells += [
                    f"{median:.2f}",
                    f"{median / base[interpolation]:.2f}",
                    text(differences[(key, interpolation)]),
                ]
            print(
                f"| {decoder_name} | {same_decode.get(decoder_name, '')} | {resizer_name} | "
                + " | ".join(cells)
                + " |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
