"""The demo end to end in its reduced mode, and the report's links."""

from __future__ import annotations

import re
from pathlib import Path

from brainseg.demo import run_demo
from brainseg.report import write_report


def linked_files(report: Path) -> list[str]:
    return re.findall(r'(?:href|src)="([^"#]+)"', report.read_text())


def test_quick_demo_writes_a_report_that_links_only_existing_files(tmp_path):
    lines: list[str] = []
    report = run_demo(tmp_path / "demo", quick=True, echo=lines.append)
    assert report == tmp_path / "demo" / "index.html"
    assert lines[0].startswith("[1/8]") and lines[-1].startswith("done in")
    links = linked_files(report)
    assert links, "the report links its figures and tables"
    for link in links:
        assert (report.parent / link).is_file(), link
    text = report.read_text()
    for heading in ("<h2>Data</h2>", "<h2>Training: run</h2>", "<h2>Evaluation: test patients",
                    "<h2>Predictions: predictions</h2>"):
        assert heading in text
    assert "synthetic" in text and "<h2>At a glance</h2>" in text
    for name in ("sample_grid.png", "learning_curves.png", "prediction_grid.png"):
        assert name in links or any(link.endswith(name) for link in links)
    # Running again replaces the earlier demo output instead of failing.
    run_demo(tmp_path / "demo", quick=True, echo=lines.append)


def test_report_for_an_empty_folder(tmp_path):
    report = write_report(tmp_path)
    assert "No results found" in report.read_text()
