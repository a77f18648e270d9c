"""The README stays a front page and the docs stay connected.

CI (`.ci/run`) runs the README's first `python3 -m venv` line and its test command verbatim, so the two
commands must open the README; every relative link in README.md and docs/ must reach a file (and a
heading, for `#anchors`), so moving a section cannot silently orphan a reference; and every command the
CLI registers has its page in docs/commands/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md")])

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(text: str) -> list[list[str]]:
    """The fenced blocks of a Markdown text, each as its lines (without the fences)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def outside_fences(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans, where links live."""
    return "\n".join(re.sub(r"`[^`]*`", "", line) for line in outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in outside_fences(path.read_text()):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if not match:
            continue
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move sections into docs/"


def test_readme_opens_with_the_install_line_and_the_test_command() -> None:
    blocks = code_blocks(README.read_text())
    assert len(blocks) >= 2
    install, tests = blocks[0], blocks[1]
    # .ci/run takes the first line starting with `python3 -m venv` and runs the part after the editable
    # install as the main job, then runs the test command verbatim.
    assert len(install) == 1 and install[0].startswith("python3 -m venv .venv && ")
    assert " && pip install -e '.[test]' && optcli quantize " in install[0]
    assert " && optcli profile " in install[0]
    first_venv = next(line for line in README.read_text().splitlines() if line.startswith("python3 -m venv"))
    assert first_venv == install[0]
    assert tests == ["python -m pytest tests"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(doc: Path) -> None:
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    # The checks above pass vacuously if the link pattern or the slugs are wrong: exercise both.
    page = tmp_path / "page.md"
    page.write_text("# A `b`: c-d\n\n[x](missing.md) [y](#a-b-c-d) `[z](also-missing.md)`\n")
    assert LINK.findall(prose(page.read_text())) == ["missing.md", "#a-b-c-d"]
    assert anchors(page) == {"a-b-c-d"}


def test_every_command_has_a_page() -> None:
    import typer.main

    from optcli.cli import app

    group = typer.main.get_command(app)
    names = sorted(group.commands)  # top-level commands and sub-groups (recipes, convert)
    missing = [name for name in names if not (ROOT / "docs" / "commands" / f"{name}.md").exists()]
    assert not missing, f"no docs/commands/<name>.md for: {', '.join(missing)}"
    table = README.read_text()
    unlisted = [name for name in names if f"(docs/commands/{name}.md)" not in table]
    assert not unlisted, f"README's command table does not link: {', '.join(unlisted)}"


def test_changelog_keeps_a_changelog_form() -> None:
    """[Unreleased] on top, then dated releases newest first; each kind of change once per version, one
    line per entry; the newest release is the package's version."""
    import tomllib

    from optcli import __version__

    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\](.*)$", text, flags=re.M)
    assert versions[0] == ("Unreleased", "")
    released = versions[1:]
    assert released and all(re.fullmatch(r" - \d{4}-\d{2}-\d{2}", date) for _, date in released)
    dates = [date for _, date in released]
    assert dates == sorted(dates, reverse=True)
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        kinds = re.findall(r"^### (.+)$", section, flags=re.M)
        assert len(kinds) == len(set(kinds)), f"a heading repeats in ## {section.splitlines()[0]}: {kinds}"
        assert set(kinds) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    body = text.split("## [Unreleased]", 1)[1].splitlines()
    continued = [line for line in body if line.startswith("  ")]
    assert not continued, f"entries are one line each: {continued[:3]}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == released[0][0] == __version__


def test_the_roi_page_shows_the_example_script_as_it_is() -> None:
    script = (ROOT / "examples" / "quantize_profile_roi.sh").read_text()
    assert f"```bash\n{script}```" in (ROOT / "docs" / "commands" / "roi.md").read_text()
