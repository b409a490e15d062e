"""The README and docs/ link only to files the repository has; code cites only pages it has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED = re.compile(r"docs/[\w/-]+\.md")
CODE = [
    path
    for folder in ("src", "conf", "scripts")
    for path in sorted((ROOT / folder).rglob("*"))
    if path.suffix in {".py", ".yaml", ".sh"}
] + [ROOT / "train.py", ROOT / "eval.py"]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(page: Path) -> list[str]:
    lines = page.read_text().splitlines()
    fenced, found = False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    return found


def test_slug_matches_githubs_anchors():
    assert slug("Result: Qwen2.5-Coder-0.5B-Instruct on three-operand arithmetic") == (
        "result-qwen25-coder-05b-instruct-on-three-operand-arithmetic"
    )
    assert (
        slug("Explain a reward: `python -m covo.score`") == "explain-a-reward-python--m-covoscore"
    )


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert relative_links(page) or page.name != "README.md"  # the front page links its docs
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in {slug(h) for h in headings(resolved)}, f"{page.name}: {target}"


def test_code_cites_pages_and_sections_that_exist():
    cited = 0
    for path in CODE:
        text = path.read_text()
        for match in CITED.finditer(text):
            cited += 1
            page = ROOT / match.group()
            assert page.exists(), f"{path.relative_to(ROOT)}: {match.group()}"
            # "docs/covo.md, Steps and states": the section named after the comma is a heading
            after = " ".join(text[match.end() :].replace("#", " ").split())
            if after.startswith(", ") and after[2:3].isupper() or after.startswith(', "'):
                name = after[2:].lstrip('"')
                assert any(name.startswith(h) for h in headings(page)), (
                    f"{path.relative_to(ROOT)}: {match.group()}, {name[:50]}"
                )
    assert cited > 0


def test_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size <= 16_000


def config_groups_table(page: Path) -> dict[str, str]:
    """The rows of the page's "Config groups" table: group name -> the row's text."""
    section = page.read_text().split("\n## Config groups\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in {"group", ""} and set(cells[0]) != {"-"}:
            rows[cells[0].split(" (")[0]] = line
    return rows


def test_training_page_names_every_option_of_every_config_group():
    rows = config_groups_table(ROOT / "docs" / "training.md")
    conf = ROOT / "conf"
    groups = {
        path.parent.relative_to(conf).as_posix()
        for path in conf.rglob("*.yaml")
        if path.parent != conf
    }
    assert {"model", "reward", "callbacks", "hydra/launcher"} <= groups
    missing = [
        f"{group}/{option.stem}"
        for group in sorted(groups)
        for option in sorted((conf / group).glob("*.yaml"))
        if group not in rows or f"`{option.stem}`" not in rows[group]
    ]
    assert not missing, f"docs/training.md, Config groups, lacks: {missing}"
