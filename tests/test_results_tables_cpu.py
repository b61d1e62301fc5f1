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


def test_accuracy_and_soak_tables_show_their_figures(tmp_path, monkeypatch):
    accuracy = dict(gpu="NVIDIA H200", commit="abcdef0123", args=dict(model="qwen05b"), instances_per_task_length=10,
                    rows=[dict(method="dense", config="dense", budget=0, length=32000, scope="length", score=0.8,
                               score_ci=[0.7, 0.9], relative=1.0, relative_ci=[1, 1], attended_fraction=1.0, n=90),
                          dict(method="quest", config="quest", budget=2048, length=32000, scope="length", score=0.72,
                               score_ci=[0.6, 0.8], relative=0.9, relative_ci=[0.85, 0.95], attended_fraction=0.0638,
                               n=90),
                          dict(method="quest", config="quest", budget=2048, length=32000, scope="task_length",
                               task="cwe", score=0.29)])
    soak = dict(gpu="NVIDIA H200", runs=[dict(commit="abcdef0123")], rows=[
        dict(config="quest", commit="abcdef0123", duration_s=301.2, requests=1769, completed=1537, aborted=185,
             rejected=47, server_errors=0, leaked_tokens=0, probe_mismatches=0, retracted_reqs=1,
             gpu_memory_start_mib=4552, gpu_memory_end_mib=4564, decode_graph_share=0.25, output_tokens=60200,
             passed=True),
        dict(config="twilight", commit="1234567890", error="start-up: ServerError: died\nmore", passed=False)])
    (tmp_path / "accuracy_x.json").write_text(json.dumps(accuracy))
    (tmp_path / "soak_x.json").write_text(json.dumps(soak))
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    acc = results_tables.render("accuracy_x")
    assert "| quest | 2048 | 32000 | 0.720 | [0.60, 0.80] | **0.900** | [0.85, 0.95] | 0.0638 | 90 |" in acc
    assert "| quest | 2048 | 32000 | 0.29 |" in acc and "commit abcdef0" in acc
    def run(commit, *configs):
        return dict(args=dict(model="qwen05b"), commit=commit, instances_per_task_length=10,
                    timings=[dict(config=c) for c in configs])

    combined = dict(accuracy, commit=["abcdef0123", "1234567890"], runs=[run("abcdef0123", "dense", "quest"),
                                                                       run("1234567890", "dense", "vattention")])
    del combined["args"], combined["instances_per_task_length"]                    # as eval_accuracy --combine writes
    (tmp_path / "accuracy_y.json").write_text(json.dumps(combined))
    merged = results_tables.render("accuracy_y")
    assert "qwen05b, 10 instances per task and length; 2 runs merged" in merged
    assert "abcdef0: dense, quest; 1234567: dense, vattention" in merged
    table = results_tables.render("soak_x")
    assert ("| quest | abcdef0 | 301 | 1769 | 1537 | 185 | 47 | 0 | 0 | 0 | 1 | 4552 → 4564 | 200 | 25 % | yes |"
            in table)
    assert "| twilight | 1234567 | failed: start-up: ServerError: died |" in table


def test_bench_serving_table_gives_ratios_to_dense_and_the_targets(tmp_path, monkeypatch):
    def row(config, c, tps, tpot, ttft, **extra):
        return dict(config=config, workload="32k", concurrency=c, output_throughput=tps, median_tpot_ms=tpot,
                    p99_tpot_ms=tpot * 1.2, median_ttft_ms=ttft, commit="abcdef0123", **extra)

    data = dict(gpu="NVIDIA H200", rows=[
        row("dense", 4, 342.7, 9.92, 3573, decode_share=0.76), row("quest", 4, 423.1, 7.70, 3591),
        row("quest", 16, 1.0, 1.0, 1.0, error="3 of 16 requests completed"),
        row("dense", 4, 300.0, 12.0, 3600, run=1), row("twilight", 4, 400.0, 8.0, 3600, run=1),
        row("vattention", 4, 380.0, 9.0, 3600, run=2)],                 # its run had no dense row
        targets=[dict(config="quest", workload="32k", concurrency=16, metric="median_tpot_speedup", op=">=",
                      required=1.9, value=None, met=None, binding=True),
                 dict(config="quest", workload="32k", concurrency=16, metric="output_throughput_ratio", op=">=",
                      required=1.4, value=1.52, met=True, binding=True),
                 dict(config="twilight", workload="32k", concurrency=16, metric="output_throughput_ratio", op=">=",
                      required=1.4, value=1.1, met=False, binding=False)])
    (tmp_path / "bench_serving_x.json").write_text(json.dumps(data))
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    table = results_tables.render("bench_serving_x")
    assert "| dense | 32k | 4 | 342.7 | 9.92 | 11.90 | 3573 | | | 76 % | abcdef0 |" in table
    assert "| quest | 32k | 4 | 423.1 | 7.70 | 9.24 | 3591 | **1.29** | **1.23** |  | abcdef0 |" in table
    # a second run's config is compared with its own run's dense row, which sits right above it
    assert ("| dense | 32k | 4 | 300.0 | 12.00 | 14.40 | 3600 | | |  | abcdef0 |\n"
            "| twilight | 32k | 4 | 400.0 | 8.00 | 9.60 | 3600 | **1.50** | **1.33** |  | abcdef0 |") in table
    assert "| quest | 32k | 16 |" not in table                         # a failed point is not a measurement
    assert "| 32k, concurrency 16: median_tpot_speedup | >= 1.9 | not measured |" in table
    assert "| 32k, concurrency 16: output_throughput_ratio | >= 1.4 | 1.52 (met) |" in table
    assert "| 32k, concurrency 16: output_throughput_ratio | >= 1.4 | 1.1" not in table and "commit abcdef0" in table
    assert "| vattention | 32k | 4 | 380.0 | 9.00 | 10.80 | 3600 | — | — |  | abcdef0 |" in table   # never run 0's
    compact = results_tables.render("bench_serving_x", "compact")
    assert "| quest | 32k | 4 | 9.92 → 7.70 ms | **1.29×** | 1.23× | 1.01× | 76 % | abcdef0 |" in compact
    assert "| twilight | 32k | 4 | 12.00 → 8.00 ms | **1.50×** | 1.33× | 1.00× | — | abcdef0 |" in compact
    assert "| vattention | 32k | 4 | — → 9.00 ms | — (no dense server in its run) | — | — | — | abcdef0 |" in compact
    assert "| dense |" not in compact and "target" not in compact
    text = "<!-- table: bench_serving_x compact -->\n<!-- /table -->\n"
    assert results_tables.update(text) == f"<!-- table: bench_serving_x compact -->\n{compact}<!-- /table -->\n"
    with pytest.raises(SystemExit, match="no 'wide' style"):
        results_tables.render("bench_serving_x", "wide")


def test_profile_e2e_table_gives_each_sparse_layer_and_step(tmp_path, monkeypatch):
    def row(point, batch, in_server, split, dense_layer, operator_us, dense_ms, dense_idle):
        return dict(method="quest", point=point, batch=batch, context=32768, layers=32, sparse_layers=30,
                    page_size=16, token_budget=2048, ms_per_step=6.83, dense_ms_per_step=dense_ms,
                    bytes=dict(page_bounds=batch * 8388608, selected_kv=batch * 8388608, total=batch * 16777216),
                    floor_us=batch * 3.98, in_server_us=in_server, in_server_split_us=split, dense_layer=dense_layer,
                    operator_us=operator_us, operator_dense_us=operator_us and 250.0, idle_us=789.6,
                    dense_idle_us=dense_idle, idle_vs_dense_us=dense_idle and 789.6 - dense_idle)

    data = dict(gpu="NVIDIA H200", commit="bb2824fb8c", versions={"sglang": "0.5.17"}, copy_peak_gbps=4216.0,
                operator=dict(gpu="NVIDIA H200", commit="bb2824fb8c", peak_gbps=4224.4, l2="warm (back to back)"),
                accounting=[
                    row("8x32K", 8, 61.8, {"quest_page_scores": 23.27, "flashinfer_attention": 25.06},
                        dict(attention_us=243.1, merge_us=2.71, point="8x32K", scale=1.0), 69.66, 12.08, 399.9),
                    row("16x32K", 16, 95.1, {"quest_page_scores": 41.63, "topk_pages": 8.01},
                        dict(attention_us=486.2, merge_us=5.41, point="8x32K", scale=2.0), None, None, None)])
    (tmp_path / "profile_e2e_x.json").write_text(json.dumps(data))
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    table = results_tables.render("profile_e2e_x")
    assert table.startswith("NVIDIA H200, commit bb2824f, sglang 0.5.17. `quest` preset: 30 sparse layers of 32, "
                            "budget 2048 tokens (pages of 16). Floor: the layer's bytes at the copy peak (4.22 TB/s).")
    assert "the ratio of KV bytes" in table and "`bench_decode`, commit bb2824f, warm (back to back) L2" in table
    assert "| per sparse layer | quest 8 × 32K | quest 16 × 32K |\n|---|---|---|\n" in table
    assert "| bytes to read (MB): page bounds + selected K/V | 67.1 + 67.1 | 134.2 + 134.2 |" in table
    assert "| floor at the copy peak (µs) | 31.8 | 63.7 |" in table
    assert "| operator benchmark (µs) | 69.7 | not measured |" in table
    assert "| **in server (µs)** | **61.8** | **95.1** |" in table
    assert "| `quest_page_scores` | 23.3 | 41.6 |" in table
    assert "| FlashInfer attention, sparse layers' share | 25.1 | — |" in table     # not launched in that run
    assert "| `topk_pages` | — | 8.0 |" in table
    assert ("| a dense layer: FlashInfer attention + merge (µs) | 243.1 + 2.7 (dense 8 × 32K) | "
            "486.2 + 5.4 (dense 8 × 32K × 2, KV bytes) |") in table
    assert "| server ms per step: sparse / dense | 6.83 / 12.08 | 6.83 / not measured |" in table
    assert "| idle µs per step (no kernel running): sparse / dense | 789.6 / 399.9 (+389.7) | 789.6 / not measured |" \
        in table


def test_attention_rows_table_lists_each_variant_and_a_refused_one(tmp_path, monkeypatch):
    def row(variant, splits, us, diff=0.0):
        r = dict(batch=32, context=32768, budget=2048, variant=variant, splits=splits, rows=256 * splits,
                 bytes=268435456, us=us, gbps=None if us is None else 268435456 / us / 1e3, rel_max_diff=diff)
        return r if us is not None else dict(r, error="RuntimeError: not supported")

    data = dict(gpu="NVIDIA H200", commit="794aa9a336", l2="warm (back to back)",
                rows=[row("auto", 1, 76.1), row("auto", 2, 89.0, 0.00483), row("fa3", 4, None),
                      dict(row("no-split", 1, 98.4, 0.02), ok=False)])
    (tmp_path / "bench_attention_rows_x.json").write_text(json.dumps(data))
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    table = results_tables.render("bench_attention_rows_x")
    assert table.startswith("NVIDIA H200, commit 794aa9a, warm (back to back) L2, CUDA-graph replays")
    assert "| 32 × 32K | auto | 1 | 256 | 76.1 | 3527 | 0.0000 |" in table
    assert "| 32 × 32K | auto | 2 | 512 | 89.0 | 3016 | 0.0048 |" in table
    assert "| 32 × 32K | fa3 | 4 | 1024 | RuntimeError: not supported | | |" in table
    assert "| 32 × 32K | no-split | 1 | 256 | 98.4 | 2728 | 0.0200 (differs) |" in table
