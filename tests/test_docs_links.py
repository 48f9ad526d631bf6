"""Every relative link of README.md and docs/ resolves: the file exists, and a ``#anchor`` is one of its headings.

Anchors follow GitHub's rule for headings: the heading's text as rendered (inline code, emphasis and link targets
dropped), lowercased, every character that is not a letter, digit, space, ``-`` or ``_`` removed, spaces turned
into ``-``; a repeated heading gets ``-1``, ``-2``, ... An HTML ``id`` or ``name`` attribute is an anchor too.
Links inside code (fenced blocks and inline spans) are text, not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

PROJECT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<[a-zA-Z][^>]*\s(?:id|name)=[\"']([^\"']+)[\"']")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    """The pages checked: README.md and every markdown file under docs/."""
    return [PROJECT / "README.md", *sorted((PROJECT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], ""
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = ""
            continue
        if opened:
            fence = opened.group(1)
            continue
        lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's markdown text (before de-duplication)."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link to ``path`` may name."""
    found, seen = set(), {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image of ``path`` outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        found += [(number, target) for target in LINK.findall(line)]
        reference = REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """``file:line: target: why`` for every relative link of ``path`` that does not resolve."""
    problems = []
    for number, target in links(path):
        if not target or SCHEME.match(target):
            continue  # an absolute URL (https:, mailto:) is not checked here
        file_part, _, anchor = target.partition("#")
        shown = path.relative_to(PROJECT).as_posix() if path.is_relative_to(PROJECT) else path.name
        where = f"{shown}:{number}: {target}"
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{where}: no such file {destination}")
        elif anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination):
            problems.append(f"{where}: {destination.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(PROJECT).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_pages_link_to_each_other():
    """README and docs/ are checked, and they hold links (a checker that found none would pass anything)."""
    assert (PROJECT / "README.md") in pages() and len(pages()) > 5
    assert any(target.startswith("docs/") for _, target in links(PROJECT / "README.md"))


def test_the_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text(
        "# Other page\n\n## `sweep`: a grid of runs\n\n## Notes\n\n## Notes\n\n"
        '### What *the* [chain](x.md) guarantees\n<a id="custom"></a>\n'
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Same page, twice\n\n"
        "Good: [other](docs/other.md), [sweep](docs/other.md#sweep-a-grid-of-runs), [second](docs/other.md#notes-1),\n"
        "[chain](docs/other.md#what-the-chain-guarantees), [custom](docs/other.md#custom), [here](#same-page-twice),\n"
        '[web](https://example.org/missing.md), ![image](docs/other.md), [titled](docs/other.md "a title").\n'
        "Broken: [gone](docs/gone.md), [anchor](docs/other.md#nowhere), [third](docs/other.md#notes-2),\n"
        "[local](#nowhere-here).\n\n"
        "```\n[in a code block](docs/gone-too.md)\n```\n\n"
        "Inline code is text: `[x](docs/gone-three.md)`.\n\n"
        "[ref]: docs/missing-reference.md\n"
    )
    problems = broken_links(page)
    assert [p.split(": ")[1] for p in problems] == [
        "docs/gone.md",
        "docs/other.md#nowhere",
        "docs/other.md#notes-2",
        "#nowhere-here",
        "docs/missing-reference.md",
    ], problems
    assert "no such file" in problems[0] and "has no heading with the anchor #nowhere" in problems[1]


def test_slugs_follow_githubs_rule():
    assert slug("What the manifest chain guarantees") == "what-the-manifest-chain-guarantees"
    assert slug("`sweep`: a grid of runs") == "sweep-a-grid-of-runs"
    assert slug("Export, engine and edge runtime") == "export-engine-and-edge-runtime"
    assert slug("Step overhead on GPUs") == "step-overhead-on-gpus"
    assert slug("Any timm or torchvision model") == "any-timm-or-torchvision-model"
    assert slug("Datasets & presets (v2)") == "datasets--presets-v2"
    assert slug("training.amp: bf16") == "trainingamp-bf16"
    assert slug("snake_case stays") == "snake_case-stays"
