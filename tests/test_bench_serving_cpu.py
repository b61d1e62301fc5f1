"""launch/bench_serving.py's own logic on CPU: command lines (checked by SGLang's own parsers), the offline tokenizer
and dataset, parsing bench_serving's results into rows, decode shares, targets, merging runs, and one real
``python -m sglang.bench_serving`` run against a small fake SGLang server through the script's own run_config."""

from __future__ import annotations

import json
import sys
import threading
import time
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import bench_serving as bs  # noqa: E402

LLAMA_VOCAB = 128256


def args_for(**kw):
    return Namespace(**dict(dict(configs=["dense", "quest"], workloads=["32k", "mixed"], concurrency=[1, 4, 16],
                                 rounds=1, mixed_rounds=2, model=bs.MODEL_DIR, mem_fraction_static=0.85, seed=1,
                                 start_timeout=60, bench_timeout=300), **kw))


def test_prompt_counts_and_command_lines(tmp_path):
    assert [bs.num_prompts(c, 1) for c in (1, 4, 16)] == [2, 4, 16]
    assert [bs.num_prompts(c, 2) for c in (1, 4, 16)] == [2, 8, 32]
    cmd = bs.bench_command(4321, Path("/m"), Path("/tok"), "32k", 16, 16, 17, tmp_path / "r.jsonl")
    flags = dict(zip(cmd[3:], cmd[4:]))
    assert cmd[1:3] == ["-m", "sglang.bench_serving"] and "--tokenize-prompt" in cmd and "--flush-cache" in cmd
    assert (flags["--dataset-name"], flags["--random-input-len"], flags["--random-output-len"],
            flags["--random-range-ratio"], flags["--max-concurrency"], flags["--num-prompts"], flags["--port"],
            flags["--request-rate"], flags["--tokenizer"]) == ("random-ids", "32768", "2048", "1.0", "16", "16",
                                                               "4321", "inf", "/tok")
    mixed = bs.bench_command(1, Path("/m"), Path("/tok"), "mixed", 4, 8, 5, tmp_path / "r.jsonl")
    assert mixed[mixed.index("--random-range-ratio") + 1] == "0.03125"             # 1K..32K prompts, 64..2K outputs
    backend, config, extra = bs.server_spec("dense", args_for(), Path("/tok"))
    assert (backend, config) == ("flashinfer", None)
    opts = dict(zip(extra, extra[1:]))
    assert opts["--page-size"] == "16" and opts["--tokenizer-path"] == "/tok" and opts["--load-format"] == "dummy"
    assert opts["--max-total-tokens"] == str(16 * (32768 + 2048 + 16) + 8192)     # 16 x 32K+2K, the same for all
    assert opts["--max-running-requests"] == "16" and "--skip-tokenizer-init" not in extra
    assert bs.server_spec("quest", args_for(), Path("/tok"))[:2] == ("sgl_sparse", "quest")
    extra = bs.server_spec("quest", args_for(concurrency=[1, 4]), Path("/t"))[2]
    small = dict(zip(extra, extra[1:]))
    assert small["--max-total-tokens"] == str(4 * (32768 + 2048 + 16) + 8192) and small["--page-size"] == "16"


def test_flags_accepted_by_sglang_parsers(tmp_path):
    pytest.importorskip("sglang")
    from sgl_sparse.serving import server_command

    parsed = bs.check_bench_flags(bs.bench_command(1, Path("/m"), Path("/tok"), "mixed", 16, 32, 17,
                                                   tmp_path / "r.jsonl"))
    assert (parsed.dataset_name, parsed.tokenize_prompt, parsed.random_range_ratio, parsed.max_concurrency,
            parsed.num_prompts, parsed.flush_cache, parsed.backend, parsed.request_rate) == \
        ("random-ids", True, 1 / 32, 16, 32, True, "sglang", float("inf"))
    with pytest.raises(bs.BenchError, match="rejected"):
        bs.check_bench_flags([sys.executable, "-m", "sglang.bench_serving", "--no-such-flag"])
    commands = {c: server_command(str(bs.MODEL_DIR), backend=b, sparse_config=s, port=0, extra_args=e)
                for c, (b, s, e) in ((c, bs.server_spec(c, args_for(), Path("/tok"))) for c in ("dense", "quest"))}
    bs.check_flags(commands)


def test_offline_tokenizer_and_dataset_give_exact_random_prompts(tmp_path):
    pytest.importorskip("sglang")
    from sglang.benchmark.datasets import get_dataset
    from sglang.benchmark.utils import get_tokenizer
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer as server_tokenizer

    path = bs.write_tokenizer(tmp_path / "tok", LLAMA_VOCAB)
    assert bs.write_tokenizer(path, LLAMA_VOCAB) == path                              # kept when it matches
    assert sorted(p.name for p in path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = get_tokenizer(str(path))                                                     # bench_serving's loader
    assert tok.vocab_size == LLAMA_VOCAB
    text = tok.decode([5, 77, LLAMA_VOCAB - 1])
    assert text == f"t5 t77 t{LLAMA_VOCAB - 1}" and tok.encode(text, add_special_tokens=False) == [5, 77, 128255]
    assert server_tokenizer(str(path)).decode([1, 2]) == "t1 t2"                       # the server's loader
    for workload, lengths in (("32k", (32768, 32768, 2048, 2048)), ("mixed", (1024, 32768, 64, 2048))):
        args = bs.check_bench_flags(bs.bench_command(1, Path("/m"), path, workload, 16, 24, 17, tmp_path / "r"))
        rows = get_dataset(args, tok)
        assert len(rows) == 24 and all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in rows)
        assert all(lengths[0] <= r.prompt_len <= lengths[1] and lengths[2] <= r.output_len <= lengths[3]
                   for r in rows)
        assert all(0 <= t < LLAMA_VOCAB for r in rows for t in r.prompt)
        if workload == "mixed":
            assert len({r.prompt_len for r in rows}) > 12                              # lengths really mixed


def bench_result(**kw):
    base = dict(completed=16, duration=100.0, total_input_tokens=16 * 32768, total_output_tokens=16 * 2048,
                output_throughput=327.68, median_tpot_ms=30.0, p99_tpot_ms=45.0, mean_tpot_ms=31.0,
                median_ttft_ms=20000.0, mean_ttft_ms=21000.0, p99_ttft_ms=39000.0, median_itl_ms=25.0,
                p99_itl_ms=60.0, median_e2e_latency_ms=80000.0, request_throughput=0.16, server_info={"big": 1})
    return dict(base, **kw)


def test_result_rows_from_bench_serving_output(tmp_path):
    out = tmp_path / "r.jsonl"
    with pytest.raises(bs.BenchError, match="no result"):
        bs.parse_result(out)
    out.write_text(json.dumps(bench_result(median_tpot_ms=99.0)) + "\n" + json.dumps(bench_result()) + "\n\n")
    row = bs.result_row("quest-fast", "32k", 16, 16, bs.parse_result(out))            # the last line counts
    assert (row["config"], row["method"], row["workload"], row["concurrency"], row["input_len"],
            row["output_len"], row["median_tpot_ms"], row["duration_s"]) == ("quest-fast", "quest", "32k", 16, 32768,
                                                                               2048, 30.0, 100.0)
    assert row["mean_input_len"] == 32768 and row["mean_output_len"] == 2048 and "server_info" not in row
    assert "error" not in row and bs.measured(row)
    short = bs.result_row("dense", "mixed", 4, 8, bench_result(completed=6))
    assert short["error"] == "6 of 8 requests completed" and not bs.measured(short)


def test_rows_say_where_the_batch_floor_kept_decode_dense():
    """The vattention preset's floor (262144 tokens) is above 4 x (32K + 2K) and below 8 x 32K: its rows at
    concurrency 1 and 4 ran every decode step on the dense path, at 8 and 16 some (while fewer requests run); a
    floor-free config is sparse throughout; the mixed workload's lengths straddle the floor."""
    floor = bs.SparseConfig.load("vattention").min_batch_tokens
    assert 4 * (32768 + 2048) < floor <= 8 * 32768
    assert [bs.decode_path("vattention", "32k", c) for c in (1, 4, 8, 16)] == ["dense", "dense", "both", "both"]
    assert bs.decode_path("vattention:min_batch_tokens=0", "32k", 1) == "sparse"
    assert bs.decode_path("twilight", "32k", 4) == "dense"
    assert [bs.decode_path("quest", w, 1) for w in ("32k", "mixed")] == ["sparse", "sparse"]
    assert bs.decode_path("vattention", "mixed", 16) == "both"
    assert bs.decode_path("dense", "32k", 16) == "dense"
    assert bs.result_row("vattention", "32k", 4, 8, bench_result())["decode_path"] == "dense"


def row(config, workload, c, tpot, tput, ttft, **kw):
    return dict(config=config, workload=workload, concurrency=c, median_tpot_ms=tpot, output_throughput=tput,
                median_ttft_ms=ttft, completed=kw.pop("completed", 4), **kw)


def test_decode_share_from_the_concurrency_1_prefill_cost(capsys):
    rows = [row("dense", "32k", 1, 8.0, 100, 2000.0, mean_ttft_ms=2000.0, completed=2, total_input_tokens=65536,
                duration_s=40.0),
            row("dense", "32k", 16, 30.0, 300, 20000.0, mean_ttft_ms=20000.0, completed=16,
                total_input_tokens=16 * 32768, duration_s=100.0),
            row("quest", "32k", 16, 15.0, 500, 20000.0, mean_ttft_ms=20000.0, total_input_tokens=524288,
                duration_s=50.0),
            row("dense", "mixed", 16, 30.0, 300, 20000.0, total_input_tokens=1000, duration_s=10.0)]
    bs.add_decode_shares(rows)
    # 2 s of prefill per 32K prompt: c=1 spends 4 of 40 s in prefill; c=16 32 of 100 s; quest's c=1 is missing
    assert rows[0]["decode_share"] == pytest.approx(0.9) and rows[1]["decode_share"] == pytest.approx(0.68)
    assert "decode_share" not in rows[2] and "decode_share" not in rows[3]
    for r in rows:
        r.update(mean_input_len=1, mean_output_len=1, p99_tpot_ms=1.0)
    bs.print_table(rows, [], "cpu")
    assert "dense 32k c=16: decode ~68% of the run; with decode free the run could be at most 3.12x faster, " \
           "with decode 2x faster at most 1.52x" in capsys.readouterr().out


def test_decode_share_prefers_the_rows_own_run():
    """In a combined file the prefill rate comes from the row's own run where it measured concurrency 1, else from
    the first run that did (and the row says which)."""
    def c1(run, ttft_ms):
        return row("dense", "32k", 1, 8.0, 100, ttft_ms, mean_ttft_ms=ttft_ms, completed=2,
                   total_input_tokens=65536, duration_s=40.0, run=run)
    c16 = [row("dense", "32k", 16, 30.0, 300, 20000.0, completed=16, total_input_tokens=16 * 32768,
               duration_s=100.0, run=run) for run in (0, 1, 2)]
    rows = [c1(1, 2000.0), c1(2, 1000.0), *c16]
    bs.add_decode_shares(rows)
    assert c16[1]["decode_share"] == pytest.approx(0.68) and "decode_share_from_run" not in c16[1]   # own run
    assert c16[2]["decode_share"] == pytest.approx(0.84) and "decode_share_from_run" not in c16[2]   # own run
    assert c16[0]["decode_share"] == pytest.approx(0.68) and c16[0]["decode_share_from_run"] == 1    # first run's


def test_combine_prefers_a_row_whose_run_has_dense_beside_it(tmp_path, capsys):
    """A config measured in two runs, the first without a dense row at that point: the second run's pair wins."""
    orphan = dict(gpu="NVIDIA H200", commit="a", rows=[
        row("quest", "32k", 16, 14.0, 450.0, 21000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=20.0),
        dict(row("dense", "32k", 16, 1.0, 1.0, 1.0), error="server died")])
    paired = dict(gpu="NVIDIA H200", commit="b", rows=[
        row("dense", "32k", 16, 30.0, 300.0, 20000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=40.0),
        row("quest", "32k", 16, 15.0, 450.0, 21000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=20.0)])
    paths = [tmp_path / "orphan.json", tmp_path / "paired.json"]
    for path, run in zip(paths, (orphan, paired)):
        path.write_text(json.dumps(run))
    assert bs.combine([str(p) for p in paths], tmp_path / "all.json") == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [(r["config"], r["commit"]) for r in merged["rows"]] == [("dense", "b"), ("quest", "b")]
    t = {x["metric"]: x for x in merged["targets"] if x["config"] == "quest" and x["workload"] == "32k"}
    assert t["median_tpot_speedup"]["value"] == 2.0


def test_targets_against_dense():
    rows = [row("dense", "32k", 16, 30.0, 300.0, 20000.0), row("quest", "32k", 16, 15.5, 450.0, 21500.0),
            row("twilight", "32k", 16, 14.0, 400.0, 23000.0)]
    for c, dense_tput, quest_tput in ((1, 100.0, 120.0), (4, 200.0, 199.0), (16, 300.0, 301.0)):
        rows += [row("dense", "mixed", c, 10.0, dense_tput, 500.0), row("quest", "mixed", c, 9.0, quest_tput, 500.0)]
    rows.append(dict(row("quest", "mixed", 32, 1.0, 1.0, 1.0), error="cut"))           # errors never count
    targets = bs.evaluate_targets(rows, ["dense", "quest", "twilight", "vattention"])
    got = {(t["config"], t["workload"], t["concurrency"], t["metric"]): t for t in targets}
    quest = lambda w, c, m: got[("quest", w, c, m)]  # noqa: E731
    assert quest("32k", 16, "median_tpot_speedup")["value"] == pytest.approx(30 / 15.5)
    assert quest("32k", 16, "median_tpot_speedup")["met"] is True                      # 1.94x >= 1.9x
    assert quest("32k", 16, "output_throughput_ratio")["met"] is True                  # 1.5x >= 1.4x
    assert quest("32k", 16, "median_ttft_ratio")["met"] is True                        # +7.5 % <= +10 %
    assert got[("twilight", "32k", 16, "median_ttft_ratio")]["met"] is False           # +15 %
    assert got[("twilight", "32k", 16, "median_tpot_speedup")]["binding"] is False
    assert quest("32k", 16, "median_tpot_speedup")["binding"] is True
    assert [quest("mixed", c, "output_throughput_ratio")["met"] for c in (1, 4, 16)] == [True, False, True]
    assert ("quest", "mixed", 32, "output_throughput_ratio") in got and \
        got[("quest", "mixed", 32, "output_throughput_ratio")]["met"] is None
    assert got[("vattention", "32k", 16, "median_tpot_speedup")]["met"] is None        # not measured
    assert not any(t["config"] == "dense" for t in targets)


def test_combine_merges_runs_with_table_and_plot(tmp_path, capsys):
    first = dict(gpu="NVIDIA H200", commit="a", rows=[
        row("dense", "32k", 16, 30.0, 300.0, 20000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=40.0),
        dict(config="quest", workload="-", concurrency=0, failed_at="start-up", error="boom")])
    second = dict(gpu="NVIDIA H200", commit="b", rows=[
        row("quest", "32k", 16, 15.0, 450.0, 21000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=20.0),
        row("dense", "32k", 16, 31.5, 300.0, 20000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=40.0),
        row("twilight", "32k", 4, 5.0, 100.0, 2000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=6.0)])
    paths = []
    for i, run in enumerate((first, second)):
        paths.append(str(tmp_path / f"run{i}.json"))
        Path(paths[-1]).write_text(json.dumps(run))
    out = tmp_path / "all.json"
    assert bs.combine(paths, out) == 0
    merged = json.loads(out.read_text())
    # quest keeps the dense row of its own run (the first run's dense row at that point goes); twilight's run had
    # no dense row at its point
    assert [(r["config"], r["run"], r["commit"]) for r in merged["rows"]] == [
        ("twilight", 1, "b"), ("dense", 1, "b"), ("quest", 1, "b")]
    t = {(x["config"], x["metric"]): x for x in merged["targets"] if x["workload"] == "32k"}
    assert t[("quest", "median_tpot_speedup")]["value"] == 2.1 and t[("quest", "median_tpot_speedup")]["met"]
    assert t[("twilight", "median_tpot_speedup")]["met"] is None           # never against another run's dense
    assert merged["gpu"] == "NVIDIA H200"
    printed = capsys.readouterr().out
    assert "target quest      32k   c=16  median_tpot_speedup >= 1.9: 2.10 met" in printed
    assert "twilight    32k         4  32768  2048    100.0     5.00    6.00      2000      -       " in printed
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_combining_a_combined_file_keeps_each_rows_commit(tmp_path, capsys):
    old = dict(gpu="NVIDIA H200", rows=[           # a combined file: no commit of its own, one per row
        dict(row("dense", "32k", 4, 10.0, 300.0, 3000.0, mean_input_len=32768, mean_output_len=2048,
                 p99_tpot_ms=11.0), commit="a"),
        dict(row("dense", "32k", 16, 25.0, 400.0, 12000.0, mean_input_len=32768, mean_output_len=2048,
                 p99_tpot_ms=30.0), commit="a")])
    new = dict(gpu="NVIDIA H200", commit="c", rows=[
        row("dense", "32k", 16, 24.0, 410.0, 12100.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=29.0),
        row("quest", "32k", 16, 13.0, 600.0, 12200.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=19.0)])
    paths = [str(tmp_path / "new.json"), str(tmp_path / "old.json")]
    Path(paths[0]).write_text(json.dumps(new))
    Path(paths[1]).write_text(json.dumps(old))
    out = tmp_path / "all.json"
    assert bs.combine(paths, out) == 0
    merged = json.loads(out.read_text())
    assert sorted((r["config"], r["concurrency"], r["commit"]) for r in merged["rows"]) == [
        ("dense", 4, "a"), ("dense", 16, "c"), ("quest", 16, "c")]


def test_a_combined_input_lists_its_own_files_and_runs(tmp_path, capsys):
    """Combining a file that ``combine`` wrote: its inputs and runs go in its place, and every row's ``run`` points
    at the run it came from in the new list."""
    runs = [dict(gpu="NVIDIA H200", commit=c, rows=[
        row(config, "32k", conc, tpot, 400.0, 12000.0, mean_input_len=32768, mean_output_len=2048, p99_tpot_ms=30.0)
        for config, tpot in (("dense", 24.0), ("quest", 13.0))]) for c, conc in (("a", 16), ("b", 4), ("c", 1))]
    paths = [tmp_path / f"{c}.json" for c in "abc"]
    for path, run in zip(paths, runs):
        path.write_text(json.dumps(run))
    assert bs.combine([str(paths[0]), str(paths[1])], tmp_path / "ab.json") == 0
    assert bs.combine([str(tmp_path / "ab.json"), str(paths[2])], tmp_path / "abc.json") == 0
    merged = json.loads((tmp_path / "abc.json").read_text())
    assert merged["combined"] == ["a.json", "b.json", "c.json"]
    assert [r["commit"] for r in merged["runs"]] == ["a", "b", "c"]
    assert {(r["concurrency"], r["run"], r["commit"]) for r in merged["rows"]} == {(16, 0, "a"), (4, 1, "b"),
                                                                                 (1, 2, "c")}


# ----------------------------------------------------------------------------- bench_serving itself, end to end

class FakeSGLang:
    """What bench_serving talks to: streamed ``/generate`` (one SSE chunk per token with SGLang's ``text`` and
    ``meta_info``; TTFT ``ttft`` s, then ``tpot`` s per token), ``/flush_cache``, ``/server_info``."""

    def __init__(self, ttft=0.02, tpot=0.003):
        self.prompts, self.flushes = [], 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply({"internal_states": [{}]})

            def do_POST(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else {}
                if self.path.startswith("/flush_cache"):
                    fake.flushes += 1
                    return self.reply({})
                fake.prompts.append(body["input_ids"])
                n = body["sampling_params"]["max_new_tokens"]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(ttft)
                for k in range(1, n + 1):
                    if k > 1:
                        time.sleep(tpot)
                    meta = dict(completion_tokens=k, finish_reason={"type": "length"} if k == n else None)
                    self.wfile.write(b"data: " + json.dumps(dict(text=f" t{k}", meta_info=meta)).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


class FakeServerProcess:
    def __init__(self, model, *, backend, sparse_config=None, extra_args=(), log_path=None, env=None):
        self.backend, self.sparse_config, self.extra, self.log_path = backend, sparse_config, extra_args, log_path
        FakeServerProcess.last = self

    def start(self):
        self.fake = FakeSGLang()
        self.port = self.fake.port
        return self

    def wait_ready(self, timeout=0):
        return self

    def alive(self):
        return True

    def stop(self):
        self.fake.httpd.shutdown()


def test_real_bench_serving_run_against_fake_server(tmp_path, monkeypatch):
    """The script's own bench_serving command, run for real: its prompts reach the server as token ids of the
    asked length, and its result file becomes a row with the fake's timings."""
    pytest.importorskip("sglang")
    monkeypatch.setitem(bs.WORKLOADS, "32k", dict(input_len=96, output_len=12, range_ratio=1.0))
    monkeypatch.setattr(bs, "ServerProcess", FakeServerProcess)
    tokenizer = bs.write_tokenizer(tmp_path / "tok", LLAMA_VOCAB)
    rows, saves = [], []
    args = args_for(configs=["quest"], workloads=["32k"], concurrency=[3], rounds=2)
    bs.run_config("quest", args, tokenizer, tmp_path, rows, lambda: saves.append(len(rows)))
    assert FakeServerProcess.last.backend == "sgl_sparse" and FakeServerProcess.last.sparse_config == "quest"
    assert saves == [1] and len(rows) == 1 and "error" not in rows[0], rows
    r = rows[0]
    assert (r["config"], r["workload"], r["concurrency"], r["num_prompts"], r["completed"]) == ("quest", "32k", 3, 6, 6)
    assert r["mean_input_len"] == 96 and r["mean_output_len"] == 12 and r["total_output_tokens"] == 72
    assert 2.5 < r["median_tpot_ms"] < 30 and 15 < r["median_ttft_ms"] < 500 and r["output_throughput"] > 0
    prompts = FakeServerProcess.last.fake.prompts
    assert len(prompts) == 7 and all(len(p) == 96 and all(isinstance(t, int) for t in p) for p in prompts)  # + warm-up
    assert FakeServerProcess.last.fake.flushes == 1                                    # after the warm-up
    assert (tmp_path / "bench_quest_32k_c3.log").read_text().startswith(sys.executable)


def test_failed_points_become_error_rows_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "ServerProcess", FakeServerProcess)
    monkeypatch.setattr(bs, "bench_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
    rows, saves = [], []
    bs.run_config("dense", args_for(workloads=["32k"], concurrency=[1, 4]), tmp_path / "tok", tmp_path, rows,
                  lambda: saves.append(len(rows)))
    assert [r["failed_at"] for r in rows] == ["32k c=1", "32k c=4"] and saves == [1, 2]
    assert all("exited with 3" in r["error"] and not bs.measured(r) for r in rows)
    bs.print_table(rows, [], "cpu")                                                    # error rows print too

    class NoStart(FakeServerProcess):
        def wait_ready(self, timeout=0):
            raise bs.ServerError("server exited with code 1")

    monkeypatch.setattr(bs, "ServerProcess", NoStart)
    rows = []
    bs.run_config("quest", args_for(), tmp_path / "tok", tmp_path, rows, lambda: None)
    assert len(rows) == 1 and rows[0]["failed_at"] == "server" and "code 1" in rows[0]["error"]


def test_an_inline_config_serves_under_its_own_name(tmp_path, monkeypatch, capsys):
    """A preset with inline overrides reaches the server as its --sparse-config, keeps its spec as the row's config
    (with the method it runs) and names its log files safely; an invalid spec is an argparse error naming it."""
    pytest.importorskip("sglang")
    spec = "twilight:residual_sample=true,token_budget=2048,sample_capacity=320"
    monkeypatch.setitem(bs.WORKLOADS, "32k", dict(input_len=64, output_len=8, range_ratio=1.0))
    monkeypatch.setattr(bs, "ServerProcess", FakeServerProcess)
    tokenizer = bs.write_tokenizer(tmp_path / "tok", LLAMA_VOCAB)
    rows = []
    bs.run_config(spec, args_for(configs=[spec], workloads=["32k"], concurrency=[1]), tokenizer, tmp_path, rows,
                  lambda: None)
    assert FakeServerProcess.last.sparse_config == spec and FakeServerProcess.last.backend == "sgl_sparse"
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert (rows[0]["config"], rows[0]["method"]) == (spec, "twilight")
    assert (tmp_path / "bench_twilight_residual_sample_true_token_budget_2048_sample_capacity_320_32k_c1.log").exists()
    monkeypatch.setattr(sys, "argv", ["bench_serving.py", "--configs", "dense", "twilight:top_p=2"])
    with pytest.raises(SystemExit) as e:
        bs.main()
    assert e.value.code == 2 and "top_p" in capsys.readouterr().err
