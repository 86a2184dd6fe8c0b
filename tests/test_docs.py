"""The front door's links: every relative link of README.md names a file of the repository (the docs site itself is
built with mkdocs build --strict by make test, which checks the links and anchors inside docs/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_readme_links_name_files_that_exist():
    links = [match.group(1) for match in LINK.finditer((ROOT / "README.md").read_text())]
    relative = [link for link in links if "://" not in link]
    assert len(relative) >= 6, relative  # the front door points into docs/
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, missing


def test_every_docs_page_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    assert pages and all(f": {page}" in nav for page in pages), pages
