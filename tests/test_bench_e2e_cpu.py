"""launch/bench_e2e.py's bookkeeping on CPU: merging cut-off runs and computing speedups against dense."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import bench_e2e  # noqa: E402


def _row(method, batch, context, ms):
    return dict(method=method, batch=batch, context=context, prompt=context, ms_per_step=ms, tokens_per_s=batch / ms)


def test_combine_merges_runs_and_scores_targets(tmp_path, capsys):
    first = dict(gpu="NVIDIA H200", rows=[_row("dense", 8, 32768, 12.0), _row("dense", 4, 131072, 21.0),
                                          _row("quest", 8, 32768, 6.0),
                                          dict(method="twilight", failed_at="4x128K", error="cut", log="x")])
    second = dict(gpu="NVIDIA H200", rows=[_row("quest", 8, 32768, 99.0),          # first run's wins
                                           _row("twilight", 4, 131072, 5.0)])
    paths = []
    for i, run in enumerate((first, second)):
        paths.append(str(tmp_path / f"run{i}.json"))
        Path(paths[-1]).write_text(json.dumps(run))
    out = tmp_path / "all.json"
    assert bench_e2e.combine(paths, out) == 0
    merged = json.loads(out.read_text())
    speed = {(r["method"], r["batch"], r["context"]): r.get("speedup") for r in merged["rows"]}
    assert speed[("quest", 8, 32768)] == 2.0
    assert speed[("twilight", 4, 131072)] == 21.0 / 5.0
    assert len(merged["rows"]) == 4                       # the failed row and the duplicate are dropped
    targets = {(t["method"], t["batch"], t["context"]): t["met"] for t in merged["targets"]}
    assert targets[("quest", 8, 32768)] is False          # 2.0x < 2.2x
    assert targets[("twilight", 4, 131072)] is True       # 4.2x >= 3.5x
    assert targets[("quest", 4, 131072)] is None          # not measured
    assert merged["gpu"] == "NVIDIA H200"
    assert "target 8x32K >= 2.2x: quest      2.00x NOT met" in capsys.readouterr().out
