"""launch/plot_reuse.py: the speedup at each reuse interval from one bench_decode run's select and reuse times."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import plot_reuse  # noqa: E402


def _run():
    def row(config, method, us_eager, us_graph, **extra):
        return dict(config=config, method=method, batch=8, context=32768, budget=2048, us_eager=us_eager,
                    us_graph=us_graph, speedup=240.0 / min(us_eager, us_graph), **extra)

    return dict(gpu="NVIDIA H200", commit="abcdef0123", rows=[
        row("dense", "dense", 300.0, 240.0),
        row("quest", "quest", 700.0, 80.0),
        row("quest-fast", "quest", 800.0, 55.0, reselect_every=4, us_select=90.0, us_reuse=40.0),
        dict(row("quest-fast", "quest", 500.0, float("nan"), reselect_every=4, us_select=100.0, us_reuse=50.0),
             batch=32),                                   # no dense row at batch 32: left out
        row("quest:bounds_dtype=int8", "quest", 700.0, 90.0)])


def test_speedup_at_each_interval_is_dense_over_the_mean_step():
    (curve,) = plot_reuse.reuse_curves(_run())
    assert curve["dense_us"] == 240.0 and curve["quest"] == pytest.approx(3.0)
    assert curve["speedup"][1] == pytest.approx(240.0 / 90.0)
    assert curve["speedup"][4] == pytest.approx(240.0 * 4 / (90.0 + 3 * 40.0))
    assert curve["speedup"][16] == pytest.approx(240.0 * 16 / (90.0 + 15 * 40.0))
    assert curve["limit"] == pytest.approx(6.0)
    assert all(curve["speedup"][a] < curve["speedup"][b] for a, b in zip(plot_reuse.INTERVALS,
                                                                         plot_reuse.INTERVALS[1:]))


def test_dense_baseline_is_the_faster_of_eager_and_graph():
    run = _run()
    run["rows"][0].update(us_eager=200.0, us_graph=float("nan"))
    (curve,) = plot_reuse.reuse_curves(run)
    assert curve["dense_us"] == 200.0 and not math.isnan(curve["speedup"][2])


def test_table_and_plot(tmp_path, capsys, monkeypatch):
    table = plot_reuse.reuse_table(_run())
    assert "| 8 × 32K | 2048 | 90.0 | 40.0 | 3.00 | 2.67 | " in table and "| 6.00 |" in table
    assert "commit abcdef0" in table and "32 ×" not in table
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_run()))
    monkeypatch.setattr(sys, "argv", ["plot_reuse.py", str(path), "--config", "quest"])
    assert plot_reuse.main() == 2                     # no select/reuse times for plain quest: refused
    assert "no rows of 'quest'" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    out = tmp_path / "reuse.png"
    monkeypatch.setattr(sys, "argv", ["plot_reuse.py", str(path), "--out", str(out)])
    assert plot_reuse.main() == 0
    assert "R = 16" in capsys.readouterr().out and out.stat().st_size > 10_000
