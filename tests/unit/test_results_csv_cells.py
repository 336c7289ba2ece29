"""results.csv cells a spreadsheet would run as formulas (OWASP "CSV Injection"): a file
named `=HYPERLINK("http://x").png` in a job's folder became a live formula in the id and uri
cells of the results a claims handler opens in a spreadsheet."""

from __future__ import annotations

import csv
import io

import pytest

from perito_core.jobs.results import spreadsheet_text


@pytest.mark.parametrize(
    "text",
    ['=HYPERLINK("http://x").png', "+1-555.jpg", "-2.png", "@SUM(A1).jpg", "\tx.jpg", "\rx"],
)
def test_a_cell_that_starts_as_a_formula_is_shown_as_text(text: str) -> None:
    cell = spreadsheet_text(text)
    assert cell == "'" + text
    buffer = io.StringIO()
    csv.writer(buffer).writerow([cell])
    assert next(csv.reader(io.StringIO(buffer.getvalue()))) == [cell]


@pytest.mark.parametrize("text", ["IMG_0001.jpg", "/data/a=b.jpg", "s3://b/k", "", "crack"])
def test_other_cells_are_left_as_they_are(text: str) -> None:
    assert spreadsheet_text(text) == text
