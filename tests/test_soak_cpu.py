"""launch/soak.py's own logic on CPU: the request mix, the probes' comparison, result accounting, the checks, and
the real asyncio client (streaming, hang-ups, invalid requests, the idle leak check) against a small fake SGLang
HTTP server that answers the way SGLang 0.5.17 does (400 with ``{"error": {"message"}}``, SSE chunks with
``meta_info``, ``/v1/loads``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import soak  # noqa: E402

SMALL = soak.Mix(context_len=2048, max_prompt=1500, min_new=4, max_new=24, prefixes=3, prefix_min=64,
                 prefix_max=512, invalid_fraction=0.15, disconnect_fraction=0.3, seed=7)


# ----------------------------------------------------------------------------- the mix

def test_a_mix_without_opt_outs_sends_the_same_requests_otherwise():
    mix = soak.Mix()
    plain = dataclasses.replace(mix, opt_out_fraction=0.0)
    specs = [soak.request_spec(mix, i) for i in range(2000)]
    others = [soak.request_spec(plain, i) for i in range(2000)]
    assert any(s.opt_out for s in specs) and not any(s.opt_out for s in others)
    assert [dataclasses.replace(s, opt_out=False) for s in specs] == others


def test_mix_is_seeded_and_has_the_issue_proportions():
    mix = soak.Mix()
    specs = [soak.request_spec(mix, i) for i in range(6000)]
    assert specs[:50] == [soak.request_spec(mix, i) for i in range(50)]                  # a function of (seed, i)
    assert specs[:50] != [soak.request_spec(dataclasses.replace(mix, seed=1), i) for i in range(50)]
    valid = [s for s in specs if s.invalid is None]
    share = lambda pred, pool=specs: sum(map(pred, pool)) / len(specs)  # noqa: E731
    assert abs(share(lambda s: s.invalid is not None) - 0.03) < 0.01
    assert abs(share(lambda s: s.opt_out, valid) - 0.10) < 0.015
    assert abs(share(lambda s: s.disconnect_after is not None, valid) - 0.10) < 0.015
    assert abs(share(lambda s: s.prefix >= 0, valid) - 0.485) < 0.03
    lengths = sorted(s.prompt_len for s in valid)
    assert 100 <= lengths[0] < 130 and 25000 < lengths[-1] <= 30000                  # 100..30K, both ends reached
    assert 1000 < lengths[len(lengths) // 2] < 2700                                   # log-uniform: median ~1.7K
    assert all(8 <= s.new_tokens <= 256 for s in valid)
    hangups = [s for s in valid if s.disconnect_after is not None]
    assert all(s.stream and 0 <= s.disconnect_after <= s.new_tokens // 2 for s in hangups)
    assert any(s.disconnect_after == 0 for s in hangups)                              # before the first token too
    invalid = [s for s in specs if s.invalid is not None]
    assert {s.invalid for s in invalid} == set(soak.INVALID) and not any(s.stream for s in invalid)
    assert all(s.prompt_len > mix.context_len for s in invalid if s.invalid == "too_long")
    assert all(s.prompt_len < mix.context_len for s in invalid if s.invalid != "too_long")
    sample = soak.tally_specs(mix, 2000)                                              # what --dry-run prints
    assert abs(sample["invalid"] - 0.03) < 0.015 and sample["prompt_min"] >= 100 and sample["prompt_max"] <= 30000


def test_prompts_share_prefixes_and_are_reproducible():
    mix = soak.Mix(seed=3)
    prefixes = soak.shared_prefixes(mix)
    assert len(prefixes) == 8 and all(1024 <= len(p) <= 16384 for p in prefixes)
    specs = [soak.request_spec(mix, i) for i in range(400)]
    shared = [s for s in specs if s.prefix == 2 and s.invalid is None]
    assert len(shared) >= 4
    prompts = [soak.prompt_ids(mix, s, prefixes) for s in shared]
    for s, ids in zip(shared, prompts):
        assert len(ids) == s.prompt_len and all(mix.token_low <= t < mix.token_high for t in ids)
        head = min(len(prefixes[2]), s.prompt_len - 1)
        assert ids[:head] == prefixes[2][:head]                      # the shared part (a radix-cache hit) ...
        assert ids == soak.prompt_ids(mix, s, prefixes)              # ... and the same prompt every time
    tails = [ids[len(prefixes[2]):] for ids in prompts if len(ids) > len(prefixes[2]) + 8]
    assert len({tuple(t[:8]) for t in tails}) == len(tails)          # each request's own tokens differ
    alone = next(s for s in specs if s.prefix < 0 and s.invalid is None)
    assert soak.prompt_ids(mix, alone, prefixes)[:16] != prefixes[0][:16]


def test_request_bodies():
    opt_out = soak.request_body(soak.Spec(1, 10, 5, stream=True, opt_out=True), [1] * 10)
    assert opt_out["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 5, "ignore_eos": True,
                                          "custom_params": {"sparse": False}}
    assert opt_out["stream"] is True and opt_out["input_ids"] == [1] * 10
    bad = soak.request_body(soak.Spec(2, 10, 5, invalid="sparse_string"), [1] * 10)
    assert bad["sampling_params"]["custom_params"] == {"sparse": "no"} and bad["stream"] is False
    assert "custom_params" not in soak.request_body(soak.Spec(3, 10, 5, invalid="too_long"), [1])["sampling_params"]


# ----------------------------------------------------------------------------- accounting

def outcome(**kw):
    base = dict(index=0, invalid=None, opt_out=False, expected=8, status=200, finish="length", finish_status=None,
                tokens=8, message=None, error_code=None, disconnected=False, error=None)
    return dict(base, **kw)


@pytest.mark.parametrize("kw, category", [
    (dict(), "completed"),
    (dict(tokens=7), "unexpected"),                                                   # fewer tokens than asked
    (dict(disconnected=True, finish=None, tokens=3), "aborted"),
    (dict(disconnected=True, finish=None, tokens=None, error="ClientPayloadError: x"), "aborted"),
    (dict(invalid="too_long", status=400, finish=None, tokens=None, message="The input (2112 tokens) is longer"),
     "rejected"),
    (dict(invalid="sparse_int", status=400, finish=None, tokens=None, message=None), "unexpected"),  # no message
    (dict(invalid="sparse_string"), "unexpected"),                                    # accepted an invalid request
    (dict(invalid="sparse_string", status=500, message="boom"), "server_errors"),
    (dict(status=503, finish=None, tokens=None, message="overloaded"), "server_errors"),
    (dict(status=None, finish=None, tokens=None, error="ClientConnectorError: refused"), "server_errors"),
    (dict(status=None, finish=None, tokens=None, error="TimeoutError: "), "server_errors"),
    (dict(finish="abort", finish_status=500, tokens=3, message="Out of memory"), "server_errors"),
    (dict(finish="abort", finish_status=None, tokens=3), "server_errors"),
    (dict(finish="abort", finish_status=400, tokens=0, message="too long"), "unexpected"),
    (dict(error_code=500, message="scheduler died"), "server_errors"),
    (dict(status=400, finish=None, tokens=None, message="bad"), "unexpected"),       # a valid request refused
])
def test_classify(kw, category):
    assert soak.classify(outcome(**kw)) == category


def test_tally_counts_each_category_and_keeps_examples():
    outcomes = [outcome(), outcome(opt_out=True), outcome(opt_out=True, tokens=2),
                outcome(disconnected=True, finish=None), outcome(invalid="too_long", status=400, message="long"),
                outcome(invalid="sparse_int", status=200), outcome(status=500, message="x")]
    t = soak.tally(outcomes)
    assert (t["requests"], t["completed"], t["aborted"], t["rejected"], t["server_errors"], t["unexpected"]) == \
        (7, 2, 1, 1, 1, 2)
    assert (t["invalid_sent"], t["invalid_rejected"], t["opt_out_sent"], t["opt_out_completed"]) == (2, 1, 2, 1)
    assert len(t["examples"]["unexpected"]) == 2 and t["examples"]["server_errors"][0]["status"] == 500
    # output tokens and latency of the completed requests only
    timed = [outcome(seconds=s, tokens=8) for s in (0.5, 2.0, 1.0)] + [outcome(seconds=9.0, tokens=2)]
    t = soak.tally(timed)
    assert (t["output_tokens"], t["latency_p50_s"], t["latency_p99_s"]) == (24, 1.0, 2.0)
    assert soak.tally([outcome(status=500)])["latency_p50_s"] is None


def test_compare_greedy_allows_only_near_ties():
    ref = dict(ids=[5, 6, 7, 8], gaps=[3.0, 0.2, 2.0, 1.0])
    assert soak.compare_greedy(ref, [5, 6, 7, 8]) == "exact"
    assert soak.compare_greedy(ref, [5, 9, 1, 1]) == "near_tie"                       # first differs at a tie
    assert soak.compare_greedy(ref, [5, 6, 9, 8]) == "mismatch"
    assert soak.compare_greedy(ref, [5, 6, 7]) == "mismatch"                          # a token short
    assert soak.compare_greedy(dict(ids=[1, 2], gaps=[0.25 + 5e-5, 0.0]), [2, 2]) == "near_tie"   # fp32 slack
    assert soak.compare_greedy(dict(ids=[1, 2], gaps=[0.2502, 0.0]), [2, 2]) == "mismatch"
    counts = soak.probe_counts([ref, ref, ref], [dict(ids=[5, 6, 7, 8]), dict(ids=[5, 6, 0, 0])])
    assert (counts["mismatches"], counts["near_ties"]) == (2, 0)                      # a missing output mismatches


def test_log_counts():
    text = ("[2025] KV cache pool is full. Retract requests. #retracted_reqs: 3, #new_tokens_gained: 4096\n"
            "[2025] KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 512\n"
            "Decode batch. #running-req: 32\n")
    assert soak.log_counts(text) == dict(retractions=2, retracted_reqs=4, idle_check_warnings=0, tracebacks=0,
                                         decode_logs=0, decode_graph_share=None, decode_tokens_per_s=None)
    # SGLang 0.5.17's decode log lines (metrics_reporter.report_decode_stats)
    decode = ("[2026-11-30 08:35:58] Decode batch, #running-req: 32, #token: 40960, token usage: 0.62, "
              "cuda graph: True, gen throughput (token/s): 2100.50, #queue-req: 3\n"
              "[2026-11-30 08:36:01] Decode batch, #running-req: 30, #token: 39000, token usage: 0.60, "
              "cuda graph: False, gen throughput (token/s): 700.50, #queue-req: 0\n") * 2
    counts = soak.log_counts(decode)
    assert (counts["decode_logs"], counts["decode_graph_share"], counts["decode_tokens_per_s"]) == (4, 0.5, 1400.5)
    leak = "pool memory leak detected! [full] total=65536, available=65520\nTraceback (most recent call last):\n"
    assert soak.log_counts(leak)["idle_check_warnings"] == 1 and soak.log_counts(leak)["tracebacks"] == 1


def passing_row():
    return dict(duration_s=301.0, requests=900, completed=700, aborted=80, rejected=27, server_errors=0, unexpected=0,
                invalid_sent=27, invalid_rejected=27, opt_out_sent=90, opt_out_completed=80, leaked_tokens=0,
                probe_mismatches=0, gpu_memory_start_mib=70000, gpu_memory_end_mib=70300, retracted_reqs=12,
                idle_check_warnings=0, server_alive=True, warmup=dict(server_errors=0, unexpected=0))


def test_checks():
    args = Namespace(duration=300.0, memory_tolerance_mib=512)
    assert all(v is True for v in soak.checks(passing_row(), args).values())
    failing = {"leaked_tokens": dict(leaked_tokens=16), "probe_mismatches": dict(probe_mismatches=1),
               "memory_flat": dict(gpu_memory_end_mib=70600), "duration": dict(duration_s=120.0),
               "invalid_rejected": dict(invalid_rejected=26), "kv_pressure": dict(retracted_reqs=0),
               "server_errors": dict(warmup=dict(server_errors=1)), "server_alive": dict(server_alive=False),
               "idle_check_quiet": dict(idle_check_warnings=2), "disconnects": dict(aborted=0)}
    for check, change in failing.items():
        result = soak.checks(dict(passing_row(), **change), args)
        assert result[check] is False and sum(v is not True for v in result.values()) == 1, (check, result)
    assert soak.checks(dict(passing_row(), gpu_memory_end_mib=None), args)["memory_flat"] is None
    assert soak.checks(dict(passing_row(), probe_mismatches=None), args)["probe_mismatches"] is False


def test_soak_config_keeps_the_preset_with_min_context_zero(tmp_path):
    cfg = yaml.safe_load(soak.soak_config("quest", 1824, tmp_path / "q.yaml").read_text())
    assert (cfg["method"], cfg["token_budget"], cfg["min_context"], cfg["dense_layers"]) == ("quest", 2048, 0, 2)
    cfg = yaml.safe_load(soak.soak_config("vattention", 5000, tmp_path / "v.yaml").read_text())
    assert (cfg["method"], cfg["token_budget"], cfg["min_context"]) == ("vattention", 5008, 0)   # whole pages
    args = Namespace(max_total_tokens=65536, max_running=32, mem_fraction_static=0.85, probe_lengths=[128, 1792],
                     probe_tokens=32)
    backend, config, extra = soak.server_spec("twilight", args, tmp_path)
    assert backend == "sgl_sparse" and Path(config).name == "soak_twilight.yaml"
    assert yaml.safe_load(Path(config).read_text())["token_budget"] == 4096
    assert extra[extra.index("--max-total-tokens") + 1] == "65536" and "--page-size" in extra
    assert extra[extra.index("--schedule-policy") + 1] == "fcfs"         # long prompts are not starved
    assert soak.server_spec("dense", args, tmp_path)[:2] == ("flashinfer", None)


def test_server_flags_parse_with_sglang(tmp_path):
    pytest.importorskip("sglang")
    from sgl_sparse.serving import server_command

    args = Namespace(max_total_tokens=65536, max_running=32, mem_fraction_static=0.85, probe_lengths=[128, 1792],
                     probe_tokens=32)
    commands = {c: server_command("/m", backend=b, sparse_config=s, port=0, extra_args=e) for c, (b, s, e) in
                ((c, soak.server_spec(c, args, tmp_path)) for c in ("dense", "quest"))}
    soak.check_flags(commands)


def test_probe_prompts_are_fixed_repeated_blocks():
    a, b = soak.probe_prompts([128, 1792], 0), soak.probe_prompts([128, 1792], 0)
    assert a == b and [len(p) for p in a] == [128, 1792]
    assert a[1][:48] == a[1][48:96] and a[0][:48] != a[1][:48]


# ----------------------------------------------------------------------------- a fake SGLang server

class FakeSGLang:
    """``/generate`` (batch or one request; streamed or not; the 400s SGLang gives for the invalid kinds),
    ``/v1/loads`` from its own token accounting, ``/health_generate``. ``leak_on_disconnect``: a hung-up request's
    tokens are never given back; ``wrong_probe``: the answer to the longest probe differs at token 3."""

    def __init__(self, context_len=2048, leak_on_disconnect=False, wrong_probe=False, token_delay=0.002):
        self.context_len, self.leak, self.wrong, self.delay = context_len, leak_on_disconnect, wrong_probe, token_delay
        self.lock, self.used, self.running, self.disconnects = threading.Lock(), 0, 0, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.startswith("/v1/loads"):
                    with fake.lock:
                        load = dict(num_running_reqs=fake.running, num_waiting_reqs=0, num_used_tokens=fake.used,
                                    max_total_num_tokens=65536)
                    self.reply(200, {"loads": [load]})
                else:
                    self.reply(200, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.generate(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, ids, n, logprobs):
        out = [(sum(ids[-3:]) + k) % 1000 for k in range(n)]
        if self.wrong and len(ids) == 1792:
            out[3] += 1
        meta = dict(completion_tokens=n, prompt_tokens=len(ids), finish_reason=dict(type="length", length=n))
        if logprobs:
            meta["output_token_logprobs"] = [[-0.1, t, None] for t in out]
            meta["output_top_logprobs"] = [[[-0.1, t, None], [-2.0, t + 1, None]] for t in out]
        return dict(text="x" * n, meta_info=meta)

    def generate(self, h, body):
        params, ids = body["sampling_params"], body["input_ids"]
        if ids and isinstance(ids[0], list):                                           # a batch: the probes
            return h.reply(200, [self.answer(p, params["max_new_tokens"], body.get("return_logprob")) for p in ids])
        custom = params.get("custom_params") or {}
        if "sparse" in custom and not isinstance(custom["sparse"], bool):
            return h.reply(400, {"error": {"message": "sgl-sparse: custom_params['sparse'] must be true or false"}})
        if len(ids) >= self.context_len:
            return h.reply(400, {"error": {"message": f"The input ({len(ids)} tokens) is longer than the model's "
                                                      f"context length ({self.context_len} tokens)."}})
        n, cost = params["max_new_tokens"], len(ids) + params["max_new_tokens"]
        with self.lock:
            self.used, self.running = self.used + cost, self.running + 1
        hung_up = False
        try:
            if not body.get("stream"):
                time.sleep(self.delay * n)
                return h.reply(200, self.answer(ids, n, False))
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.end_headers()
            for k in range(1, n + 1):
                time.sleep(self.delay)
                meta = dict(completion_tokens=k, finish_reason=dict(type="length") if k == n else None)
                h.wfile.write(b"data: " + json.dumps(dict(text="x", meta_info=meta)).encode() + b"\n\n")
                h.wfile.flush()
            h.wfile.write(b"data: [DONE]\n\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            hung_up = True
        finally:
            with self.lock:
                self.running -= 1
                self.disconnects += hung_up
                if not (hung_up and self.leak):
                    self.used -= cost
            h.close_connection = True

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_client_against_fake_server_accounts_every_request():
    pytest.importorskip("aiohttp")
    fake = FakeSGLang()
    try:
        prefixes = soak.shared_prefixes(SMALL)
        outcomes, next_index = asyncio.run(soak.drive(fake.url, SMALL, prefixes, 0, 2.0, clients=12, timeout=30))
        t = soak.tally(outcomes)
        assert [o["index"] for o in outcomes] == list(range(next_index)) and next_index >= 60   # none lost
        assert t["server_errors"] == 0 and t["unexpected"] == 0, t["examples"]
        assert t["completed"] > 20 and t["aborted"] > 3 and t["rejected"] == t["invalid_sent"] > 3
        assert t["opt_out_completed"] > 0
        assert fake.disconnects > 0                                   # the server saw clients hang up
        idle = soak.idle_load(fake.url, timeout=20)
        assert idle["num_used_tokens"] == 0 and idle["max_total_num_tokens"] == 65536
    finally:
        fake.close()


def test_idle_check_finds_leaked_tokens():
    pytest.importorskip("aiohttp")
    fake = FakeSGLang(leak_on_disconnect=True)
    try:
        mix = dataclasses.replace(SMALL, disconnect_fraction=0.6, invalid_fraction=0.0)
        asyncio.run(soak.drive(fake.url, mix, soak.shared_prefixes(mix), 0, 1.5, clients=8, timeout=30))
        assert fake.disconnects > 0
        assert soak.idle_load(fake.url, timeout=20)["num_used_tokens"] > 0
    finally:
        fake.close()


def test_stopped_server_is_a_server_error_and_ends_the_load():
    pytest.importorskip("aiohttp")
    fake = FakeSGLang()
    url = fake.url
    fake.close()
    start = time.time()
    outcomes, _ = asyncio.run(soak.drive(url, SMALL, soak.shared_prefixes(SMALL), 0, 30.0, clients=4, timeout=5,
                                         alive=lambda: time.time() - start < 0.5))
    assert time.time() - start < 10 and outcomes
    assert soak.tally(outcomes)["server_errors"] == len(outcomes)


class FakeServerProcess:
    """soak.run_config's view of a ServerProcess, backed by a FakeSGLang whose log holds a retraction."""
    made: list = []

    def __init__(self, model, *, backend, sparse_config=None, extra_args=(), log_path=None, env=None, **options):
        self.backend, self.sparse_config, self.log_path = backend, sparse_config, Path(log_path)
        self.options, self.proc = options, None
        FakeServerProcess.made.append(self)

    def start(self):
        self.fake = FakeSGLang(**self.options)
        self.url, self.proc = self.fake.url, Namespace(poll=lambda: None, pid=4242)
        self.log_path.write_text("KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 9\n")
        return self

    def wait_ready(self, timeout=0):
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars=0):
        return self.log_path.read_text()

    def stop(self):
        self.fake.close()


def run_args(**kw):
    return Namespace(**dict(dict(max_total_tokens=65536, max_running=8, mem_fraction_static=0.85,
                                 probe_lengths=[128, 512, 1792], probe_tokens=8, start_timeout=5, duration=1.5,
                                 warmup=0.3, clients=8, request_timeout=30, seed=0, memory_tolerance_mib=512,
                                 model_dir=Path("/models/qwen05b")), **kw))


@pytest.mark.parametrize("wrong_probe", [False, True])
def test_run_config_end_to_end(tmp_path, monkeypatch, wrong_probe):
    pytest.importorskip("aiohttp")
    memory = iter([1000, 1100, 1200])
    monkeypatch.setattr(soak, "server_memory", lambda pgid: (next(memory), "server processes") if pgid == 4242
                        else (None, "whole GPU"))
    monkeypatch.setattr(soak, "ServerProcess", lambda *a, **kw: FakeServerProcess(*a, wrong_probe=wrong_probe, **kw))
    args = run_args()
    prompts = soak.probe_prompts(args.probe_lengths, args.seed)
    reference = FakeSGLang().answer  # the dense reference: the fake's own (right) answers
    reference = [dict(ids=[t[1] for t in reference(p, 8, True)["meta_info"]["output_token_logprobs"]],
                      gaps=[1.9] * 8) for p in prompts]
    row = soak.run_config("quest", args, SMALL, soak.shared_prefixes(SMALL), tmp_path, reference)
    assert "error" not in row, row.get("error")
    assert FakeServerProcess.made[-1].backend == "sgl_sparse"
    assert yaml.safe_load(Path(row["sparse_config"]).read_text())["min_context"] == 0
    assert row["duration_s"] >= 1.5 and row["requests"] > 10 and row["warmup"]["requests"] > 0
    assert (row["gpu_memory_ready_mib"], row["gpu_memory_start_mib"], row["gpu_memory_end_mib"]) == (1000, 1100, 1200)
    assert row["leaked_tokens"] == 0 and row["retracted_reqs"] == 2 and row["server_alive"] is True
    if wrong_probe:                                    # the longest probe differs, before and after the load
        assert row["probe_mismatches"] == 2 and row["checks"]["probe_mismatches"] is False and not row["passed"]
    else:
        assert row["probe_mismatches"] == 0 and row["passed"], row["checks"]


def test_dense_run_makes_the_reference_and_results_combine(tmp_path, monkeypatch):
    pytest.importorskip("aiohttp")
    monkeypatch.setattr(soak, "server_memory", lambda pgid: (5, "whole GPU"))
    monkeypatch.setattr(soak, "ServerProcess", FakeServerProcess)
    row = soak.run_config("dense", run_args(), SMALL, soak.shared_prefixes(SMALL), tmp_path, None)
    assert row["probe_mismatches"] == 0 and row["probe_outputs_before"] and row["passed"], row.get("checks")
    assert FakeServerProcess.made[-1].backend == "flashinfer"
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    soak.write(first, dict(gpu="H200", commit="abc", probe_reference=row["probe_outputs_before"]), [row])
    soak.write(second, dict(gpu="H200", commit="def"), [dict(row, passed=False), dict(row, config="quest")])
    assert json.loads(first.read_text())["passed"] is True
    assert soak.probe_reference_from(str(first)) == row["probe_outputs_before"]
    out = tmp_path / "all.json"
    soak.combine([str(first), str(second)], out)
    merged = json.loads(out.read_text())
    assert [(r["config"], r["commit"], r["passed"]) for r in merged["rows"]] == [("dense", "abc", True),
                                                                                  ("quest", "def", True)]
    assert merged["passed"] is True and merged["probe_reference"] == row["probe_outputs_before"]
    third = tmp_path / "c.json"                              # a later run combined into the combined file
    soak.write(third, dict(gpu="H200", commit="ghi"), [dict(row, config="twilight")])
    again = tmp_path / "again.json"
    soak.combine([str(out), str(third)], again)
    assert [(r["config"], r["commit"]) for r in json.loads(again.read_text())["rows"]] == [
        ("dense", "abc"), ("quest", "def"), ("twilight", "ghi")]          # each row keeps the commit it ran at


def test_gpu_memory_of_a_server_is_its_process_group(tmp_path, monkeypatch):
    """Servers soaked side by side on one GPU: each row's memory is the sum over nvidia-smi's compute apps of that
    server's process group (read from /proc); where nvidia-smi shows none of them, the whole GPU's, labelled so."""
    for pid, pgrp in ((100, 100), (101, 100), (200, 200), (300, 100)):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (python3 (x)) S 1 {pgrp} {pgrp} 0 -1 4194560 0 0\n")
    assert soak.process_group_pids(100, tmp_path) == {100, 101, 300}
    apps = "101, 5000\n200, 7000\n300, 1200\n"
    assert soak.apps_memory_mib(apps, {100, 101, 300}) == 6200
    assert soak.apps_memory_mib(apps, {999}) is None
    monkeypatch.setattr(soak, "gpu_memory_mib", lambda pgid: None)
    monkeypatch.setattr(soak, "gpu_memory_used_mib", lambda: 81000)
    assert soak.server_memory(100) == (81000, "whole GPU")
    monkeypatch.setattr(soak, "gpu_memory_mib", lambda pgid: 6200)
    assert soak.server_memory(100) == (6200, "server processes")


def test_combine_judges_probes_of_a_run_without_reference(tmp_path, monkeypatch):
    """A sparse config soaked beside the dense one (``--skip-reference``) has no probe figures of its own; combining
    the two runs compares its probes before and after the load with the dense run's, under its own settings."""
    pytest.importorskip("aiohttp")
    monkeypatch.setattr(soak, "server_memory", lambda pgid: (5, "whole GPU"))
    monkeypatch.setattr(soak, "ServerProcess", FakeServerProcess)
    dense = soak.run_config("dense", run_args(), SMALL, soak.shared_prefixes(SMALL), tmp_path, None)
    sparse = soak.run_config("quest", run_args(), SMALL, soak.shared_prefixes(SMALL), tmp_path, None)
    assert sparse.get("probe_mismatches") is None and not sparse["passed"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run_args()).items()}
    runs = {"dense": (dense, dense["probe_outputs_before"]), "right": (sparse, None)}
    wrong = dict(sparse, config="twilight", probe_outputs_after=[dict(o, ids=[t + 1 for t in o["ids"]])
                                                                 for o in sparse["probe_outputs_after"]])
    runs["wrong"] = (wrong, None)
    paths = []
    for name, (row, reference) in runs.items():
        paths.append(str(tmp_path / f"{name}.json"))
        soak.write(Path(paths[-1]), dict(gpu="H200", commit="abc", settings=settings, probe_reference=reference), [row])
    out = tmp_path / "all.json"
    soak.combine(paths, out)
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["quest"]["probe_mismatches"] == 0 and rows["quest"]["passed"], rows["quest"]["checks"]
    assert rows["twilight"]["probe_mismatches"] == len(wrong["probe_outputs_after"])
    assert rows["twilight"]["checks"]["probe_mismatches"] is False and not rows["twilight"]["passed"]
