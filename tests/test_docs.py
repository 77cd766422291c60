"""The README is the way in and docs/ holds the rest: links between them resolve, the settings page
says what the code does, and the README stays short."""
import re
from collections.abc import Iterator
from pathlib import Path

from docs.settings_page import PAGE, page_with_table
from service.settings import Settings

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, in_code = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def links(path: Path) -> list[str]:
    """The targets of the file's links; one in inline code is an example, not a link."""
    return [target for line in prose_lines(path)
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line))]


def anchors(path: Path) -> Iterator[str]:
    """The #fragments GitHub gives the file's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked here
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in set(anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    return broken


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading_that_exist():
    broken = {path.relative_to(ROOT).as_posix(): found
              for path in (README, *PAGES) if (found := broken_links(path))}
    assert not broken, f"broken links: {broken}"


def test_the_readme_links_every_page_of_docs():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_the_readme_is_a_way_in_of_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move the detail to a page under docs/"


def test_the_settings_page_has_the_table_the_settings_fields_give():
    page = PAGE.read_text()
    assert page == page_with_table(page), (
        "docs/settings.md differs from the Settings fields in service/settings.py: run `make docs`")


def test_every_setting_has_a_row_on_the_settings_page():
    page = PAGE.read_text()
    assert [name for name in Settings.model_fields if f"| `{name.upper()}` |" not in page] == []
