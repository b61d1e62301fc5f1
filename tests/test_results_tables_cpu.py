"""The benchmark tables of README.md and docs/ are the result files' numbers (launch/results_tables.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import results_tables  # noqa: E402


@pytest.mark.parametrize("doc", results_tables.DOCS, ids=lambda p: p.name)
def test_marked_tables_match_result_files(doc):
    text = doc.read_text()
    assert results_tables.update(text) == text, f"{doc.name}: run python launch/results_tables.py"


def test_every_result_file_named_by_a_marker_exists_and_renders(tmp_path, monkeypatch):
    data = dict(gpu="NVIDIA H200", commit="abcdef0123", rows=[
        dict(method="dense", config="dense", batch=8, context=32768, ms_per_step=12.0, gbps=4000.0, run=0),
        dict(method="quest", config="quest-fast", batch=8, context=32768, ms_per_step=6.0, speedup=2.0, run=0),
        dict(method="quest", config="quest", failed_at="start-up", error="x")])
    (tmp_path / "bench_e2e_x.json").write_text(json.dumps(data))
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    text = "a\n<!-- table: bench_e2e_x -->\nold\n<!-- /table -->\nb\n"
    new = results_tables.update(text)
    assert "| quest-fast | 8 × 32K | 6.00 | **2.00** |  | abcdef0 |" in new and "old" not in new
    assert new.startswith("a\n<!-- table: bench_e2e_x -->\n") and new.endswith("<!-- /table -->\nb\n")
    assert results_tables.update(new) == new
    with pytest.raises(SystemExit, match="does not exist"):
        results_tables.update("<!-- table: bench_e2e_missing -->\n<!-- /table -->\n")
