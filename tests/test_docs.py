"""The documentation: the README a newcomer reads, and the MkDocs site in docs/.

- the site builds with `mkdocs build --strict`, so a broken link, a missing page or heading
  anchor, a page left out of the nav, or an API name or docstring that does not render fails;
- README.md stays short (at most 250 lines), and its relative links and images point at files
  (and headings) that exist.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250

# [text](target) and ![alt](target); the alt text may span lines. Code spans and fences are
# removed first, so a bracket in code is not taken for a link.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def links(markdown: str) -> list[str]:
    return LINK.findall(CODE.sub("", FENCE.sub("", markdown)))


def anchors(page: Path) -> set[str]:
    """The heading ids MkDocs gives `page` (Python-Markdown's toc slugs)."""
    from markdown.extensions.toc import slugify

    text = FENCE.sub("", page.read_text())
    return {slugify(h.replace("`", ""), "-") for h in re.findall(r"^#+\s+(.*?)\s*$", text, re.M)}


@pytest.mark.subprocess
def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason='MkDocs is not installed (pip install "dcfx[docs]"; the test extra has it)')
    pytest.importorskip("mkdocstrings", reason='mkdocstrings is not installed (pip install "dcfx[docs]")')
    run = subprocess.run(
        [sys.executable, "-P", "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    problems = [line for line in run.stderr.splitlines() if not line.startswith("INFO")]
    assert run.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [run.stderr])
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def test_the_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_readme_links_and_images_exist():
    missing = []
    for target in links(README.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or a heading of the README itself
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            missing.append(target)
    assert not missing, f"README.md links to what does not exist: {missing}"


def test_the_link_check_sees_links_images_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Known limits\n\n```\n## not a heading\n```\n")
    text = "see [a](docs/a.md#x), ![pic\nture](b.png) and `[not](c.md)`\n```\n[nor](d.md)\n```\n"
    assert links(text) == ["docs/a.md#x", "b.png"]
    assert anchors(page) == {"title", "known-limits"}
