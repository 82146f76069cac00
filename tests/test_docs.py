"""The README and docs/ against the code: every setting and command is documented, the README's
test command is the one CI runs, and every relative link points at a file and heading that exist.
(The stream protocol has its own check: tests/service/test_protocol_doc.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def section(text: str, title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert m, f"no '{title}' section"
    return m.group(1)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_setting_is_documented_and_nothing_else():
    from service.settings import Settings

    table = [line for line in section((ROOT / "docs" / "deployment.md").read_text(), "Settings").splitlines()]
    documented = {
        v for line in table if line.startswith("| `QARVD_") for v in re.findall(r"`(QARVD_\w+)`", line.split("|")[1])
    }
    assert documented == {f"QARVD_{name.upper()}" for name in Settings.model_fields}


def test_every_command_is_in_the_readme_table_and_nothing_else():
    from qarvd_core.cli import app

    group = typer.main.get_command(app)
    commands = set(group.list_commands(typer.Context(group)))
    table = section(README, "Commands")
    documented = {m for m in re.findall(r"^\| `qarvd (\w+)", table, re.M)}
    assert documented == commands


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = re.search(r"\*\*Test it\*\*.*?```bash\n(.*?)\n```", README, re.S).group(1)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert readme == ci


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files_and_headings_that_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"


def _table_after(text: str, header: str) -> dict[str, str]:
    """Each first-column name of the table whose header row starts with `header` -> its second column."""
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {
        name: row.split("|")[2].strip(" `") for row in rows for name in re.findall(r"`([\w-]+)`", row.split("|")[1])
    }


def test_every_method_and_recipe_is_documented_and_nothing_else():
    from qarvd_core.quant import METHODS
    from qarvd_core.recipes import RECIPES

    doc = (ROOT / "docs" / "quantization.md").read_text()
    assert set(_table_after(doc, "| method | config |")) == set(METHODS)
    assert _table_after(doc, "| recipe | method |") == {name: r.method for name, r in RECIPES.items()}
