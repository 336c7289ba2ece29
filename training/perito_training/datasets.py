"""Datasets: find labelled images, split them, and prepare them the way serving will.

Four layouts (`DataConfig.kind`): class folders, a CSV manifest, labels in a file-name suffix
(`00001P.jpg`) and Fashion-MNIST's idx files. Every image is decoded and resized once, up
front, with the serving code (`perito_core.imaging`): a file that cannot be read is reported
and left out instead of stopping the run, and validation / test images are exactly what the
published model will see in `Classify`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import struct
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from perito_core.digests import sha256_hex
from perito_core.errors import InvalidImage
from perito_core.imaging import (
    ImageLimits,
    InputSpec,
    load_model_input,
    load_model_input_with_info,
    resize_for_model,
)
from perito_core.jobs.sources import is_ignored_key
from perito_core.quality import QualityMeasures, measure
from perito_training.config import DataConfig

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
SPLITS = ("train", "val", "test")
CACHE_AUTO_LIMIT_BYTES = 4 << 30


class DatasetError(ValueError):
    """The data cannot make a training set (no images, one class, unknown label ...)."""


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: Path = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) for `train` (60,000) or `test` (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


@dataclass(frozen=True)
class Entry:
    """One labelled image: a file, or a row of an in-memory array."""

    name: str
    label: int
    path: Path | None = None
    row: int = -1
    split: str | None = None


@dataclass
class Catalog:
    """Everything found under the data source, before splitting."""

    classes: list[str]
    entries: list[Entry]
    arrays: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fingerprint_extra: str = ""


@dataclass(frozen=True)
class Unreadable:
    name: str
    reason: str


class ImageSet:
    """One split, prepared: model-input images (uint8 H x W x 3) and class indices.

    Images are kept in memory when they fit (`cache`), otherwise decoded again on access.
    """

    def __init__(
        self,
        classes: list[str],
        entries: list[Entry],
        spec: InputSpec,
        arrays: np.ndarray | None,
        cached: list[np.ndarray] | None,
    ) -> None:
        self.classes = classes
        self.entries = entries
        self.spec = spec
        self._arrays = arrays
        self._cached = cached
        self.targets = np.array([entry.label for entry in entries], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def image(self, index: int) -> np.ndarray:
        if self._cached is not None:
            return self._cached[index]
        return _model_input(self.entries[index], self.spec, self._arrays)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.targets.tolist())
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}


@dataclass
class PreparedData:
    """The three splits, what could not be read, and a fingerprint of exactly what was used;
    `train_quality`: the photo-quality measures of the training images, for the model card's
    thresholds (`perito_core.quality.fit_thresholds`)."""

    classes: list[str]
    splits: dict[str, ImageSet]
    unreadable: list[Unreadable]
    skipped: list[tuple[str, str]]
    fingerprint: str
    train_quality: list[QualityMeasures] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """For the run folder and the model card."""
        return {
            "classes": self.classes,
            "fingerprint_sha256": self.fingerprint,
            "splits": {
                name: {"images": len(s), **s.class_counts()} for name, s in self.splits.items()
            },
            "unreadable": [{"image": u.name, "reason": u.reason} for u in self.unreadable],
            "skipped": [{"file": name, "reason": reason} for name, reason in self.skipped],
        }


def prepare_data(config: DataConfig, spec: InputSpec, *, threads: int = 4) -> PreparedData:
    """Find, split, decode and validate the images of `config` for a model taking `spec`."""
    catalog = discover(config)
    if len(catalog.classes) < 2:
        raise DatasetError(
            f"found {len(catalog.classes)} class(es); a classifier needs two or more"
        )
    split_indices = split_entries(catalog, config)
    splits: dict[str, ImageSet] = {}
    unreadable: list[Unreadable] = []
    digest = hashlib.sha256(catalog.fingerprint_extra.encode())
    cache = _should_cache(config, spec, sum(len(v) for v in split_indices.values()))
    train_quality: list[QualityMeasures] = []
    for split in SPLITS:
        entries = [catalog.entries[i] for i in split_indices[split]]
        images, hashes, failures, measures = _load_all(
            entries, spec, catalog.arrays, threads=threads
        )
        unreadable.extend(failures)
        if split == "train":
            train_quality = [m for m in measures if m is not None]
        kept = [
            (e, img, h)
            for e, img, h in zip(entries, images, hashes, strict=True)
            if img is not None
        ]
        for entry, _, file_hash in kept:
            digest.update(
                f"{split}\t{entry.name}\t{catalog.classes[entry.label]}\t{file_hash}\n".encode()
            )
        splits[split] = ImageSet(
            catalog.classes,
            [entry for entry, _, _ in kept],
            spec,
            catalog.arrays,
            [img for _, img, _ in kept if img is not None] if cache else None,
        )
    if len(splits["train"]) == 0:
        raise DatasetError("no readable training images")
    missing = [name for name, n in splits["train"].class_counts().items() if n == 0]
    if missing:
        raise DatasetError(f"no readable training images for class(es) {', '.join(missing)}")
    return PreparedData(
        catalog.classes, splits, unreadable, catalog.skipped, digest.hexdigest(), train_quality
    )


def discover(config: DataConfig) -> Catalog:
    """List the labelled images of a data source (nothing decoded yet)."""
    if config.kind == "fashion_mnist":
        return _fashion_mnist(config)
    if config.kind == "csv":
        return _from_csv(config)
    assert config.root is not None  # checked by DataConfig
    if not config.root.is_dir():
        raise DatasetError(f"data.root {config.root} is not a folder")
    # Split folders in any case: train/, TRAIN/, Train/ ...
    given = {p.name.lower(): p for p in config.root.iterdir() if p.is_dir()}
    roots: list[tuple[Path, str | None]] = [(config.root, None)]
    if "train" in given:
        roots = [(given[s], s) for s in SPLITS if s in given]
    if config.kind == "folders":
        return _from_folders(config, roots)
    return _from_suffixes(config, roots)


def image_files(folder: Path) -> list[Path]:
    """Every file under `folder` except obvious non-photos (`perito_core.jobs.sources.
    is_ignored_key`: hidden files, `Thumbs.db` ...), sorted. Whether a file is an image is
    decided by decoding it, never by its name: one that does not decode is listed as
    unreadable with its reason, as the serving code would refuse it."""
    return [
        path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not is_ignored_key(path.relative_to(folder).as_posix())
    ]


def _class_index(classes: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(classes)}


def _from_folders(config: DataConfig, roots: list[tuple[Path, str | None]]) -> Catalog:
    assert config.root is not None
    folders = sorted({p.name for root, _ in roots for p in root.iterdir() if p.is_dir()})
    found = sorted({config.rename.get(name, name) for name in folders})
    classes = config.classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"class folders {unknown} are not in data.classes {classes}")
    index = _class_index(classes)
    entries: list[Entry] = []
    for root, split in roots:
        for folder in folders:
            if not (root / folder).is_dir():
                continue
            label = index[config.rename.get(folder, folder)]
            for path in image_files(root / folder):
                rel = str(path.relative_to(config.root))
                entries.append(Entry(rel, label, path=path, split=split))
    return Catalog(classes, entries)


def _from_suffixes(config: DataConfig, roots: list[tuple[Path, str | None]]) -> Catalog:
    assert config.root is not None
    classes = config.classes or list(dict.fromkeys(config.suffixes.values()))
    index = _class_index(classes)
    missing = sorted(set(config.suffixes.values()) - set(classes))
    if missing:
        raise DatasetError(f"data.suffixes name classes {missing} that are not in data.classes")
    # Longest suffix first, so "NP" is not read as "P".
    suffixes = sorted(config.suffixes, key=len, reverse=True)
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for root, split in roots:
        for path in image_files(root):
            rel = str(path.relative_to(config.root))
            suffix = next((s for s in suffixes if path.stem.upper().endswith(s.upper())), None)
            if suffix is None:
                skipped.append((rel, f"file name does not end in one of {suffixes}"))
                continue
            entries.append(Entry(rel, index[config.suffixes[suffix]], path=path, split=split))
    return Catalog(classes, entries, skipped=skipped)


def _from_csv(config: DataConfig) -> Catalog:
    assert config.csv is not None
    base = config.root or config.csv.parent
    try:
        with config.csv.open(newline="") as file:
            rows = list(csv.DictReader(file))
    except OSError as exc:
        raise DatasetError(f"cannot read {config.csv}: {exc.strerror}") from None
    if not rows:
        raise DatasetError(f"{config.csv} has no rows")
    for column in (config.path_column, config.label_column):
        if column not in rows[0]:
            raise DatasetError(f"{config.csv} has no column {column!r} (it has {list(rows[0])})")
    raw_labels = (row[config.label_column].strip() for row in rows)
    labels = [config.rename.get(label, label) for label in raw_labels]
    classes = config.classes or sorted(set(labels) - {""})
    index = _class_index(classes)
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for line, (row, label) in enumerate(zip(rows, labels, strict=True), start=2):
        name = row[config.path_column].strip()
        if label not in index:
            skipped.append((f"{config.csv.name}:{line} {name}", f"label {label!r} is not a class"))
            continue
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            skipped.append((f"{config.csv.name}:{line} {name}", f"split {split!r} is not {SPLITS}"))
            continue
        path = Path(name) if Path(name).is_absolute() else base / name
        entries.append(Entry(name, index[label], path=path, split=split))
    if entries and any(e.split is None for e in entries) and any(e.split for e in entries):
        raise DatasetError(f"{config.csv}: give a split for every row or for none")
    return Catalog(classes, entries, skipped=skipped)


def _fashion_mnist(config: DataConfig) -> Catalog:
    root = config.root or FASHION_MNIST_DIR
    if not root.is_dir():
        raise DatasetError(
            f"Fashion-MNIST not found in {root}: apt-get install dataset-fashion-mnist"
        )
    train_images, train_labels = load_fashion_mnist("train", root)
    test_images, test_labels = load_fashion_mnist("test", root)
    arrays = np.concatenate([train_images, test_images])
    labels = np.concatenate([train_labels, test_labels])
    entries = [
        Entry(f"{split}/{row - offset:05d}", int(labels[row]), row=row, split=split)
        for split, offset, rows in (
            ("train", 0, range(len(train_images))),
            ("test", len(train_images), range(len(train_images), len(arrays))),
        )
        for row in rows
    ]
    digest = sha256_hex(arrays.tobytes() + labels.tobytes())
    return Catalog(list(FASHION_MNIST_LABELS), entries, arrays=arrays, fingerprint_extra=digest)


def split_entries(catalog: Catalog, config: DataConfig) -> dict[str, list[int]]:
    """Indices of each split: given ones kept, missing ones carved from train, stratified."""
    given: dict[str, list[int]] = {s: [] for s in SPLITS}
    unsplit: list[int] = []
    for i, entry in enumerate(catalog.entries):
        (given[entry.split] if entry.split else unsplit).append(i)
    if unsplit:
        given["train"].extend(unsplit)
    pool = given["train"]
    fractions = {
        "test": config.test_fraction if not given["test"] else 0.0,
        "val": config.val_fraction if not given["val"] else 0.0,
    }
    carved = stratified_split(
        [catalog.entries[i].label for i in pool], fractions, seed=config.split_seed
    )
    result = {
        "train": [pool[i] for i in carved["train"]],
        "val": given["val"] or [pool[i] for i in carved["val"]],
        "test": given["test"] or [pool[i] for i in carved["test"]],
    }
    if config.limit_per_class is not None:
        result = {
            split: _limit(indices, catalog, config.limit_per_class, config.split_seed)
            for split, indices in result.items()
        }
    return result


def stratified_split(
    labels: Iterable[int], fractions: dict[str, float], *, seed: int
) -> dict[str, list[int]]:
    """Split positions 0..N-1 so each class is shared out in the same proportions.

    Each class with at least three images gives at least one to every split whose fraction is
    positive. Deterministic for a given seed.
    """
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    for label in sorted(by_class):
        members = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        start = 0
        for name, fraction in fractions.items():
            take = round(len(members) * fraction)
            if fraction > 0 and take == 0 and len(members) >= 3:
                take = 1
            out[name].extend(members[start : start + take])
            start += take
        out["train"].extend(members[start:])
    return {name: sorted(positions) for name, positions in out.items()}


def _limit(indices: list[int], catalog: Catalog, limit: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    kept: list[int] = []
    counts: Counter[int] = Counter()
    for i in (indices[j] for j in rng.permutation(len(indices))):
        label = catalog.entries[i].label
        if counts[label] < limit:
            counts[label] += 1
            kept.append(i)
    return sorted(kept)


def _should_cache(config: DataConfig, spec: InputSpec, count: int) -> bool:
    if config.cache != "auto":
        return config.cache == "always"
    return count * spec.height * spec.width * 3 <= CACHE_AUTO_LIMIT_BYTES


def _model_input(entry: Entry, spec: InputSpec, arrays: np.ndarray | None) -> np.ndarray:
    """The uint8 H x W x 3 input serving would build from this image."""
    if entry.path is None:
        assert arrays is not None
        pixels = arrays[entry.row]
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        if pixels.shape[:2] == (spec.height, spec.width):
            return np.ascontiguousarray(pixels)
        return resize_for_model(Image.fromarray(pixels), spec)
    return load_model_input(entry.path.read_bytes(), spec, ImageLimits())


def _load_one(
    entry: Entry, spec: InputSpec, arrays: np.ndarray | None
) -> tuple[np.ndarray | None, str, QualityMeasures | None]:
    """(model input, content hash, photo-quality measures) or (None, reason it could not be
    read, None)."""
    side = min(spec.height, spec.width)
    if entry.path is None:
        assert arrays is not None
        pixels = arrays[entry.row]
        rgb = np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels
        return _model_input(entry, spec, arrays), str(entry.row), measure(rgb, side)
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror}", None
    try:
        image, info = load_model_input_with_info(data, spec, ImageLimits())
    except InvalidImage as exc:
        return None, exc.message, None
    return image, sha256_hex(data), info.quality


def _load_all(
    entries: list[Entry], spec: InputSpec, arrays: np.ndarray | None, *, threads: int
) -> tuple[list[np.ndarray | None], list[str], list[Unreadable], list[QualityMeasures | None]]:
    # PIL decodes with the GIL released: threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda e: _load_one(e, spec, arrays), entries, chunksize=64))
    images = [image for image, _, _ in results]
    hashes = [text if image is not None else "" for image, text, _ in results]
    failures = [
        Unreadable(entry.name, text)
        for entry, (image, text, _) in zip(entries, results, strict=True)
        if image is None
    ]
    return images, hashes, failures, [measures for _, _, measures in results]
