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
