"""The README and docs/ refer only to what exists: every relative link, and every repository
path written in backticks (README, docs, and the docstrings and comments of negjax/)."""

from __future__ import annotations

import re

from helpers import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"(?<![\w./-])((?:negjax|tests|tools|experiments|docs|\.ci)/[\w./-]*\w)")


def _docs():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 160, len(lines)
    assert "bash tools/test.sh" in lines and any("negjax quickstart" in x for x in lines)


def test_links_and_paths_in_docs_exist():
    missing = []
    for doc in _docs():
        text = doc.read_text()
        for target in LINK.findall(text):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)}: link {target}")
        fenced = re.findall(r"^```.*?^```", text, flags=re.S | re.M)
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
        for code in fenced + inline:
            for path in PATH.findall(code):
                if not (REPO / path).exists():
                    missing.append(f"{doc.relative_to(REPO)}: path {path}")
    assert not missing, "\n".join(missing)


def test_paths_in_the_code_exist():
    """Docstrings and comments name files of the repository only (e.g. docs/design.md)."""
    missing = []
    for py in sorted((REPO / "negjax").rglob("*.py")):
        for n, line in enumerate(py.read_text().splitlines(), 1):
            for path in PATH.findall(line):
                if "{" not in line and not (REPO / path).exists() and not (REPO / path.rstrip(".")).exists():
                    missing.append(f"{py.relative_to(REPO)}:{n}: {path}")
            for doc in re.findall(r"\b[A-Z]+\.md\b", line):
                if doc != "README.md" and not any(REPO.rglob(doc)):
                    missing.append(f"{py.relative_to(REPO)}:{n}: {doc}")
    assert not missing, "\n".join(missing)
