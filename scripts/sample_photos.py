"""Write the real photos that ship with scikit-image and scikit-learn as JPEG files.

coffee, chelsea (a cat), rocket, astronaut (skimage.data); china (a temple), flower
(sklearn.datasets.load_sample_images). Used by `make demo`, the tests and the benchmarks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

PHOTOS = ("coffee", "chelsea", "rocket", "astronaut", "china", "flower")


def write_sample_photos(out_dir: Path, quality: int = 92) -> list[Path]:
    """Write each photo as `{name}.jpg` under `out_dir`; returns the paths in PHOTOS order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sklearn_images = load_sample_images()
    arrays = {name: getattr(skimage.data, name)() for name in PHOTOS[:4]}
    for file_name, array in zip(sklearn_images.filenames, sklearn_images.images, strict=True):
        arrays[Path(file_name).stem] = array
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = out_dir / f"{name}.jpg"
        Image.fromarray(arrays[name]).convert("RGB").save(path, quality=quality)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    paths = write_sample_photos(parser.parse_args().out)
    print(f"wrote {len(paths)} photos to {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
