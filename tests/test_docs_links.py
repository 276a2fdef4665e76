"""Every relative link in README.md and docs/*.md leads to a file that exists, and every
`#anchor` to a heading of its target, as GitHub renders them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the text may hold inline code, the target no spaces.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto: ...


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code."""
    found = []
    for number, line in prose_lines(text):
        # Inline code cannot hold a link; blank it so `[x](y)` examples are not checked, keeping
        # the link text itself (which may contain inline code) parseable.
        bare = _INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)
        for match in _LINK.finditer(bare):
            start, end = match.span(1)
            found.append((number, line[start:end]))
    return found


def broken_links(path: Path) -> list[str]:
    """One sentence per relative link of `path` that does not resolve."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for number, target in links(text):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} points to a missing file")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where} has an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where} names no heading of {dest.name}")
    return problems


def test_github_slug_matches_github() -> None:
    # GitHub's slugger drops punctuation and turns each space into a hyphen, so " / " gives "--".
    assert github_slug("Fast on a CPU: the feature cache") == "fast-on-a-cpu-the-feature-cache"
    assert (
        github_slug('Knowing when not to answer: refer, and "not like the training images"')
        == "knowing-when-not-to-answer-refer-and-not-like-the-training-images"
    )
    assert github_slug("`histolens export` and int8") == "histolens-export-and-int8"
    assert github_slug("Export to ONNX / OpenVINO") == "export-to-onnx--openvino"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#a-section) [ok too](other.md#a-section-1) [self](#page)\n"
        "[gone](missing.md) [bad anchor](other.md#nothing) [web](https://example.org)\n"
        "`[code](not-a-link.md)`\n"
        "```\n[fenced](not-a-link-either.md)\n```\n"
    )
    problems = broken_links(page)
    assert problems == [
        "page.md:4: missing.md points to a missing file",
        "page.md:4: other.md#nothing names no heading of other.md",
    ]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_docs_exist() -> None:
    assert (ROOT / "docs" / "README.md").exists()
    assert len(DOCS) > 2
