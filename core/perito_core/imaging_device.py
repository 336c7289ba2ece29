"""Decode a batch of JPEGs on the model's device (nvJPEG on CUDA, through torchvision) into the
same model inputs `perito_core.imaging.load_model_input_with_info` makes with Pillow.

What a bulk worker whose model runs on a CUDA device does with a batch's bytes
(`perito_worker.processing`; `PERITO_GPU_DECODE`): every image is read and its JPEG header
checked on the CPU (`inspect_jpeg`); those the device path takes are decoded together by
`torchvision.io.decode_jpeg(list_of_uint8_tensors, device=...)` (nvJPEG's batched decode on
CUDA, libjpeg-turbo on the CPU) and resized and cropped on the device (`decode_jpeg_batch`);
every other image goes through the Pillow path, one by one, as on a CPU worker, so a readable
photo is never an error here. The same functions run with `device="cpu"` (torchvision's CPU
decoder), which is how the tests compare them with the Pillow path.

What the device path takes (`inspect_jpeg`): a baseline JPEG (SOF0) of three YCbCr components,
ending with its end-of-image marker (a file cut short is the Pillow path's to refuse as
TRUNCATED, whatever nvJPEG would make of it), without an EXIF orientation other than 1 and
without an embedded colour profile, within the `ImageLimits`. Everything else keeps the Pillow
path's handling: progressive and other JPEG processes, MPO, greyscale and CMYK, RGB-coded JPEGs
(Adobe transform 0 or components named R, G, B), rotated photos (EXIF orientation), photos with
an ICC profile (the Pillow path converts them to sRGB; even an sRGB profile goes there:
checking it is that path's), every other format, and anything over a limit (the Pillow path
refuses it with the reason). An image the device fails to decode is decoded again alone; if it
fails alone too, it goes to the Pillow path.

The recipe, as Pillow's (`load_model_input_with_info`):

1. The photo is brought to the scale libjpeg's DCT scaling would decode it at (Pillow's
   `draft`: the largest of 1/2, 1/4, 1/8 that keeps both sides at least the resize size), by
   an s x s box average of the full decode (`avg_pool2d`, partial blocks at the right and
   bottom edges averaged over their pixels), rounded to 8 bits. At 1/8 that is what libjpeg
   computes (each output pixel from an 8x8 block's DC coefficient); at 1/2 and 1/4 libjpeg
   runs a reduced inverse DCT instead, which keeps more of the block's detail.
2. Resized to the manifest's size (`center_crop`: shorter side to `resize_size`, then the
   same centre crop as `resize_for_model`; `squash`: straight to the input size), by
   `torch.nn.functional.interpolate` in float32 with `antialias=True` (`bilinear` or
   `bicubic`: the Pillow filters, widened by the scale factor when shrinking, as Pillow
   does), rounded and clipped to uint8. A `nearest` recipe is not taken: it picks single
   samples, so the small sub-pixel differences of step 1 become whole-pixel jumps.
3. The photo-quality measures (`perito_core.quality.measure`) are taken on the CPU, by that
   very function, from the step-1 image copied back from the device (`DeviceDecoded`), as
   the Pillow path takes them from the DCT-scaled decode. A device port of
   `quality.grey_levels` would have to copy Pillow's fixed-point BOX resampling and its
   `reducing_gap` pre-reduction to give the same sharpness: an area filter in its place moved
   the sharpness of the sample photos by 50-70%. The cost is a copy of the reduced photo
   (under 1 MB for a 640x480 JPEG; a 4000x3000 one at 1/8: 560 KB) and about a millisecond
   of CPU per image, on the decode threads.

Measured on the CPU (torchvision's decoder, which gives libjpeg-turbo's pixels as Pillow does),
against the Pillow path (whose resize is torch's antialiased uint8 kernels), on scikit-image's
and scikit-learn's six photos as JPEG at quality 90 at their own size and at 1024x768,
1600x1200, 1200x1600, 4000x3000 and 3000x4000, through 224-pixel center_crop (resize 256,
bilinear and bicubic), 240x320 center_crop and 224 squash recipes, 56 pairs
(`.venv/bin/python bench/device_decode.py`, one run): at scale 1 (no DCT scaling) the inputs
differ by at most 1 grey level (bilinear; bicubic 5, rounding between the two passes) and the
quality measures are the same numbers; at 1/2 by 0.58 levels on average at most, 99% of the
values within 5, a few up to 14; at 1/4 by 0.36 on average, at most 5; at 1/8 by 0.28 on
average, at most 2. The quality measures, at every scale: sharpness within 0.55%, brightness
within 0.06 levels and contrast within 0.04, the clipped shares within 0.002.
`tests/unit/test_imaging_device.py` holds looser bounds (mean 1 level, 99% within 8; sharpness
2%, brightness and contrast 0.5 levels, shares 0.005). On a GPU, nvJPEG's own inverse DCT and
chroma upsampling add their differences from libjpeg-turbo: not measured (no GPU was lent to
this work); `bench/gpu.py` prints the differences it sees on its images.

The model input comes back to the host as uint8 (N, H, W, 3) (150 KB an image at 224x224),
the one contract every engine takes (`LoadedModel.predict`); the model's forward pass copies
it to the device again.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from perito_core.imaging import DecodeInfo, ImageLimits, InputSpec, resize_geometry
from perito_core.quality import measure

log = logging.getLogger(__name__)

T = TypeVar("T")

# Start-of-frame markers (ITU-T T.81 Table B.1): 0xC0 is baseline DCT; C4 (DHT), C8 (JPG)
# and CC (DAC) share the range but are not frames.
_BASELINE = 0xC0
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_START_OF_SCAN = 0xDA
_END_OF_IMAGE = b"\xff\xd9"
# Markers that stand alone, without a length: TEM, RST0-7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Component ids that make libjpeg read three components as RGB rather than YCbCr.
_RGB_IDS = (ord("R"), ord("G"), ord("B"))
# EXIF's Orientation tag.
_ORIENTATION = 0x0112
# Pillow's draft scales for JPEG (libjpeg's DCT scaling), largest first.
_DRAFT_SCALES = (8, 4, 2, 1)
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}


@dataclass(frozen=True)
class JpegHeader:
    """What `inspect_jpeg` read of a JPEG the device path takes: its size in pixels."""

    width: int
    height: int


def frame_marker(data: bytes) -> int | None:
    """The start-of-frame marker's code (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...)
    of JPEG bytes, found by walking the segments from the start of image (ITU-T T.81 B.1.1);
    None when `data` is not a JPEG or no frame comes before the first scan."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        code = data[pos + 1]
        if code == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if code in _STANDALONE:
            pos += 2
            continue
        if code in _FRAMES:
            return code
        if code == _START_OF_SCAN:
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def inspect_jpeg(data: bytes, limits: ImageLimits = ImageLimits()) -> JpegHeader | str:
    """Whether the device path takes these bytes (module docstring), from the header alone.

    Args:
        data: an encoded image.
        limits: the bounds the Pillow path applies; an image over one is left to it (it
            refuses it with the reason).

    Returns:
        The JPEG's size, or why the image goes to the Pillow path (for logs and tests).
    """
    if not data or len(data) > limits.max_bytes:
        return f"{len(data):,} bytes: outside 1 to {limits.max_bytes:,}"
    marker = frame_marker(data)
    if marker is None:
        return "not a JPEG (no frame header before the first scan)"
    if marker != _BASELINE:
        return f"not a baseline JPEG (start of frame 0x{marker:02X})"
    if not data.endswith(_END_OF_IMAGE):  # the Pillow path tells cut short from trailing data
        return "does not end with the end-of-image marker"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
        with image:
            layers = tuple(layer[0] for layer in getattr(image, "layer", ()))
            orientation = image.getexif().get(_ORIENTATION, 1)
            width, height = image.size
            info, mode, fmt = image.info, image.mode, image.format
    except Exception as error:  # noqa: BLE001 - the Pillow path says what is wrong with it
        return f"header not read: {error}"
    if fmt != "JPEG":
        return f"{fmt} (more than one picture)"
    if mode != "RGB" or len(layers) != 3:
        return f"mode {mode} ({len(layers)} components)"
    if info.get("adobe_transform", 1) != 1 or layers == _RGB_IDS:
        return "RGB-coded, not YCbCr"
    if info.get("icc_profile"):
        return "an embedded colour profile (converted to sRGB by the Pillow path)"
    if orientation != 1:
        return f"EXIF orientation {orientation}"
    if (
        width * height > limits.max_pixels
        or max(width, height) > limits.max_side
        or max(width, height) / max(1, min(width, height)) > limits.max_aspect_ratio
    ):
        return f"{width}x{height}: over a size limit"
    return JpegHeader(width, height)


def takes_recipe(spec: InputSpec) -> bool:
    """Whether the device path resizes for `spec`: bilinear and bicubic, not nearest."""
    return spec.interpolation in _MODES


def draft_scale(width: int, height: int, spec: InputSpec) -> int:
    """The scale denominator (1, 2, 4 or 8) Pillow's `draft` decodes a width x height JPEG at
    for `spec` (`load_model_input_with_info` asks for both sides at least the resize size;
    Pillow 13's `JpegImageFile.draft` takes the largest scale within that)."""
    target = spec.resize_size if spec.resize_mode == "center_crop" else max(spec.height, spec.width)
    most = min(width // target, height // target)
    return next(scale for scale in _DRAFT_SCALES if most >= scale or scale == 1)


@dataclass(frozen=True)
class DeviceDecoded:
    """One JPEG decoded and resized on the device.

    Attributes:
        pixels: the model input, uint8 (spec.height, spec.width, 3), RGB.
        reduced: the photo at the draft scale (step 1), uint8 (h, w, 3), what the quality
            measures are taken from.
        info: format JPEG, one frame, no colour conversion, the photo's full size; no quality.
    """

    pixels: np.ndarray
    reduced: np.ndarray
    info: DecodeInfo

    def with_quality(self, spec: InputSpec) -> tuple[np.ndarray, DecodeInfo]:
        """The model input and the decode information with the photo-quality measures, as
        `load_model_input_with_info` returns them (`quality.measure` on `reduced`, the
        resolution against the shorter side of `spec`); about a millisecond of CPU."""
        info = self.info
        measures = measure(
            self.reduced, min(spec.height, spec.width), size=(info.width, info.height)
        )
        return self.pixels, dataclasses.replace(info, quality=measures)


def _decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """`decode_jpeg` of the whole list, RGB, on `device`; where that raises, each image alone,
    None for one that fails alone too."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(decoded)
    except RuntimeError:
        pass
    alone: list[torch.Tensor | None] = []
    for tensor in tensors:
        try:
            alone.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            alone.append(None)
    return alone


def _model_input(image: torch.Tensor, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of the module docstring for one decoded image, uint8 (3, H, W) on its
    device: (the model input uint8 (H, W, 3), the draft-scale photo uint8 (h, w, 3))."""
    _, height, width = image.shape
    scale = draft_scale(width, height, spec)
    x = image[None].float()
    if scale > 1:
        x = F.avg_pool2d(x, scale, ceil_mode=True).round_()
    reduced = x
    height, width = x.shape[-2:]
    (new_width, new_height), (left, top) = resize_geometry(width, height, spec)
    size = (new_height, new_width)
    if size != (height, width):
        mode = _MODES[spec.interpolation]
        x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    x = x[..., top : top + spec.height, left : left + spec.width].round_().clamp_(0, 255)
    return x[0].to(torch.uint8).permute(1, 2, 0), reduced[0].to(torch.uint8).permute(1, 2, 0)


def decode_jpeg_batch(
    jpegs: Sequence[tuple[bytes, JpegHeader]], spec: InputSpec, device: torch.device | str
) -> list[DeviceDecoded | None]:
    """Decode JPEGs `inspect_jpeg` took, together, on `device`, into model inputs.

    Args:
        jpegs: each image's bytes and header.
        spec: the model's input recipe (`takes_recipe`: bilinear or bicubic).
        device: where to decode and resize: a CUDA device (nvJPEG) or the CPU.

    Returns:
        One per image, in order: its `DeviceDecoded`, or None where the device could not
        decode it (or decoded another size than its header says): the Pillow path's.

    Raises:
        ValueError: a recipe the device path does not take (`nearest`).
        RuntimeError: the device failed other than on an image (out of memory).
    """
    if not takes_recipe(spec):
        raise ValueError(f"interpolation {spec.interpolation!r} is decoded with Pillow")
    if not jpegs:
        return []
    target = torch.device(device)
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _ in jpegs]
    images = _decode(tensors, target)
    inputs: list[torch.Tensor] = []
    reduced: list[torch.Tensor] = []
    kept: list[int] = []
    for index, (image, (_, header)) in enumerate(zip(images, jpegs, strict=True)):
        if image is None or tuple(image.shape) != (3, header.height, header.width):
            continue
        pixels, small = _model_input(image, spec)
        inputs.append(pixels)
        reduced.append(small)
        kept.append(index)
    out: list[DeviceDecoded | None] = [None] * len(jpegs)
    if not kept:
        return out
    host = torch.stack(inputs).cpu().numpy()  # one copy back for the batch's inputs
    for position, index in enumerate(kept):
        header = jpegs[index][1]
        info = DecodeInfo("JPEG", 1, False, width=header.width, height=header.height)
        out[index] = DeviceDecoded(host[position], reduced[position].cpu().numpy(), info)
    return out


def prepare_batch(
    pool: Executor,
    fetches: Sequence[Callable[[], bytes] | None],
    prepares: Sequence[Callable[[Callable[[], bytes], DeviceDecoded | None], T]],
    spec: InputSpec,
    limits: ImageLimits,
    device: torch.device | str,
) -> list[Future[T]]:
    """A batch through the device path, on a thread pool, without any thread waiting on
    another: each image is fetched (`fetches[i]`, None: nothing to fetch) and its header
    checked on `pool`; the thread that finishes the last one decodes the JPEGs the device
    takes (`decode_jpeg_batch`), then each image is prepared on `pool` by `prepares[i]`,
    given a callable that returns its bytes (or raises what fetching raised) and its
    `DeviceDecoded` (None: decode it the Pillow way).

    Args:
        pool: where the work runs (a worker's decode threads).
        fetches: per image, what reads its bytes; None for an image with nothing to read.
        prepares: per image, what turns the fetched bytes and the device's decode into the
            caller's result; it handles what fetching raised.
        spec, limits: the model's recipe and the image limits (`inspect_jpeg`).
        device: where the JPEGs are decoded.

    Returns:
        One future per image, in order: `prepares[i]`'s result, or what it raised. Where the
        device decode itself fails (out of memory), the batch goes the Pillow way, logged.
    """
    count = len(fetches)
    results: list[Future[T]] = [Future() for _ in range(count)]
    fetched: list[bytes | BaseException | None] = [None] * count
    headers: list[JpegHeader | None] = [None] * count
    left = [count]
    lock = threading.Lock()

    def settle(index: int, decoded: DeviceDecoded | None) -> None:
        def data() -> bytes:
            got = fetched[index]
            if isinstance(got, BaseException):
                raise got
            return got or b""

        future = results[index]
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(prepares[index](data, decoded))
        except BaseException as error:  # noqa: BLE001 - handed to whoever reads the result
            future.set_exception(error)

    def decode_all() -> None:
        taken = [i for i in range(count) if headers[i] is not None]
        jpegs = [(fetched[i], headers[i]) for i in taken]
        decoded: list[DeviceDecoded | None] = [None] * len(taken)
        try:
            decoded = decode_jpeg_batch(jpegs, spec, device)  # type: ignore[arg-type]
        except Exception:  # the device failed (out of memory): the Pillow path for the batch
            log.warning(
                "decoding %d JPEGs on %s failed; Pillow decodes them",
                len(jpegs),
                device,
                exc_info=True,
            )
        by_index = dict(zip(taken, decoded, strict=True))
        for index in range(count):
            pool.submit(settle, index, by_index.get(index))

    def fetch(index: int) -> None:
        fetch_one = fetches[index]
        try:
            if fetch_one is not None and not results[index].cancelled():
                data = fetch_one()
                fetched[index] = data
                if takes_recipe(spec):
                    header = inspect_jpeg(data, limits)
                    headers[index] = header if isinstance(header, JpegHeader) else None
        except BaseException as error:  # noqa: BLE001 - raised again by this image's prepare
            fetched[index] = error
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            decode_all()

    if count == 0:
        return results
    for index in range(count):
        pool.submit(fetch, index)
    return results


@functools.cache
def device_decode_refusal(device: str) -> str | None:
    """Why JPEGs cannot be decoded on `device` (a torch device name), or None when they can:
    a 16x16 JPEG is decoded there once per process (torchvision built without nvJPEG, a
    device that fails, the CPU named: the Pillow path serves the CPU)."""
    if torch.device(device).type != "cuda":
        return f"{device} is not a CUDA device"
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(probe, "JPEG")
    header = inspect_jpeg(probe.getvalue())
    assert isinstance(header, JpegHeader)
    spec = InputSpec(height=16, width=16, resize_size=16)
    try:
        (decoded,) = decode_jpeg_batch([(probe.getvalue(), header)], spec, device)
        refusal = None if decoded is not None else "torchvision could not decode a test JPEG"
    except Exception as error:  # noqa: BLE001 - whatever fails, the Pillow path serves
        refusal = f"decoding a test JPEG failed: {error}"
    if refusal is None:
        log.info("JPEGs decode on %s (torchvision.io.decode_jpeg, nvJPEG)", device)
    else:
        log.warning("GPU decode is off on %s: %s; Pillow decodes on the CPU", device, refusal)
    return refusal


def decode_device(enabled: bool, device: torch.device, spec: InputSpec) -> torch.device | None:
    """Where a worker decodes a batch's JPEGs: `device`, when GPU decode is `enabled`
    (`PERITO_GPU_DECODE`), the model runs on a CUDA device where a test JPEG decodes
    (`device_decode_refusal`, logged once a process) and the recipe is one the device path
    takes (`takes_recipe`); None: Pillow, on the decode threads."""
    if not enabled or device.type != "cuda" or not takes_recipe(spec):
        return None
    return None if device_decode_refusal(str(device)) else device
