"""Every relative link in README.md and docs/*.md points at a file that exists, and every #anchor at a heading of it.

Markdown links `[text](target)` and images `![alt](target)` are checked; web links (`http...`, `mailto:`) are not.
Anchors follow GitHub's rule: the heading lowercased, punctuation other than `-` and `_` dropped, spaces made `-`.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_relative_links_resolve():
    bad = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_checker_sees_links():
    """The pattern must find the README's links, or the test above would pass on nothing."""
    targets = _links(REPO / "README.md")
    assert "docs/results.md" in targets and any(t.endswith(".png") for t in targets)
    assert "the-tiny-worlds-two-jobs" in _anchors(REPO / "docs" / "train_sft.md")
