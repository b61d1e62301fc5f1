"""launch/bench_e2e.py's bookkeeping on CPU: merging cut-off runs and computing speedups against dense."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
                                           _row("twilight", 4, 131072, 5.0),       # no dense here: run 0's
                                           _row("dense", 8, 32768, 14.0), _row("vattention", 8, 32768, 7.0)])
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
    assert speed[("vattention", 8, 32768)] == 2.0          # over its own run's dense (14 ms), not run 0's
    assert [r["run"] for r in merged["rows"] if r["method"] == "dense"] == [0, 0, 1]
    assert len(merged["rows"]) == 6                       # the failed row and the duplicate are dropped
    targets = {(t["method"], t["batch"], t["context"]): t["met"] for t in merged["targets"]}
    assert targets[("quest", 8, 32768)] is True           # 2.0x >= 1.75x
    assert targets[("twilight", 4, 131072)] is True       # 4.2x >= 2.5x
    assert targets[("quest", 4, 131072)] is None          # not measured
    assert merged["gpu"] == "NVIDIA H200"
    assert "target 8x32K >= 1.75x: quest      2.00x met" in capsys.readouterr().out


def test_faster_dense_server_is_the_baseline_and_noise_is_refused():
    rows = [dict(_row("dense", 8, 1024, 6.0), config="dense"), dict(_row("dense", 8, 1024, 5.0), config="dense-eager"),
            dict(_row("quest", 8, 1024, 5.5), config="quest")]
    targets = bench_e2e.add_speedups(rows, ["dense", "quest"], [(8, 1024)])
    assert rows[2]["speedup"] == 5.0 / 5.5
    assert targets == [dict(method="quest", config="quest", batch=8, context=1024, required=0.98, speedup=5.0 / 5.5,
                            met=False)]
    # two presets of one method: each its own speedup and target line
    rows.append(dict(_row("quest", 8, 1024, 4.0), config="quest-fast"))
    targets = bench_e2e.add_speedups(rows, ["dense", "quest", "quest-fast"], [(8, 1024)])
    assert rows[3]["speedup"] == 5.0 / 4.0 and rows[2]["speedup"] == 5.0 / 5.5
    assert [(t["config"], t["met"]) for t in targets] == [("quest", False), ("quest-fast", True)]
    assert bench_e2e.method_of("quest-fast") == "quest" and bench_e2e.method_of("dense-eager") == "dense"
    # 64 steps from the fastest of each kind (a first request held up by a compile does not count)
    assert abs(bench_e2e.step_ms([8.0, 1.0], [1.64, 1.7], 64) - 10.0) < 1e-9
    with pytest.raises(bench_e2e.BenchError, match="not measurable"):
        bench_e2e.step_ms([1.0, 1.8], [0.9, 1.75], 64)


def test_dense_bandwidth_counts_weights_and_kv():
    config = json.loads((ROOT / "launch" / "models" / "llama-3.1-8b" / "config.json").read_text())
    weights = bench_e2e.bytes_per_step(config, 0, 0)
    assert 15.5e9 < weights < 16.5e9                      # Llama-3.1-8B: 8.03 B parameters in bf16
    kv = bench_e2e.bytes_per_step(config, 8, 32768) - weights
    assert kv == 8 * 32768 * 32 * 2 * 8 * 128 * 2        # tokens x layers x (K, V) x KV heads x head_dim x bf16


def test_methods_take_presets_with_inline_overrides():
    """--methods: dense, a preset, or a preset with overrides (as --sparse-config takes them); anything else is an
    argparse error naming the presets or the invalid field."""
    import argparse

    assert bench_e2e.config_spec("quest-fast:reselect_min_cosine=-1") == "quest-fast:reselect_min_cosine=-1"
    assert bench_e2e.method_of("quest-fast:reselect_min_cosine=-1") == "quest"
    assert bench_e2e.file_safe("quest-fast:reselect_min_cosine=-1") == "quest-fast_reselect_min_cosine_-1"
    with pytest.raises(argparse.ArgumentTypeError, match="not a preset"):
        bench_e2e.config_spec("nosuch")
    with pytest.raises(argparse.ArgumentTypeError, match="reselect_min_cosine"):
        bench_e2e.config_spec("quest-fast:reselect_min_cosine=2")


def test_rows_say_which_path_a_point_decodes_on():
    """8 x 1K is within every preset's min_context (the dense path); 8 x 32K selects; 4 x 32K is below the
    vattention preset's batch floor (262144 tokens), 2 x 128K too, 4 x 128K above it; a point that crosses the
    floor while it generates takes both paths."""
    assert bench_e2e.decode_path("quest", 8, 1024, 128) == "dense"
    assert bench_e2e.decode_path("quest", 8, 32768, 128) == "sparse"
    assert bench_e2e.decode_path("vattention", 4, 32768, 128) == "dense"
    assert bench_e2e.decode_path("vattention", 2, 131072 - 512, 128) == "dense"
    assert bench_e2e.decode_path("vattention", 4, 131072 - 512, 128) == "sparse"
    assert bench_e2e.decode_path("vattention", 8, 32768 - 64, 128) == "both"
    assert bench_e2e.decode_path("dense", 8, 32768, 128) == "dense"
