"""Images to calibrate INT8 on and to gate compiled forms on, made offline: framings of the
real photos that ship with scikit-image and scikit-learn, and generated scenes.

What the demo imports its model with (`scripts/demo.py`, `perito models import --calibration`)
and what the benchmarks gate on. Every image is a JPEG made from one source (a photo, or one
seeded scene) by a random framing: a crop of 50-100% a side, mirrored half the time, scaled
to 45-100% of the crop's size, with colour jitter (brightness, contrast and saturation within
±25%) and a JPEG quality of 75-95.

How the two sets are split: by source, never by image. The held-out set is framed from the
six photos a person would send (`HELD_OUT_PHOTOS`: coffee, a cat, a rocket, an astronaut, a
temple, a flower) and from scenes of their own seeds; calibration from the other pictures
(`CALIBRATION_PHOTOS`: a retina, tissue, the Hubble deep field, a motorcycle's stereo pair,
grey photographs...) and from other scenes. So no held-out image is derived from a picture or
a scene that any calibration image comes from, and the gate scores pictures the quantizer
never saw. Framings of one photo are not independent draws: the count says how many images
the gate saw, not how many independent scenes.

Needs scikit-image and scikit-learn (the `dev` extra) for their photos; reads them with Pillow
from the packages' data folders (`skimage.data` would import its I/O stack, many seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from perito_core.imaging import InputSpec, load_model_input
from perito_core.scenes import SHAPES, object_image

# (package, file under its data folder) of each source photo.
HELD_OUT_PHOTOS: dict[str, tuple[str, str]] = {
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
CALIBRATION_PHOTOS: dict[str, tuple[str, str]] = {
    "retina": ("skimage", "data/retina.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "colorwheel": ("skimage", "data/color.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
}
# Each scene is drawn at this size (pixels a side) before it is framed.
SCENE_SIZE = 320
# Seeds of the held-out scenes start here; calibration's at 0: the two never meet.
HELD_OUT_SEED = 1_000_000


@dataclass
class GateImages:
    """The two sets as JPEG files' bytes, each named `{source}-{n}.jpg` (distinct names and,
    checked, distinct bytes)."""

    calibration: dict[str, bytes] = field(default_factory=dict)
    held_out: dict[str, bytes] = field(default_factory=dict)

    def prepared(self, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
        """(calibration, held-out) decoded and resized as serving does (`load_model_input`),
        uint8 (N, H, W, 3) each at `spec`'s input size."""
        return _prepare(self.calibration, spec), _prepare(self.held_out, spec)

    def write(self, folder: Path) -> Path:
        """Write `folder/calibration/` and `folder/held-out/`: the layout `perito models import
        --calibration` splits by (`perito_core.models.gate.build_forms_from_folder`)."""
        for sub, files in (("calibration", self.calibration), ("held-out", self.held_out)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / sub / name).write_bytes(data)
        return folder


def _prepare(files: dict[str, bytes], spec: InputSpec) -> np.ndarray:
    return np.stack([load_model_input(data, spec) for data in files.values()])


def _read_photo(package: str, relative: str) -> np.ndarray:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed (its photos make the gate's images)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def frame(array: np.ndarray, rng: np.random.Generator) -> bytes:
    """One random framing of an RGB uint8 picture (H, W, 3) as JPEG bytes: crop (50-100% a
    side), mirror (half the time), scale (45-100%, at least 64 pixels a side), colour jitter
    (brightness, contrast, saturation x0.75-1.25) and JPEG quality 75-95."""
    h, w = array.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = array[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop))
    scale = rng.uniform(0.45, 1.0)
    size = (max(64, round(cw * scale)), max(64, round(ch * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.75, 1.25)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(75, 96)))
    return buffer.getvalue()


def scene(seed: int) -> np.ndarray:
    """The generated scene of `seed`: a uint8 RGB array [SCENE_SIZE, SCENE_SIZE, 3]."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return np.asarray(object_image(rng, shape, SCENE_SIZE).convert("RGB"))


def _add(files: dict[str, bytes], seen: set[str], name: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest not in seen:  # two framings can only meet by chance; the count stays honest
        seen.add(digest)
        files[f"{name}-{len(files)}.jpg"] = data


def gate_images(
    held_out_per_photo: int = 30,
    held_out_scenes: int = 60,
    calibration_per_photo: int = 14,
    calibration_scenes: int = 32,
    seed: int = 0,
) -> GateImages:
    """The calibration and held-out sets (module docstring: how they are made and split).

    The defaults give 240 held-out images (6 photos x 30 framings, 60 scenes) and 200
    calibration images (12 pictures x 14 framings, 32 scenes), in about 2 s on one core.

    Args:
        held_out_per_photo: framings of each of `HELD_OUT_PHOTOS`.
        held_out_scenes: generated scenes held out, one framing each.
        calibration_per_photo: framings of each of `CALIBRATION_PHOTOS`.
        calibration_scenes: generated scenes for calibration, one framing each.
        seed: the framings' random seed; the same seed gives the same bytes (same Pillow).

    Raises:
        RuntimeError: scikit-image or scikit-learn not installed.
    """
    images = GateImages()
    seen: set[str] = set()
    rng = np.random.default_rng(seed)
    for photos, per_photo, files in (
        (HELD_OUT_PHOTOS, held_out_per_photo, images.held_out),
        (CALIBRATION_PHOTOS, calibration_per_photo, images.calibration),
    ):
        for name, (package, relative) in photos.items():
            array = _read_photo(package, relative)
            for _ in range(per_photo):
                _add(files, seen, name, frame(array, rng))
    for first, count, files in (
        (HELD_OUT_SEED, held_out_scenes, images.held_out),
        (0, calibration_scenes, images.calibration),
    ):
        for scene_seed in range(first + seed * count, first + (seed + 1) * count):
            _add(files, seen, "scene", frame(scene(scene_seed), rng))
    return images
