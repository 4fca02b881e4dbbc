"""Every relative link in README.md and docs/**/*.md resolves: the file (or folder) exists, and a
``#anchor`` names a heading of the target page, spelled the way GitHub derives heading anchors.
Links inside code (fenced blocks, inline backticks) are not links and are not checked; web links
(``http://``, ``https://``, ``mailto:``) are left to the reader: no network here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # docs/records/ too

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target  (reference-style definitions)
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The (line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for ``path``'s headings (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """The (line number, target) of every link in ``path`` outside code."""
    out = []
    for number, line in prose_lines(path):
        text = INLINE_CODE.sub("", line)
        out += [(number, m.group(1)) for m in LINK.finditer(text)]
        ref = REF_DEF.match(text)
        if ref:
            out.append((number, ref.group(1)))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link of ``path`` that does not resolve, naming the line and what is missing
    (paths shown relative to ``root``)."""
    problems = []
    for number, target in links(path):
        if not target or target.startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: ({target})"
        if not dest.exists():
            problems.append(
                f"{where} {dest.relative_to(root) if dest.is_relative_to(root) else dest} does not exist"
            )
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where} {dest.name} has no heading with the anchor #{anchor}")
    return problems


def test_slug_follows_github() -> None:
    assert slug("Disk estimate (`tipsdistill-cache --estimate`, `cache/estimate.py`)") == (
        "disk-estimate-tipsdistill-cache---estimate-cacheestimatepy"
    )
    assert slug("4.1 The demo's settings: seeds") == "41-the-demos-settings-seeds"
    assert slug("Honest resumes (issue 27)") == "honest-resumes-issue-27"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor and a link in code (ignored)."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#a-section) [ok2](other.md#a-section-1) [self](#page)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) `[code](missing2.md)`\n"
        "```\n[fenced](missing3.md)\n```\n[web](https://example.com/x.md)\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md does not exist" in problems[0]
    assert "#nowhere" in problems[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = broken_links(page)
    assert not problems, "broken links (fix the path or the anchor):\n" + "\n".join(problems)
