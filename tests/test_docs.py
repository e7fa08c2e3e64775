"""The README and the documentation site: short README, a main command that works on a fresh clone, and pages
that speak of samkit, not of how it was developed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Words that belong to a development log, not to user documentation.
LOG_WORDS = re.compile(
    r"\bsessions?\b|\bthis session\b|\bissue'?s? (target|aim)\b|\bcommit [0-9a-f]{7,}\b|\bround \d+\b"
    r"|\bthe aim\b|\(#\d+\)",
    re.IGNORECASE,
)


def test_readme_is_short_and_its_main_command_uses_the_shipped_photo():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    commands = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    main = next(c for c in commands if "samkit segment" in c and "venv" in c)
    photo = re.search(r"samkit segment (\S+)", main).group(1)
    assert (ROOT / photo).is_file(), (
        f"the README's main command needs {photo}, which is not in the repository"
    )
    assert "../shared" not in main
    assert any(c.strip() == "bash scripts/test.sh" for c in commands)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_do_not_read_like_a_lab_notebook(page):
    hits = [m.group(0) for m in LOG_WORDS.finditer(page.read_text())]
    assert not hits, f"{page.name}: {hits}"


def test_every_relative_link_of_the_readme_exists():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
