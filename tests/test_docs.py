"""Checks on the documentation: generated reference pages, runnable command blocks, links.

A command block is runnable when the line `<!-- runnable -->` comes right before its ```bash
fence. The runnable blocks of one page run in order in one fresh directory, so a later block
can use what an earlier one wrote. The directory contains a copy of `configs/`, so paths work as
they do for a reader in the repository root.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
RUNNABLE_MARKER = "<!-- runnable -->"
BLOCK_TIMEOUT_S = 120
LINK_PATTERN = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def load_generator():
    """Import scripts/generate_reference.py, which is a script and not a package module."""
    path = REPO_ROOT / "scripts" / "generate_reference.py"
    spec = importlib.util.spec_from_file_location("generate_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_pages() -> list[Path]:
    return sorted(DOCS_DIR.rglob("*.md"))


def runnable_blocks(text: str) -> list[str]:
    """Return the bodies of the ```bash blocks that follow a runnable marker line."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index].strip() == RUNNABLE_MARKER:
            fence = lines[index + 1].strip() if index + 1 < len(lines) else ""
            assert fence == "```bash", (
                f"line {index + 1}: {RUNNABLE_MARKER} must be followed by a ```bash fence, "
                f"found {fence!r}")
            end = lines.index("```", index + 2)
            blocks.append("\n".join(lines[index + 2:end]))
            index = end
        index += 1
    return blocks


def pages_with_runnable_blocks() -> list[Path]:
    return [page for page in doc_pages() if runnable_blocks(page.read_text(encoding="utf-8"))]


def strip_code(text: str) -> str:
    """Remove fenced blocks and inline code, where link-like text is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(page: Path) -> list[str]:
    """Return the link targets in a markdown page that point into the repository."""
    targets = []
    for target in LINK_PATTERN.findall(strip_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL with a scheme, or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_reference_pages_current():
    generator = load_generator()
    stale = [str(path.relative_to(REPO_ROOT)) for path in generator.stale_pages()]
    assert stale == [], f"run python scripts/generate_reference.py to regenerate {stale}"


def test_reference_check_mode_exit_status():
    generator = load_generator()
    assert generator.main(["--check"]) == 0


def test_runnable_blocks_exist():
    pages = pages_with_runnable_blocks()
    assert len(pages) >= 3, f"expected runnable blocks on at least 3 pages, found {pages}"


@pytest.mark.slow
@pytest.mark.parametrize("page", pages_with_runnable_blocks(),
                         ids=lambda page: str(page.relative_to(DOCS_DIR)))
def test_runnable_blocks_succeed(page: Path, tmp_path: Path):
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment.pop("CODELING_API_KEY", None)
    for number, block in enumerate(runnable_blocks(page.read_text(encoding="utf-8")), start=1):
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=tmp_path,
                                env=environment, capture_output=True, text=True,
                                timeout=BLOCK_TIMEOUT_S)
        assert result.returncode == 0, (
            f"{page.name} runnable block {number} exited with {result.returncode}\n"
            f"--- block ---\n{block}\n--- stdout ---\n{result.stdout[-3000:]}\n"
            f"--- stderr ---\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("page", [*doc_pages(), REPO_ROOT / "README.md"],
                         ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page: Path):
    missing = [target for target in relative_links(page)
               if not (page.parent / target).exists()]
    assert missing == [], f"{page.relative_to(REPO_ROOT)} links to missing files: {missing}"


def test_runnable_block_parser():
    text = "intro\n<!-- runnable -->\n```bash\necho one\necho two\n```\n```bash\necho no\n```\n"
    assert runnable_blocks(text) == ["echo one\necho two"]


def test_link_parser_skips_code_and_urls(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("[a](a.md) [b](https://example.org) [c](#top) `[d](d.md)`\n"
                    "```\n[e](e.md)\n```\n![f](img/f.png \"title\") [g](g.md#part)\n")
    assert relative_links(page) == ["a.md", "img/f.png", "g.md"]
