"""The README is a front door: short, and its Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES = 200


def first_python_block(text: str) -> str:
    block = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has a ```python block (the API example)"
    return block.group(1)


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)#][^)]*)\)", text)
               if not link.startswith(("http://", "https://"))}
    assert targets, "README.md links to docs/ and MODEL_CARD.md"
    missing = sorted(t for t in targets if not (REPO / t).exists())
    assert not missing, f"README.md links to files that do not exist: {missing}"


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    code = first_python_block(README.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)  # it must not need the repository's folders or data
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["mask"].shape == (256, 256)
    assert namespace["probabilities"].shape == (4, 256, 256)
