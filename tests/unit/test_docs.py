"""The front door and the pages behind it: a short README, links that resolve, a settings reference that
is the code's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation gone, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6} (.+)$", line)):
            out.add(slug(m.group(1)))
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


def test_the_readme_is_short_enough_to_read_in_ten_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    assert max(len(line) for line in lines) <= 120


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_to_a_file_and_every_anchor_to_a_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no file {where}")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.name}")
    assert not broken, broken


def test_the_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) [bad](#nowhere)\n")
    found = links(page)
    assert found == ["#top", "missing.md", "#nowhere"]
    assert "top" in anchors(page) and "nowhere" not in anchors(page)


def test_the_settings_reference_and_default_files_are_generated_from_the_code():
    from adtr_edge.agent.settings_reference import generated, undescribed

    stale = [str(path.relative_to(ROOT)) for path, text in generated().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"regenerate with `python -m adtr_edge.agent.settings_reference --write`: {stale}"
    assert not undescribed(), "every setting says what it does (Field(description=...))"


def test_the_generated_defaults_load_back_as_exactly_the_defaults():
    from adtr_edge.agent.settings import AgentConfig, AgentSettings, load_settings
    from adtr_edge.agent.settings_reference import ROOT as SOURCE_ROOT
    from adtr_edge.model.config import AdtrConfig

    assert load_settings(SOURCE_ROOT / "configs" / "edge.yaml") == AdtrConfig()
    assert load_settings(SOURCE_ROOT / "configs" / "agent.yaml", kind=AgentSettings) == AgentConfig()
