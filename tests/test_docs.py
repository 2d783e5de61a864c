"""Every document the code and docs point to is in the repository: no reference to the design
notes that only the authors had, and every `docs/conventions.md` section named exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Spelled in two parts so this file does not match its own search.
OUTSIDE_DOCS = ("DESIGN" + ".md", "ANCHORS" + ".md", "the " + "ANCHORS shapes")
SOURCES = [p for folder in ("rftengine", "kernels", "tests", "bench", "docs", "examples")
           for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".sh", ".yaml"}]
SOURCES.append(ROOT / "README.md")
SECTION_REF = re.compile(r'docs/conventions\.md`?[\s,(]*"([A-Z][^"]*)"')  # a title: capitalised


def test_no_reference_to_documents_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}: {name}" for p in SOURCES for name in OUTSIDE_DOCS
            if name in p.read_text(encoding="utf-8", errors="replace")]
    assert hits == []


def test_conventions_sections_named_in_the_code_exist():
    sections = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "conventions.md").read_text(encoding="utf-8"),
                              flags=re.M))
    assert {"Shift", "Temperature", "KL estimators", "Aggregation", "GAE"} <= sections
    named = {m for p in SOURCES for m in SECTION_REF.findall(p.read_text(encoding="utf-8", errors="replace"))}
    assert named and named <= sections, named - sections


@pytest.mark.parametrize("name", ["docs/conventions.md", "docs/metrics.md", "bench/README.md"])
def test_readme_points_to_the_in_repo_docs(name):
    assert name in (ROOT / "README.md").read_text(encoding="utf-8") and (ROOT / name).is_file()
