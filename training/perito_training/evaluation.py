"""Evaluate an exported model: on a prepared split, or on any folder of images.

Both run the TorchScript artifact itself, on images prepared by the serving code, so the
figures are those of what gets published, not of the training-time module.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perito_core.errors import InvalidImage
from perito_core.imaging import ImageLimits, InputSpec, load_model_input
from perito_training import plots
from perito_training.datasets import ImageSet, image_files
from perito_training.metrics import classification_report


@torch.no_grad()
def predict_probabilities(
    module: torch.nn.Module, images: ImageSet, batch_size: int = 256
) -> np.ndarray:
    """Probabilities from the exported module (uint8 NCHW in) for every image, in order."""
    outputs = [module(batch).float() for batch in image_batches(images, batch_size)]
    if not outputs:
        return np.zeros((0, len(images.classes)), dtype=np.float32)
    return torch.cat(outputs).numpy()


def image_batches(images: ImageSet, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches of `images`, in order: what the exported module takes."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        stacked = np.stack([images.image(i) for i in range(start, stop)])
        yield torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def load_module(path: Path) -> torch.jit.ScriptModule:
    """The exported TorchScript module, on the CPU."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is the artifact format (model.pt).
        warnings.simplefilter("ignore", FutureWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module.eval()


def write_predictions(
    path: Path,
    names: list[str],
    targets: np.ndarray | None,
    probabilities: np.ndarray,
    labels: list[str],
) -> Path:
    """One CSV row per image: its top-3 classes and probabilities (and the truth, if known)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        header = ["image"] + (["label", "correct"] if targets is not None else [])
        header += [f"{kind}_{rank}" for rank in (1, 2, 3) for kind in ("class", "probability")]
        writer.writerow(header)
        for i, name in enumerate(names):
            ranked = np.argsort(-probabilities[i], kind="stable")[:3]
            row: list[Any] = [name]
            if targets is not None:
                row += [labels[targets[i]], bool(ranked[0] == targets[i])]
            for c in ranked:
                row += [labels[c], f"{probabilities[i, c]:.6f}"]
            writer.writerow(row)
    return path


@dataclass
class FolderPrediction:
    image: str
    label: str | None
    probabilities: np.ndarray | None = None
    error: str | None = None


def evaluate_folder(
    module: torch.nn.Module,
    labels: list[str],
    spec: InputSpec,
    folder: Path,
    out_dir: Path,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Top-3 for every image under `folder`; metrics too when it has a subfolder per class.

    Writes `predictions.csv` and `evaluation.json` (and `confusion_matrix.png` when labelled)
    to `out_dir`. An unreadable image is listed with its reason, not fatal.
    """
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no files under {folder}")
    known = set(labels)
    results: list[FolderPrediction] = []
    pending: list[tuple[FolderPrediction, np.ndarray]] = []

    def flush() -> None:
        if pending:
            stacked = np.stack([pixels for _, pixels in pending])
            batch = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
            with torch.no_grad():
                probabilities = module(batch).float().numpy()
            for (result, _), row in zip(pending, probabilities, strict=True):
                result.probabilities = row
            pending.clear()

    for path in files:
        rel = path.relative_to(folder)
        parent = rel.parts[0] if len(rel.parts) > 1 else None
        result = FolderPrediction(str(rel), parent if parent in known else None)
        results.append(result)
        try:
            pending.append((result, load_model_input(path.read_bytes(), spec, ImageLimits())))
        except InvalidImage as exc:
            result.error = exc.message
        except OSError as exc:
            result.error = f"cannot read the file: {exc.strerror}"
        if len(pending) >= batch_size:
            flush()
    flush()

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_folder_predictions(out_dir / "predictions.csv", results, labels)
    summary: dict[str, Any] = {
        "images": len(results),
        "classified": sum(r.probabilities is not None for r in results),
        "unreadable": [{"image": r.image, "reason": r.error} for r in results if r.error],
        "predictions": str(out_dir / "predictions.csv"),
    }
    scored = [r for r in results if r.label is not None and r.probabilities is not None]
    if scored:
        index = {label: i for i, label in enumerate(labels)}
        targets = np.array([index[str(r.label)] for r in scored])
        probabilities = np.stack([r.probabilities for r in scored if r.probabilities is not None])
        report = classification_report(targets, probabilities, labels)
        summary["metrics"] = report
        plots.confusion_matrix(
            report["confusion_matrix"]["matrix"], labels, out_dir / "confusion_matrix.png"
        )
    (out_dir / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_folder_predictions(
    path: Path, results: list[FolderPrediction], labels: list[str]
) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        header = ["image", "label"]
        header += [f"{kind}_{rank}" for rank in (1, 2, 3) for kind in ("class", "probability")]
        writer.writerow([*header, "error"])
        for result in results:
            cells: list[Any] = [result.image, result.label or ""]
            if result.probabilities is not None:
                ranked = np.argsort(-result.probabilities, kind="stable")[:3]
                for c in ranked:
                    cells += [labels[c], f"{result.probabilities[c]:.6f}"]
            cells += [""] * (8 - len(cells))
            writer.writerow([*cells, result.error or ""])
