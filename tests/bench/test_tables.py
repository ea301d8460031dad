"""Results tables keep their measurement: a study's JSON renders into the docs, and a rerun
replaces the old text."""

from __future__ import annotations

import json

import pytest

from kvant.bench.tables import markdown, table_doc, write_table
from tests.conftest import load_tool

render_docs = load_tool("render_docs")
INFO = {"cpu": "Intel Test CPU", "cpu_count": 2, "ram_gib": 24.0}


def test_a_changed_measurement_changes_the_page(tmp_path):
    """The renderer fills a block from the JSON, and a rerun's JSON replaces the old text."""
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    first = table_doc("t", ["a", "b"], [["1", "2"]], "python -m x", machine_info=INFO)
    (docs / "results" / "t.json").write_text(json.dumps(first))
    page = "intro\n<!-- table: results/t.json -->\nstale text\n<!-- /table -->\nend\n"
    text, used = render_docs.render(page, docs)
    assert used == ["results/t.json"] and "stale text" not in text
    assert markdown(first) in text and "2 cores of an Intel Test CPU" in text
    second = table_doc("t", ["a", "b"], [["1", "3"]], "python -m x", machine_info=INFO)
    (docs / "results" / "t.json").write_text(json.dumps(second))
    again, _ = render_docs.render(text, docs)
    assert "| 1 | 3 |" in again and "| 1 | 2 |" not in again


def test_a_table_with_a_short_row_is_refused_and_a_written_one_reads_back(tmp_path):
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        table_doc("t", ["a", "b"], [["1"]], "python -m x", machine_info=INFO)
    doc = table_doc("t", ["a", "b"], [["1", "2"]], "python -m x", machine_info=INFO)
    path = write_table(tmp_path / "sub" / "t.json", doc)
    assert json.loads(path.read_text()) == doc and not list(tmp_path.rglob("*.part"))


def test_a_missing_json_is_one_clear_line(tmp_path):
    page = "<!-- table: results/gone.json -->\n<!-- /table -->\n"
    with pytest.raises(SystemExit, match="gone.json is missing; run the study"):
        render_docs.render(page, tmp_path)
