"""README.md, docs/ and the notes beside results: every relative link and image points at a file of the repository
(and at a heading there)."""

from __future__ import annotations

import os
import re

import pytest

from conftest import ROOT

PAGES = sorted(os.path.relpath(os.path.join(d, f), ROOT) for top in ("docs", "results", "benchmarks", "weights")
               for d, _, names in os.walk(os.path.join(ROOT, top)) for f in names if f.endswith(".md")) + ["README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def anchors(path: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    with open(path) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(page: str) -> list[str]:
    with open(os.path.join(ROOT, page)) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # code blocks hold no links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full) or not full.startswith(ROOT):
            broken.append(target)
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page}: {broken_links(page)}"


def test_the_check_finds_a_broken_link(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "a.md").write_text("# Top\n[ok](a.md#top) [gone](missing.png) [bad anchor](#nowhere) "
                                   "[web](https://x.org)\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert broken_links("a.md") == ["missing.png", "#nowhere"]
