"""The documentation holds together: a short README, links and anchors that resolve, every page
reachable from the README, and code that cites only pages and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
FENCED = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)  # fenced code blocks
CODE = sorted(p for d in ("pipeline", "stages", "benchmarks", "tests") for p in (REPO / d).rglob("*.py"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (fenced code blocks skipped)."""
    text = FENCED.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def links(md_text: str) -> list[str]:
    """Targets of inline Markdown links and images, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", FENCED.sub("", md_text))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def broken(page: Path) -> list[str]:
    """The relative links of ``page`` whose file or heading does not exist."""
    bad = []
    for target in links(page.read_text()):
        if re.match(r"(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target} (no file)")
        elif anchor and (file.suffix != ".md" or anchor not in headings(file)):
            bad.append(f"{target} (no heading)")
    return bad


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_resolve(page):
    assert broken(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(README.read_text())}
    assert PAGES and [p.name for p in PAGES if p.resolve() not in linked] == []


def test_code_cites_nothing_outside_the_repository():
    pattern = re.compile(r"DESIGN §|\.\./shared|shared/DESIGN\.md")
    this = Path(__file__).resolve()
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in CODE if p.resolve() != this
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_code_citations_of_docs_resolve():
    """``docs/<page>.md#<anchor>`` and ``docs/<page>.md, "<Heading>"`` in Python files."""
    cite = re.compile(r'docs/([\w.-]+\.md)(?:#([\w-]+)|, "([^"]+)")?')
    bad = []
    for p in CODE:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            for name, anchor, heading in cite.findall(line):
                page = REPO / "docs" / name
                wanted = anchor or (slug(heading) if heading else "")
                if not page.exists() or (wanted and wanted not in headings(page)):
                    bad.append(f"{p.relative_to(REPO)}:{n}: docs/{name} {anchor or heading}")
    assert bad == []
