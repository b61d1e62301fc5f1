"""launch/profile_e2e.py's trace summary on CPU: a chrome trace as torch.profiler writes it (GPU events only)."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import profile_e2e  # noqa: E402


def _kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur}


def _trace(tmp_path: Path) -> Path:
    """Two decode steps of 100 us each: a GEMM, two sgl-sparse kernels overlapping by 2 us, FlashInfer, a
    memset and torch elementwise; host events and a CPU op that must be ignored."""
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 500},
              {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 3}]
    for step in range(2):
        t = 1000 + 100 * step
        events += [_kernel("nvjet_tst_128x64_64x4_2x1_v_bz_TNT", t, 40),
                   _kernel("quest_page_scores", t + 45, 10),
                   _kernel("topk_pages", t + 53, 6),                      # overlaps the scores by 2 us
                   _kernel("void flashinfer::BatchPrefillWithPagedKVCacheKernel<...>", t + 60, 20),
                   _kernel("Memset (Device)", t + 81, 1, cat="gpu_memset"),
                   _kernel("void at::native::vectorized_elementwise_kernel<4, ...>", t + 85, 5)]
    path = tmp_path / "x-TP-0-DECODE.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events, "deviceProperties": []}, f)
    return path


def test_summary_per_step(tmp_path):
    s = profile_e2e.summarize(profile_e2e.load_gpu_events(_trace(tmp_path)), steps=2)
    # window: first kernel at 1000, last ends at 1100 + 90
    assert s["window_us"] == pytest.approx(190 / 2)
    # busy per step: 40 + (45..59 = 14) + 20 + 1 + 5 = 80; device time counts the 2 us overlap twice
    assert s["busy_us"] == pytest.approx(80)
    assert s["device_us"] == pytest.approx(82)
    assert s["idle_us"] == pytest.approx(95 - 80)
    assert s["categories"] == pytest.approx({"gemm": 40, "flashinfer": 20, "sparse": 16, "other": 5,
                                             "memcpy/memset": 1})
    assert list(s["categories"]) == ["gemm", "flashinfer", "sparse", "other", "memcpy/memset"]   # largest first
    top = s["kernels"][0]
    assert (top["category"], top["launches"], top["us"]) == ("gemm", 1, 40)
    by_name = {k["name"]: k for k in s["kernels"]}
    assert by_name["topk_pages"]["category"] == "sparse" and by_name["topk_pages"]["us"] == pytest.approx(6)


def test_idle_gaps_by_the_kernels_around_them(tmp_path):
    s = profile_e2e.summarize(profile_e2e.load_gpu_events(_trace(tmp_path)), steps=2)
    # per step: 5 us after the GEMM (long: >= 5 us), 1 after topk (not after the scores, which ended first), 1
    # after FlashInfer, 3 after the memset (short); 10 us between the steps (long), once in the two
    assert s["short_gaps_us"] == pytest.approx((1 + 1 + 3) * 2 / 2)
    assert s["long_gaps_us"] == pytest.approx((5 * 2 + 10) / 2)
    assert s["short_gaps_us"] + s["long_gaps_us"] == pytest.approx(s["idle_us"])
    gaps = {(g["after"][:6], g["before"][:6]): (g["count"], g["us"]) for g in s["gaps"]}
    assert gaps[("nvjet_", "quest_")] == (1, pytest.approx(5))
    assert gaps[("void a", "nvjet_")] == (0.5, pytest.approx(5))
    assert gaps[("topk_p", "void f")] == (1, pytest.approx(1))
    assert ("quest_", "void f") not in gaps
    assert [round(g["us"], 6) for g in s["gaps"]] == sorted((round(g["us"], 6) for g in s["gaps"]), reverse=True)


def test_no_gpu_events_is_an_error(tmp_path):
    path = tmp_path / "cpu_only.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0,
                                                 "dur": 1}]}))
    with pytest.raises(ValueError, match="no GPU kernel events"):
        profile_e2e.load_gpu_events(path)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        profile_e2e.summarize([dict(name="k", cat="other", ts=0.0, dur=1.0)], steps=0)


def test_categories_cover_every_sgl_sparse_kernel():
    names = set()
    for cu in (ROOT / "cupy_kernels").glob("*.cu"):
        text = cu.read_text()
        names |= set(re.findall(r'extern "C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(',
                                text))
    assert len(names) >= 11 and "quest_page_scores" in names, names
    assert {n for n in names if profile_e2e.category(n) != "sparse"} == set()


def test_post_json_reads_a_plain_text_answer():
    """SGLang's /start_profile answers "Start profiling." as text: the helper must not parse it as JSON."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = b"Start profiling.\n" if self.path == "/start_profile" else json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        e2e = profile_e2e.e2e
        assert e2e.post_json(url + "/start_profile", {"num_steps": 2}, expect_json=False) == "Start profiling.\n"
        assert e2e.post_json(url + "/echo", {"a": 1}) == {"a": 1}
        with pytest.raises(ValueError):                      # the JSON default still refuses text
            e2e.post_json(url + "/start_profile", {"num_steps": 2})
    finally:
        server.shutdown()


# --combine: a summary per run as --out writes it (per-step µs, launches per step), Llama-3.1-8B shape.
MODEL_CONFIG = json.loads((ROOT / "launch" / "models" / "llama-3.1-8b" / "config.json").read_text())
VERSIONS = {"sglang": "0.5.17", "flashinfer-python": "0.6.15.post1"}
ATTENTION = "void flashinfer::BatchPrefillWithPagedKVCacheKernel<...>(PagedParams)"
MERGE = "void flashinfer::PersistentVariableLengthMergeStatesKernel<...>(...)"


def _run(method, point, ms, idle, kernels, commit=None):
    """A profile summary: ``kernels`` as (name, category, launches per step, µs per step)."""
    run = dict(method=method, point=point, prompt=32768, ms_per_step=ms, gpu="NVIDIA H200", versions=VERSIONS,
               steps=16, idle_us=idle, kernels=[dict(name=n, category=c, launches=k, us=us)
                                                 for n, c, k, us in kernels])
    return run if commit is None else dict(run, commit=commit)


def _runs():
    """dense 8x32K: a layer's attention 100 µs, merge 2 µs. quest (2 dense + 30 sparse layers): 8x32K with 20 µs
    scores, 5 µs top-k, 3 µs of a one-launch bounds update per step, 20 µs attention and 1 µs merge per sparse
    layer; 16x32K with 40 µs scores and 30 + 1.5 µs FlashInfer per sparse layer beside dense layers of twice the
    8x32K dense layer (its KV bytes)."""
    gemm = ("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT", "gemm", 32, 4000.0)
    dense = _run("dense", "8x32K", 12.0, 400.0, [(ATTENTION, "flashinfer", 32, 3200.0), gemm,
                                                 (MERGE, "flashinfer", 32, 64.0)])
    quest = _run("quest", "8x32K", 7.0, 700.0, [
        gemm, (ATTENTION, "flashinfer", 32, 2 * 100 + 30 * 20.0), ("quest_page_scores", "sparse", 30, 600.0),
        ("topk_pages", "sparse", 30, 150.0), (MERGE, "flashinfer", 32, 2 * 2 + 30 * 1.0),
        ("page_bounds_update_layers", "sparse", 1, 3.0)])
    quest16 = _run("quest", "16x32K", 9.0, 900.0, [
        (ATTENTION, "flashinfer", 32, 2 * 200 + 30 * 30.0), ("quest_page_scores", "sparse", 30, 1200.0),
        (MERGE, "flashinfer", 32, 2 * 4 + 30 * 1.5)])
    return [quest, quest16, dense]


def _operator(commit="abc1234"):
    def row(config, budget, us_graph, method="quest"):
        return dict(method=method, config=config, batch=8, context=32768, budget=budget, us_eager=us_graph + 20,
                    us_graph=us_graph)
    return dict(gpu="NVIDIA H200", commit=commit, peak_gbps=4224.0, l2="warm (back to back)", rows=[
        row("dense", 32768, 250.0, "dense"), row("quest", 1024, 40.0), row("quest-fast", 2048, 50.0),
        row("quest", 2048, 70.0)])


def test_sparse_layer_bytes_are_page_bounds_plus_selected_kv():
    shape = profile_e2e.model_shape(MODEL_CONFIG)
    assert shape == dict(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    quest = profile_e2e.SparseConfig.load("quest:bounds_dtype=bf16")
    # 8 requests x 2048 pages x 8 KV heads x (min, max) x 128 x 2 bytes; 8 x 8 x 2048 tokens x (K, V) x 128 x 2
    assert profile_e2e.sparse_layer_bytes(8, 32768, shape, quest) == dict(
        page_bounds=67108864, selected_kv=67108864, total=134217728)
    short = profile_e2e.sparse_layer_bytes(1, 1000, shape, quest)              # 63 pages, 1000 tokens < budget
    assert short == dict(page_bounds=63 * 8 * 512, selected_kv=8 * 1000 * 512, total=63 * 8 * 512 + 8 * 1000 * 512)
    int8 = profile_e2e.SparseConfig.load("quest:bounds_dtype=int8")            # rows of 128 + 128 codes + lo, scale
    assert profile_e2e.sparse_layer_bytes(8, 32768, shape, int8)["page_bounds"] == 8 * 2048 * 8 * 264
    # selection reuse: one scan in reselect_every steps at the steady state, the selected K/V every step
    fast = profile_e2e.SparseConfig.load("quest-fast:reselect_min_cosine=-1")
    assert fast.reselect_every == 4
    assert profile_e2e.sparse_layer_bytes(8, 32768, shape, fast) == dict(
        page_bounds=8 * 2048 * 8 * 264 // 4, selected_kv=67108864, total=8 * 2048 * 8 * 264 // 4 + 67108864)
    for spec in ("twilight", "quest:bounds_dtype=bf16,coarse_page_tokens=64"):
        with pytest.raises(ValueError, match="page scan over every page"):
            profile_e2e.sparse_layer_bytes(8, 32768, shape, profile_e2e.SparseConfig.load(spec))


def test_method_takes_any_server_config(monkeypatch, tmp_path, capsys):
    seen = []
    summary = profile_e2e.summarize(profile_e2e.load_gpu_events(_trace(tmp_path)), steps=2)

    def profile_server(args):                       # the server part: what main() passes it, a summary back
        seen.append(args.method)
        return dict(method=args.method, point=args.point, ms_per_step=1.0, gpu="NVIDIA H200", **summary)

    monkeypatch.setattr(profile_e2e, "stop_servers_on_sigterm", lambda: None)
    monkeypatch.setattr(profile_e2e, "profile_server", profile_server)
    out = tmp_path / "p.json"
    for method in ("dense", "quest-fast", "quest-fast:reselect_min_cosine=-1"):
        monkeypatch.setattr(sys, "argv", ["profile_e2e.py", "--method", method, "--out", str(out)])
        assert profile_e2e.main() == 0
    assert seen == ["dense", "quest-fast", "quest-fast:reselect_min_cosine=-1"]
    for bad, message in (("quest-slow", "is not a preset"), ("quest:token_budget=7", "token_budget")):
        monkeypatch.setattr(sys, "argv", ["profile_e2e.py", "--method", bad, "--out", str(out)])
        with pytest.raises(SystemExit):
            profile_e2e.main()
        assert message in capsys.readouterr().err


def test_dense_layer_from_the_same_point_or_scaled_by_kv_bytes():
    dense = [_runs()[2]]
    assert profile_e2e.dense_layer_us(8, 32768, dense, 32) == pytest.approx(
        dict(attention_us=100.0, merge_us=2.0, point="8x32K", scale=1.0))
    assert profile_e2e.dense_layer_us(16, 32768, dense, 32) == pytest.approx(
        dict(attention_us=200.0, merge_us=4.0, point="8x32K", scale=2.0))
    assert profile_e2e.dense_layer_us(8, 32768, [], 32) is None
    with pytest.raises(ValueError, match="not one per layer"):
        profile_e2e.dense_layer_us(8, 32768, dense, 40)


def test_combine_accounts_each_sparse_run_per_layer_and_step():
    out = profile_e2e.combine(_runs(), _operator(), MODEL_CONFIG, commit="abc1234")
    assert (out["gpu"], out["versions"], out["commit"]) == ("NVIDIA H200", VERSIONS, "abc1234")
    assert [r["commit"] for r in out["runs"]] == ["abc1234"] * 3
    assert out["operator"] == dict(gpu="NVIDIA H200", commit="abc1234", peak_gbps=4224.0, l2="warm (back to back)")
    a8, a16 = out["accounting"]
    assert (a8["point"], a8["batch"], a8["context"], a8["sparse_layers"], a8["token_budget"]) == (
        "8x32K", 8, 32768, 30, 2048)
    assert a8["in_server_split_us"] == pytest.approx({"quest_page_scores": 20.0, "topk_pages": 5.0,
                                                      "page_bounds_update_layers": 0.1,
                                                      "flashinfer_attention": 20.0, "flashinfer_merge": 1.0})
    assert a8["in_server_us"] == pytest.approx(46.1)
    # the quest preset's int8 bounds rows (8 x 2048 pages x 8 heads x 264 B) + 2048 tokens' K/V (8 x 8 x 2048 x 512 B)
    assert a8["floor_us"] == pytest.approx((8 * 2048 * 8 * 264 + 67108864) / profile_e2e.COPY_PEAK_GBPS / 1e3)
    assert (a8["operator_us"], a8["operator_dense_us"]) == (70.0, 250.0)       # quest at budget 2048, not quest-fast
    assert (a8["ms_per_step"], a8["dense_ms_per_step"], a8["idle_vs_dense_us"]) == (7.0, 12.0, 300.0)
    assert a16["dense_layer"]["scale"] == 2.0
    assert a16["in_server_split_us"] == pytest.approx({"quest_page_scores": 40.0, "flashinfer_attention": 30.0,
                                                       "flashinfer_merge": 1.5})
    assert a16["bytes"]["total"] == 2 * a8["bytes"]["total"]
    assert all(a16[k] is None for k in ("operator_us", "dense_ms_per_step", "dense_idle_us", "idle_vs_dense_us"))


def test_combine_refuses_mixed_or_missing_commits_and_a_sparse_run_without_dense():
    runs = _runs()
    with pytest.raises(ValueError, match="pass --commit"):
        profile_e2e.combine(runs, None, MODEL_CONFIG)
    with pytest.raises(ValueError, match="differ in commit"):
        profile_e2e.combine([dict(runs[0], commit="0000000")] + runs[1:], None, MODEL_CONFIG, commit="abc1234")
    with pytest.raises(ValueError, match="operator benchmark"):
        profile_e2e.combine(runs, _operator("0000000"), MODEL_CONFIG, commit="abc1234")
    with pytest.raises(ValueError, match="needs a dense run"):
        profile_e2e.combine(runs[:2], None, MODEL_CONFIG, commit="abc1234")
    recorded = [dict(r, commit="abc1234") for r in runs]                       # a summary that records its commit
    assert profile_e2e.combine(recorded, None, MODEL_CONFIG)["accounting"][0]["operator_us"] is None


def test_combine_command_writes_one_file(tmp_path, monkeypatch):
    paths = []
    for run in _runs():
        paths.append(tmp_path / f"{run['method']}_{run['point']}.json")
        paths[-1].write_text(json.dumps(run))
    (tmp_path / "op.json").write_text(json.dumps(_operator()))
    out = tmp_path / "combined.json"
    monkeypatch.setattr(sys, "argv", ["profile_e2e.py", "--combine", *map(str, paths), "--operator",
                                      str(tmp_path / "op.json"), "--commit", "abc1234", "--out", str(out)])
    assert profile_e2e.main() == 0
    data = json.loads(out.read_text())
    assert [a["point"] for a in data["accounting"]] == ["8x32K", "16x32K"] and len(data["runs"]) == 3
    monkeypatch.setattr(sys, "argv", ["profile_e2e.py", "--combine", *map(str, paths), "--out", str(out)])
    with pytest.raises(SystemExit):                                           # no commit recorded or given
        profile_e2e.main()


def _host_trace(tmp_path: Path) -> Path:
    """Three steps on the scheduler thread (tid 1), 1000 us apart: a top-level aten::copy_ (40 us) whose
    cudaMemcpyAsync waited 30 us, a plan range (100 us) holding an aten::fill_ and a short cudaStreamSynchronize
    (5 us, not a wait worth listing), then cudaGraphLaunch; a GPU kernel, Python calls (with_stack) and another
    thread's op (tid 2)."""
    events = []
    for step in range(3):
        t = 1000.0 * step
        events += [{"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "tid": 1, "ts": t, "dur": 40},
                   {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "tid": 1, "ts": t + 5, "dur": 30},
                   {"ph": "X", "cat": "user_annotation", "name": "sgl_sparse.plan", "tid": 1, "ts": t + 50,
                    "dur": 100},
                   {"ph": "X", "cat": "cpu_op", "name": "aten::fill_", "tid": 1, "ts": t + 60, "dur": 10},
                   {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "tid": 1, "ts": t + 80,
                    "dur": 5},
                   {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "tid": 1, "ts": t + 200 + step,
                    "dur": 8},
                   _kernel("nvjet_x", t + 210, 500),
                   {"ph": "X", "cat": "python_function", "name": "/w/sgl_sparse/decode.py(540): plan", "tid": 1,
                    "ts": t + 50, "dur": 120},
                   {"ph": "X", "cat": "python_function", "name": "sglang/srt/managers/scheduler.py(9): run_batch",
                    "tid": 1, "ts": t, "dur": 300},
                   {"ph": "X", "cat": "python_function", "name": "torch/nn/modules/module.py(1): _call_impl",
                    "tid": 1, "ts": t + 210, "dur": 50}]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 2, "ts": 55, "dur": 2000})
    # the profiler's step range holds everything; another process's thread 1 holds an op spanning a copy_
    events.append({"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#7", "tid": 1, "ts": 0, "dur": 3000})
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::bmm", "pid": 9, "tid": 1, "ts": 0, "dur": 45})
    events.append({"ph": "X", "cat": "python_function", "name": "/w/not_sgl_sparse/x.py(1): f", "tid": 1,
                   "ts": 0, "dur": 10})
    path = tmp_path / "h-TP-0-DECODE.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_host_summary_finds_the_waits_and_the_loop_period(tmp_path):
    h = profile_e2e.host_summary(profile_e2e.load_host_events(_host_trace(tmp_path)), steps=3)
    assert h["graph_launches"] == 3
    assert h["graph_launch_period_us"] == pytest.approx(1001)
    assert h["blocking"] == [dict(call="cudaMemcpyAsync", inside="aten::copy_", count=1, us=pytest.approx(30),
                                  longest_us=30)]
    tops = {t["name"]: (t["count"], t["us"]) for t in h["top_ops"]}
    # aten::fill_ is inside the plan range, not top-level; the other thread's op counts once in three steps
    # the other process's aten::bmm does not swallow this thread's first aten::copy_; ProfilerStep# is left out
    assert tops == {"aten::copy_": (1, pytest.approx(40)), "sgl_sparse.plan": (1, pytest.approx(100)),
                    "aten::mm": (pytest.approx(1 / 3), pytest.approx(2000 / 3)),
                    "aten::bmm": (pytest.approx(1 / 3), pytest.approx(15))}
    assert [t["name"] for t in h["top_ops"]][0] == "aten::mm"
    # this package's functions and the scheduler's steps, inclusive; not torch's own
    assert h["functions"] == [dict(name="sglang/srt/managers/scheduler.py(9): run_batch", count=1, us=300),
                              dict(name="/w/sgl_sparse/decode.py(540): plan", count=1, us=120)]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        profile_e2e.host_summary([], steps=0)

