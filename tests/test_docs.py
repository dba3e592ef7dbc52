"""The README and docs/ stay true to the tree: docs/configuration.md is what the schema renders, every relative link
(and #anchor) in README.md and docs/*.md reaches a file (and a heading), and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sft.config.docs import COMMAND, render

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _links(text: str) -> list[str]:
    return _LINK.findall(_FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but - and _ dropped, spaces to -, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _FENCE.sub("", text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_configuration_page_is_generated_from_the_schema():
    page = REPO / "docs" / "configuration.md"
    assert page.is_file(), f"docs/configuration.md is missing; write it with `{COMMAND}`"
    assert page.read_text() == render(), (
        f"docs/configuration.md differs from the config schema's field docs (sft/config/schema.py) or the shipped "
        f"configs' header comments; regenerate it with `{COMMAND}` and commit the result")


def test_configuration_page_names_every_key():
    import dataclasses
    import typing

    from sft.config.schema import RunConfig

    text = render()
    for section, cls in typing.get_type_hints(RunConfig).items():
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in text, f"{section}.{f.name} is not in docs/configuration.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n  " + "\n  ".join(broken)


def test_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move reference and measurements into docs/")


def test_link_checker_sees_what_it_should():
    """The checks above would pass on an empty list: the parser finds links, skips code and builds GitHub's ids."""
    text = "# A `b` (c)\n\n[x](docs/a.md#a-b-c) ![i](p.png)\n```\n[not](a link)\n[no](t.md)\n```\n## A b c\n"
    assert _links(text) == ["docs/a.md#a-b-c", "p.png"]
    assert _anchors(text) == {"a-b-c", "a-b-c-1"}
    assert len(_links((REPO / "README.md").read_text())) >= 10
