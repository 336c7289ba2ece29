"""The README and the docs site: every relative link lands on a page and heading that exist.

`make lint` builds the site with `mkdocs build --strict`, which refuses the same broken links
inside `docs/`; this test also covers the README (which the site does not build) and fails
fast, without MkDocs.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# [text](target), the target without spaces; images and links alike.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """A heading's anchor as Python-Markdown's toc (MkDocs) and GitHub both write it for our
    headings: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    return {
        _slug(match.group(1))
        for line in _prose(page.read_text())
        if (match := _HEADING.match(line)) is not None
    }


def _links(page: Path) -> list[str]:
    return [target for line in _prose(page.read_text()) for target in _LINK.findall(line)]


def _broken(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` whose file, or heading within it, does not exist, with the
    linked path relative to `root`."""
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file():
            broken.append(f"{target}: no file {linked.relative_to(root)}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading '#{anchor}' in {linked.relative_to(root)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_lands(page: Path) -> None:
    assert _broken(page) == []


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(ROOT / "README.md")}
    missing = [page.name for page in DOCS.glob("*.md") if page.resolve() not in linked]
    assert missing == [], "the README's table of pages should list these"


def test_the_readme_stays_an_overview() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move detail to a page under docs/"


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    return []


def test_the_site_nav_lists_every_page_once() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(page.name for page in DOCS.glob("*.md"))
    assert config["strict"] is True


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The checker itself: a missing page and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#real-heading) [gone](missing.md) [typo](other.md#real-headin)\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    assert _broken(page, root=tmp_path.resolve()) == [
        "missing.md: no file missing.md",
        "other.md#real-headin: no heading '#real-headin' in other.md",
    ]
