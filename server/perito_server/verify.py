"""`perito verify`: prove, later, that logged answers came from the recorded bytes and model.

For each answer of a prediction log (a records file, or a whole log prefix) or of a bulk job's
`results.jsonl` (its images from `--images DIR`), three checks, each reported when it fails:

1. **input**: the stored image's bytes hash to the recorded `input_sha256` (a swapped image);
2. **artifact**: the registry's version still has the recorded artifact sha256 and form files,
   and the stored files hash to them (a replaced artifact: re-downloaded into a fresh cache,
   never trusted from one);
3. **answer** (a sample): the recorded version and form, loaded exactly (the form's own
   precision), classify the image again: the top-1 label must be the recorded one and its
   probability within `TOLERANCE[precision]` of it.

Refusals are checked for their input only. The report is one row per image, and `ok` only when
every check passed.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perito_core.digests import sha256_hex
from perito_core.errors import InvalidArgument, NotFound, PeritoError
from perito_core.imaging import ImageLimits, load_model_input_with_info
from perito_core.models.engines.base import LoadedModel
from perito_core.models.registry import ModelRegistry
from perito_core.prediction_log import RECORDS, read_events, record_hour
from perito_core.storage import ObjectStore, S3Options, open_store

# How far a re-computed top-1 probability may be from the recorded one, by the form's
# precision (the last part of its name): the same form on another CPU (another instruction
# set's kernels) or batch differs by rounding only. results.jsonl rounds to 6 decimals.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 2e-2, "int8": 2e-2}
DEFAULT_SAMPLE = 1000


@dataclass
class Item:
    """One answered (or refused) image to check."""

    where: str  # the record's id and image index, or the results line
    image: str  # the caller's id for the image
    model: str
    version: str
    form: str
    input_sha256: str
    read_input: Callable[[], bytes | None]
    provenance: dict[str, Any]
    top1: tuple[str, float] | None  # None: refused
    pixels: list[int] | None = None
    problems: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "image": self.image,
            "model": self.model,
            "version": self.version,
            "form": self.form,
            "input_sha256": self.input_sha256,
            "checks": self.checks,
            "problems": self.problems,
            "ok": not self.problems,
        }


def _get(mapping: dict[str, Any], snake: str) -> Any:
    """A field of a JSON message by its proto name or its lowerCamelCase JSON name."""
    if snake in mapping:
        return mapping[snake]
    head, *rest = snake.split("_")
    return mapping.get(head + "".join(part.title() for part in rest))


def _top1(result: dict[str, Any]) -> tuple[str, float] | None:
    predictions = result.get("predictions") or []
    if not predictions:
        return None
    return str(predictions[0].get("label", "")), float(predictions[0].get("probability", 0.0))


def _reader(store: ObjectStore, key: str) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        try:
            return store.read_bytes(key)
        except NotFound:
            return None

    return read


def _file_reader(path: Path) -> Callable[[], bytes | None]:
    return lambda: path.read_bytes() if path.is_file() else None


def items_of_events(events: Iterator[dict[str, Any]], store: ObjectStore) -> Iterator[Item]:
    """The images of prediction-log events, their inputs read from `store` (the log)."""
    for event in events:
        data = event.get("data") or {}
        inputs = data.get("inputs") or []
        answer = data.get("answer") or {}
        results = answer.get("results") or []
        for index, ref in enumerate(inputs):
            result = results[index] if index < len(results) else {}
            provenance = _get(result, "provenance") or {}
            yield Item(
                where=f"{event.get('id', '?')}[{index}]",
                image=str(ref.get("id", index)),
                model=str(_get(provenance, "model") or data.get("model", "")),
                version=str(
                    _get(provenance, "model_version") or _get(answer, "model_version") or ""
                ),
                form=str(_get(provenance, "form") or result.get("form") or ""),
                input_sha256=str(ref.get("sha256", "")),
                read_input=_reader(store, str(ref.get("key", ""))),
                provenance=provenance,
                top1=_top1(result) if data.get("outcome") == "OK" else None,
                pixels=ref.get("pixels"),
            )


def items_of_results(path: Path, images: Path) -> Iterator[Item]:
    """The answered items of a bulk job's `results.jsonl`, their images under `images` (by
    the item's id, a path relative to the job's input, else the file name of its URI)."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("state") not in (None, "succeeded", "SUCCEEDED") or row.get("error"):
            continue
        provenance = _get(row, "provenance") or {}
        image_id = str(row.get("id") or "")
        candidates = [images / image_id] if image_id else []
        candidates.append(images / str(row.get("uri", "")).rpartition("/")[2])
        local = next((c for c in candidates if c.is_file()), candidates[0])
        yield Item(
            where=f"{path.name}:{number}",
            image=image_id or str(row.get("uri", "")),
            model=str(_get(provenance, "model") or row.get("model", "")),
            version=str(_get(provenance, "model_version") or row.get("model_version", "")),
            form=str(_get(provenance, "form") or row.get("form") or ""),
            input_sha256=str(_get(provenance, "input_sha256") or ""),
            read_input=_file_reader(local),
            provenance=provenance,
            top1=_top1(row),
        )


def load_items(source: str, images: Path | None, log: str | None, s3: S3Options) -> list[Item]:
    """Every image `source` names: a log prefix (a folder or `s3://`, holding `records/`),
    one records file (its log: `log`, else the folder five levels above it), or a
    `results.jsonl` (with `images`).

    Raises:
        InvalidArgument: a source that is none of these, or a results file without `images`.
    """
    local = Path(source)
    if source[:5].lower() == "s3://" or local.is_dir():
        store = open_store(source, s3)
        keys = [key for key in store.list_keys(RECORDS) if record_hour(key) is not None]
        items: list[Item] = []
        for key in keys:
            items += items_of_events(read_events(store.read_bytes(key).decode()), store)
        return items
    if not local.is_file():
        raise InvalidArgument(f"{source}: no such file or folder")
    text = local.read_text()
    first = next((line for line in text.splitlines() if line.strip()), "{}")
    if "specversion" in json.loads(first):
        prefix = log or str(local.resolve().parents[5])
        return list(items_of_events(read_events(text), open_store(prefix, s3)))
    if images is None:
        raise InvalidArgument(f"{source} is a job's results file: name its images with --images")
    return list(items_of_results(local, images))


def _precision(form: str) -> str:
    return form.rpartition("-")[2]


class Verifier:
    """The checks, with the registry read into a fresh cache (so every stored file is
    downloaded and hashed again) and each (version, form) loaded once."""

    def __init__(self, registry_uri: str, s3: S3Options, cache_dir: Path) -> None:
        self.registry = ModelRegistry.open(registry_uri, cache_dir=cache_dir, s3=s3)
        self._artifacts: dict[tuple[str, str, str], list[str]] = {}
        self._models: dict[tuple[str, str, str], LoadedModel | str] = {}

    def check_input(self, item: Item) -> bytes | None:
        content = item.read_input()
        if content is None:
            item.checks["input"] = "missing"
            item.problems.append("input: the stored image is missing")
            return None
        actual = sha256_hex(content)
        recorded = item.input_sha256 or str(_get(item.provenance, "input_sha256") or "")
        provenance_sha = _get(item.provenance, "input_sha256")
        if not recorded or actual != recorded or (provenance_sha and provenance_sha != recorded):
            item.checks["input"] = "mismatch"
            item.problems.append(
                f"input: the image's sha256 is {actual[:16]}…, the record says "
                f"{(recorded or 'nothing')[:16]}… (a swapped image)"
            )
            return None
        item.checks["input"] = "ok"
        return content

    def check_artifact(self, item: Item) -> bool:
        key = (item.model, item.version, item.form)
        if key not in self._artifacts:
            self._artifacts[key] = self._artifact_problems(item)
        problems = self._artifacts[key]
        item.checks["artifact"] = "mismatch" if problems else "ok"
        item.problems += problems
        return not problems

    def _artifact_problems(self, item: Item) -> list[str]:
        label = f"{item.model}@{item.version}"
        try:
            manifest = self.registry.manifest(item.model, item.version)
        except PeritoError as error:
            return [f"artifact: {label}: {error.message}"]
        problems = []
        recorded = _get(item.provenance, "artifact_sha256")
        if recorded and recorded != manifest.artifact.sha256:
            problems.append(
                f"artifact: {label}'s manifest says sha256 {manifest.artifact.sha256[:16]}…, the "
                f"answer was given by {recorded[:16]}…"
            )
        try:
            self.registry.fetch(item.model, item.version)
        except PeritoError as error:
            problems.append(f"artifact: {error.message}")
        form = manifest.form(item.form) if item.form else None
        if form is not None:
            listed = {entry.file: entry.sha256 for entry in form.files}
            for entry in _get(item.provenance, "form_files") or []:
                if listed.get(entry.get("file")) != entry.get("sha256"):
                    problems.append(
                        f"artifact: {label} {item.form} file {entry.get('file')}: sha256 "
                        "differs from the one recorded"
                    )
            try:
                self.registry.fetch_form(manifest, item.form)
            except PeritoError as error:
                problems.append(f"artifact: {error.message}")
        return problems

    def _model(self, item: Item) -> LoadedModel | str:
        """The recorded form of the version, loaded; or why it cannot be."""
        from perito_core.models.selection import load_form, load_model, reference_form

        key = (item.model, item.version, item.form)
        if key in self._models:
            return self._models[key]
        try:
            manifest = self.registry.manifest(item.model, item.version)
            if not item.form or item.form == reference_form(manifest):
                precision = "auto" if manifest.artifact.format == "onnx" else "torchscript"
                model = load_model(
                    self.registry,
                    item.model,
                    item.version,
                    precision=precision,
                    device="cpu",
                    optimize=False,
                )
            else:
                form = manifest.form(item.form)
                if form is None:
                    raise NotFound(f"{item.model}@{item.version} has no form {item.form!r}")
                model = load_form(self.registry, manifest, form)
            loaded: LoadedModel | str = model
        except PeritoError as error:
            loaded = error.message
        self._models[key] = loaded
        return loaded

    def check_answer(self, item: Item, content: bytes) -> None:
        if item.top1 is None:
            item.checks["answer"] = "refused"
            return
        model = self._model(item)
        if isinstance(model, str):
            item.checks["answer"] = "not run"
            item.problems.append(f"answer: cannot load {item.form or 'the reference'}: {model}")
            return
        manifest = model.manifest
        spec = manifest.input.spec()
        if item.pixels is not None:
            pixels = np.frombuffer(content, np.uint8).reshape(item.pixels)
        else:
            pixels, _ = load_model_input_with_info(content, spec, ImageLimits())
        probabilities = model.predict(pixels[None])[0]
        top = int(np.argmax(probabilities))
        label, probability = manifest.labels[top], float(probabilities[top])
        want_label, want_probability = item.top1
        tolerance = TOLERANCE.get(_precision(model.form), TOLERANCE["fp32"])
        if label != want_label:
            item.checks["answer"] = "mismatch"
            item.problems.append(
                f"answer: {model.form} says {label} {probability:.4f}; the record says "
                f"{want_label} {want_probability:.4f}"
            )
        elif abs(probability - want_probability) > tolerance:
            item.checks["answer"] = "mismatch"
            item.problems.append(
                f"answer: {model.form} gives {label} {probability:.6f}; the record says "
                f"{want_probability:.6f} (tolerance {tolerance:g})"
            )
        else:
            item.checks["answer"] = "ok"


def verify(
    items: list[Item], registry_uri: str, s3: S3Options, *, sample: int, seed: int = 0
) -> list[Item]:
    """Run every check on `items` (the answer check on `sample` of them, chosen at random
    with `seed`), in place; returns them."""
    answered = [i for i, item in enumerate(items) if item.top1 is not None]
    chosen = set(
        answered if len(answered) <= sample else random.Random(seed).sample(answered, sample)
    )
    with tempfile.TemporaryDirectory(prefix="perito-verify-") as cache:
        verifier = Verifier(registry_uri, s3, Path(cache))
        for index, item in enumerate(items):
            content = verifier.check_input(item)
            if item.top1 is None:
                item.checks["answer"] = "refused"
                continue
            artifact_ok = verifier.check_artifact(item)
            if index not in chosen:
                item.checks["answer"] = "not sampled"
            elif content is None or not artifact_ok:
                item.checks["answer"] = "not run"
            else:
                verifier.check_answer(item, content)
    return items


def table(items: list[Item]) -> str:
    """The report as text: one row per image, its problems below it, and a summary."""
    rows = [("WHERE", "IMAGE", "MODEL", "FORM", "INPUT", "ARTIFACT", "ANSWER")]
    notes: dict[int, list[str]] = {}
    for item in items:
        rows.append(
            (
                item.where,
                item.image[:40],
                f"{item.model}@{item.version}" if item.version else item.model or "-",
                item.form or "-",
                item.checks.get("input", "-"),
                item.checks.get("artifact", "-"),
                item.checks.get("answer", "-"),
            )
        )
        if item.problems:
            notes[len(rows) - 1] = item.problems
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        lines += [f"    ! {problem}" for problem in notes.get(number, [])]
    bad = sum(1 for item in items if item.problems)
    lines.append(
        f"{len(items)} images checked: "
        + (f"{bad} with mismatches" if bad else "every check passed")
    )
    return "\n".join(lines)
