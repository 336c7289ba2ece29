"""docs/architecture.md draws the import-linter contracts as its arrows: each contract in
`.importlinter` has its row on the page and each row on the page is a contract, so the page
cannot describe boundaries that `lint-imports` does not check (or miss one it does)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_architecture_page_lists_exactly_the_import_contracts() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    contracts = {
        section.removeprefix("importlinter:contract:")
        for section in config.sections()
        if section.startswith("importlinter:contract:")
    }
    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = set(re.findall(r"^\| `([a-z-]+)` \|", page, flags=re.MULTILINE))
    assert contracts, "no contracts read from .importlinter"
    assert rows == contracts
    drawn = set(re.findall(r"\[([a-z]+(?:-[a-z]+)+)", page))
    assert drawn <= contracts, f"the diagram names what is not a contract: {drawn - contracts}"
