"""The confusion heat map both the trainer's report and `perito models compare` draw.

matplotlib is imported when a plot is asked for (the `serve` and `train` extras declare it),
with the Agg backend: files only, no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def confusion_heatmap(
    counts: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    colorbar: str,
    dpi: int = 100,
) -> Path:
    """Write `counts` as a heat map PNG at `path`: each cell's count written in it and
    coloured by its share of the row.

    Args:
        counts: int image counts [len(rows), len(columns)].
        rows, columns: the labels of the rows (y axis) and columns (x axis).
        xlabel, ylabel, title, colorbar: the axes', figure's and colour bar's captions.
        dpi: dots per inch; the figure is 0.6 inch a label on its longer side plus 3 x 2
            inches of margins (at least 4 labels' worth).

    Raises:
        RuntimeError: matplotlib is not installed.
        OSError: `path` cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - declared by the extras that plot
        raise RuntimeError(f"plotting needs matplotlib ({error})") from None
    counts = np.asarray(counts, dtype=np.int64).reshape(len(rows), len(columns))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    side = max(4, len(rows), len(columns))
    figure, axes = plt.subplots(figsize=(side * 0.6 + 3, side * 0.6 + 2), dpi=dpi)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    figure.colorbar(image, ax=axes, label=colorbar)
    axes.set_xticks(range(len(columns)), list(columns), rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), list(rows))
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    for i in range(len(rows)):
        for j in range(len(columns)):
            colour = "white" if shares[i, j] > 0.5 else "black"
            axes.text(j, i, f"{counts[i, j]:,}", ha="center", va="center", fontsize=8, color=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
