#!/usr/bin/env python3
"""Where a server's decode step goes: SGLang's own profiler (torch.profiler / CUPTI) on a real server, per kernel.

    python launch/profile_e2e.py --method quest --point 8x32K --steps 16 --out out/profile_e2e_quest.json
    python launch/profile_e2e.py --method quest-fast:reselect_min_cosine=-1 --point 4x128K   # any server config
    python launch/profile_e2e.py --summarize TRACE.trace.json.gz --steps 16     # an existing trace, no server
    python launch/profile_e2e.py --method quest-fast --point 4x128K --host       # the host's side of the step too
    python launch/profile_e2e.py --combine quest_8x32K.json dense_8x32K.json --operator bench_decode.json \
        --out launch/results/profile_e2e_h200.json                               # runs -> one file, no server

Starts the same server as ``launch/bench_e2e.py`` (Llama-3.1-8B shape, dummy weights, decode CUDA graphs on;
``--method`` takes what bench_e2e's ``--methods`` takes: ``dense``, a preset, or a preset with overrides),
prefills the point's B prompts, times a step as bench_e2e does (three pairs of requests), then asks SGLang to
trace ``--steps`` decode steps (``POST /start_profile`` with ``profile_by_stage``, GPU activity only unless
``--host``) while a request of ``steps + 4`` new tokens runs. SGLang writes ``<id>-TP-0-DECODE.trace.json.gz``;
this script reads its GPU events and prints, per decode step:

- the traced window (first kernel start to last kernel end), the time at least one kernel ran (``busy``) and the
  rest (``idle``: launch gaps inside CUDA graphs, host work between steps), with the largest idle stretches by
  the kernels around them;
- the device time per category: ``sparse`` (sgl-sparse's CuPy kernels), ``flashinfer`` (FlashInfer's attention
  and merge kernels, dense layers included), ``gemm`` (cuBLAS/CUTLASS/nvJet matmuls), ``memcpy/memset`` and
  ``other`` (torch elementwise, norms, RoPE, sampling, ...);
- every kernel's launches and device time per step, largest first;
- with ``--host`` (the trace then holds the host's events and Python calls too): the host's period between
  CUDA-graph launches, the CUDA calls that waited for the device (by the torch op around them), the host's
  top-level ops, and the time in this package's functions and the scheduler's steps around them.

The operator benchmark (``launch/bench_decode.py``, ``launch/profile_step.py --kernel-times``) times one layer's
step back to back; this shows the same kernels between the model's other layers, and what the step costs
beside them. ``--out`` writes the summary as JSON (the trace itself stays in ``<out>_trace/``).

``--combine`` merges such summaries (one GPU, one commit; ``--commit`` names it for a summary that does not record
it) into one file with an ``accounting`` row per sparse run: per sparse layer, the bytes its step must read, their
time at the copy peak, the in-server time per kernel (the sgl-sparse kernels spread over the sparse layers, and the
sparse layers' share of FlashInfer's attention and merge: their time minus the dense layers', a dense layer's from
the dense server's trace), the operator benchmark's time at that point (``--operator``: a ``bench_decode.py``
result), and per step the idle time against the dense server.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import bench_e2e as e2e  # noqa: E402
from plot_reuse import best_us  # noqa: E402
from cupy_kernels.reference import int8_bounds_row_bytes  # noqa: E402
from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.serving import ServerError, ServerProcess, file_safe, stop_servers_on_sigterm  # noqa: E402

# the kernels of cupy_kernels/*.cu (their __global__ names)
SPARSE_KERNELS = ("page_bounds_update", "quantize_keys_int4", "quest_page_scores", "quest_refine_scores",
                  "topk_pages", "reuse_drift", "pages_to_kv_indices", "page_rows", "token_rows", "compact_kv_rows",
                  "int4_candidate", "top_p_select", "vattention_")
CATEGORIES = (
    ("sparse", lambda n: n.startswith(SPARSE_KERNELS)),
    ("flashinfer", lambda n: "flashinfer" in n),
    ("gemm", lambda n: re.search(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm100_", n, re.I) is not None),
)
GPU_EVENT_CATEGORIES = {"kernel": None, "gpu_memcpy": "memcpy/memset", "gpu_memset": "memcpy/memset"}
# FlashInfer's kernels that a sparse layer shares with a dense one (a part of their names): the paged attention
# (BatchPrefill/BatchDecodeWithPagedKVCacheKernel) and the merge of its split-KV partial results.
ATTENTION_KERNEL = "WithPagedKVCacheKernel"
MERGE_KERNEL = "MergeStates"
# Device-to-device copy of 2 GiB (read + written, median of 10) on the NVIDIA H200 of the profiled runs,
# launch/bench_kernels.py at bb2824f (its ``peak_gbps``): the bandwidth a step's bytes are held against.
COPY_PEAK_GBPS = 4216.0
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def category(name: str) -> str:
    for label, matches in CATEGORIES:
        if matches(name):
            return label
    return "other"


def trace_events(path: Path) -> list[dict]:
    """The raw events of a chrome trace (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def load_gpu_events(path: Path, events: list[dict] | None = None) -> list[dict]:
    """The GPU events (kernels, memcpys, memsets) of a chrome trace (``events``: its :func:`trace_events`, read
    from ``path`` when not given), by start time. Each: ``name``, ``cat`` (category above), ``ts`` and ``dur`` in
    microseconds."""
    out = []
    for ev in trace_events(path) if events is None else events:
        kind = ev.get("cat")
        if ev.get("ph") != "X" or kind not in GPU_EVENT_CATEGORIES:
            continue
        name = ev.get("name", "?")
        out.append(dict(name=name, cat=GPU_EVENT_CATEGORIES[kind] or category(name),
                        ts=float(ev["ts"]), dur=float(ev.get("dur", 0.0))))
    if not out:
        raise ValueError(f"{path}: no GPU kernel events (was the profile taken with activities ['GPU']?)")
    return sorted(out, key=lambda e: e["ts"])


HOST_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation", "python_function")
# Python functions whose inclusive host time --host lists: this package's, and the scheduler's steps around them
HOST_FUNCTIONS = re.compile(r"(?:^|/)sgl_sparse/[\w/]+\.py\("
                            r"|scheduler\.py\(\d+\): (run_batch|process_batch_result|get_next_batch_to_run)\b"
                            r"|cuda_graph_runner\.py\(\d+\): (replay|replay_prepare|execute)\b")
# host calls that can wait for the device: synchronizations and copies (a copy to pageable host memory returns once
# it ran, after the work queued before it; one from pageable memory may wait too)
BLOCKING_CALL = re.compile(r"Synchronize|Memcpy")


def load_host_events(path: Path, events: list[dict] | None = None) -> list[dict]:
    """The host events of a chrome trace taken with CPU activities (``events`` as in :func:`load_gpu_events`):
    torch ops (``cpu_op``), CUDA runtime/driver calls, ``record_function`` ranges and Python calls
    (``with_stack``), by start time. Each: ``name``, ``cat``, ``tid`` (the (process, thread) pair), ``ts``,
    ``dur`` (µs)."""
    out = [dict(name=ev.get("name", "?"), cat=ev["cat"], tid=(ev.get("pid"), ev.get("tid")), ts=float(ev["ts"]),
                dur=float(ev.get("dur", 0.0)))
           for ev in (trace_events(path) if events is None else events)
           if ev.get("ph") == "X" and ev.get("cat") in HOST_CATEGORIES]
    return sorted(out, key=lambda e: (e["ts"], -e["dur"]))


def host_summary(events: list[dict], steps: int, top: int = 15, blocking_us: float = 20.0) -> dict:
    """What the host does per decode step (``load_host_events``; µs per step):

    - ``graph_launch_period_us``: the median time between consecutive CUDA-graph launches (runtime or driver
      call), the host's loop per step where each step replays one graph (when it exceeds the device's busy time
      per step, the device waits for the host);
    - ``top_ops``: the torch ops and ``record_function`` ranges not inside another op of their thread, by total
      time (count and µs per step); the profiler's own ``ProfilerStep#`` ranges, which hold everything, are left
      out;
    - ``blocking``: CUDA calls that wait for the device (synchronizations, copies to the host) lasting
      ``blocking_us`` or more, by call and the innermost torch op around it (count, µs per step, longest);
    - ``functions``: the inclusive host time of the Python functions ``HOST_FUNCTIONS`` names (this package's,
      and the scheduler's steps around them), by total (count and µs per step)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    launches = [e["ts"] for e in events if e["name"] in ("cudaGraphLaunch", "cuGraphLaunch")]
    periods = sorted(b - a for a, b in zip(launches, launches[1:]))
    tops: dict[str, list[float]] = {}
    blocking: dict[tuple[str, str], list[float]] = {}
    open_ops: dict[object, list[dict]] = {}          # per thread: the ops enclosing the current time
    functions: dict[str, list[float]] = {}
    for e in events:
        if e["cat"] == "python_function":
            if HOST_FUNCTIONS.search(e["name"]):
                f = functions.setdefault(e["name"], [0, 0.0])
                f[0] += 1
                f[1] += e["dur"]
            continue
        stack = open_ops.setdefault(e["tid"], [])
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < e["ts"] + e["dur"]:
            stack.pop()
        if e["cat"] == "user_annotation" and e["name"].startswith("ProfilerStep#"):
            continue
        if e["cat"] in ("cpu_op", "user_annotation"):
            if not stack:
                t = tops.setdefault(e["name"], [0, 0.0])
                t[0] += 1
                t[1] += e["dur"]
            stack.append(e)
        elif BLOCKING_CALL.search(e["name"]) and e["dur"] >= blocking_us:
            b = blocking.setdefault((e["name"], stack[-1]["name"] if stack else "-"), [0, 0.0, 0.0])
            b[0] += 1
            b[1] += e["dur"]
            b[2] = max(b[2], e["dur"])
    return dict(
        graph_launches=len(launches),
        graph_launch_period_us=periods[len(periods) // 2] if periods else None,
        top_ops=[dict(name=n, count=c / steps, us=us / steps)
                 for n, (c, us) in sorted(tops.items(), key=lambda kv: -kv[1][1])[:top]],
        blocking=[dict(call=call, inside=op, count=c / steps, us=us / steps, longest_us=longest)
                  for (call, op), (c, us, longest) in sorted(blocking.items(), key=lambda kv: -kv[1][1])],
        functions=[dict(name=n, count=c / steps, us=us / steps)
                   for n, (c, us) in sorted(functions.items(), key=lambda kv: -kv[1][1])[:2 * top]])


def print_host_summary(h: dict) -> None:
    period = h["graph_launch_period_us"]
    print(f"host: {h['graph_launches']} graph launches, median period "
          f"{'n/a' if period is None else f'{period:.1f} us'}")
    print("host calls that waited for the device (us/step, calls/step, longest us, call <- inside op):")
    for b in h["blocking"]:
        print(f"{b['us']:9.1f} {b['count']:8.2f} {b['longest_us']:9.1f}  {b['call']} <- {b['inside'][:60]}")
    print("host top-level ops (us/step, count/step):")
    for t in h["top_ops"]:
        print(f"{t['us']:9.1f} {t['count']:8.2f}  {t['name'][:90]}")
    print("host Python functions, inclusive (us/step, calls/step):")
    for f in h["functions"]:
        print(f"{f['us']:9.1f} {f['count']:8.2f}  {f['name'][-100:]}")


def busy_time(events: list[dict]) -> float:
    """Microseconds during which at least one of ``events`` (sorted by start) runs: the union of the intervals."""
    total, end = 0.0, float("-inf")
    for ev in events:
        start, stop = ev["ts"], ev["ts"] + ev["dur"]
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def idle_gaps(events: list[dict], steps: int, top: int = 12) -> dict:
    """Where the idle time of ``events`` (sorted by start) lies: every stretch with no kernel running, named by the
    kernel that ended last before it and the one that starts it, grouped by that pair (µs and count per step,
    largest total first, ``top`` of them), and the idle split into short gaps (< 5 µs: launch gaps, inside CUDA
    graphs too) and long ones (host work between launches)."""
    pairs: dict[tuple[str, str], list[float]] = {}
    short = long = 0.0
    end, last = float("-inf"), None
    for ev in events:
        start, stop = ev["ts"], ev["ts"] + ev["dur"]
        if last is not None and start > end:
            gap = start - end
            if gap < 5.0:
                short += gap
            else:
                long += gap
            g = pairs.setdefault((last, ev["name"]), [0, 0.0])
            g[0] += 1
            g[1] += gap
        if stop > end:
            end, last = stop, ev["name"]
    largest = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(short_gaps_us=short / steps, long_gaps_us=long / steps,
                gaps=[dict(after=a, before=b, count=n / steps, us=us / steps) for (a, b), (n, us) in largest])


def summarize(events: list[dict], steps: int) -> dict:
    """Per-step figures of ``events`` (``load_gpu_events``) that cover ``steps`` decode steps; times in µs."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    window = max(e["ts"] + e["dur"] for e in events) - events[0]["ts"]
    busy = busy_time(events)
    categories: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    for e in events:
        categories[e["cat"]] = categories.get(e["cat"], 0.0) + e["dur"]
        k = kernels.setdefault(e["name"], [0, 0.0, e["cat"]])
        k[0] += 1
        k[1] += e["dur"]
    return dict(
        steps=steps, window_us=window / steps, busy_us=busy / steps, idle_us=(window - busy) / steps,
        device_us=sum(categories.values()) / steps, **idle_gaps(events, steps),
        categories={c: us / steps for c, us in sorted(categories.items(), key=lambda kv: -kv[1])},
        kernels=[dict(name=n, category=c, launches=cnt / steps, us=us / steps)
                 for n, (cnt, us, c) in sorted(kernels.items(), key=lambda kv: -kv[1][1])])


def summarize_trace(path: Path, steps: int, host: bool = False) -> dict:
    """:func:`summarize` of a trace file's GPU events, with ``host`` (:func:`host_summary`) when asked; the file is
    read once."""
    events = trace_events(path)
    summary = summarize(load_gpu_events(path, events), steps)
    if host:
        summary["host"] = host_summary(load_host_events(path, events), steps)
    return summary


def print_summary(s: dict, title: str, top: int = 30) -> None:
    print(f"\n{title}: {s['steps']} decode steps traced")
    print(f"per step: window {s['window_us']:.1f} us, busy {s['busy_us']:.1f} us, idle {s['idle_us']:.1f} us, "
          f"device time {s['device_us']:.1f} us (> busy where kernels overlap)")
    for c, us in s["categories"].items():
        print(f"   {c:14s} {us:9.1f} us/step")
    print(f"idle: {s['short_gaps_us']:.1f} us/step in gaps < 5 us, {s['long_gaps_us']:.1f} us/step in longer ones; "
          "largest (us/step, gaps/step, after -> before):")
    for g in s["gaps"]:
        print(f"{g['us']:9.1f} {g['count']:8.1f}  {g['after'][:50]} -> {g['before'][:50]}")
    print(f"{'us/step':>9s} {'launches':>8s}  kernel (top {top})")
    for k in s["kernels"][:top]:
        print(f"{k['us']:9.1f} {k['launches']:8.1f}  [{k['category']}] {k['name'][:90]}")
    if "host" in s:
        print_host_summary(s["host"])


def kernel_time(summary: dict, name_part: str) -> tuple[float, float]:
    """(µs per step, launches per step) of a summary's kernels whose name contains ``name_part``."""
    found = [k for k in summary["kernels"] if name_part in k["name"]]
    return sum(k["us"] for k in found), sum(k["launches"] for k in found)


def model_shape(model_config: dict) -> dict:
    """``layers``, ``kv_heads``, ``head_dim`` and ``dtype_bytes`` (per K or V element) of a HF ``config.json``."""
    heads = model_config["num_attention_heads"]
    return dict(layers=model_config["num_hidden_layers"], kv_heads=model_config.get("num_key_value_heads", heads),
                head_dim=model_config.get("head_dim", model_config["hidden_size"] // heads),
                dtype_bytes=DTYPE_BYTES[model_config.get("torch_dtype", "bfloat16")])


def sparse_layer_bytes(batch: int, tokens: int, shape: dict, preset: SparseConfig) -> dict:
    """Bytes one sparse layer's Quest step must read at ``batch`` requests of ``tokens`` tokens: ``page_bounds``
    (B x pages x HK bounds rows, read by the scores: (min, max) x D elements, or int8 rows of 2 D + 8 bytes) and
    ``selected_kv`` (B x HK x budget tokens x (K, V) x D elements, read by the attention); ``total``. With
    selection reuse (``reselect_every`` R > 1) the scan runs on one step in R at its steady state, so
    ``page_bounds`` is a step's mean, 1/R of a scan (re-selections by the drift test not counted)."""
    if preset.method != "quest" or preset.coarse:
        raise ValueError(f"byte accounting covers Quest's page scan over every page, not {preset}")
    kv_heads, head_dim, elt = shape["kv_heads"], shape["head_dim"], shape["dtype_bytes"]
    pages = math.ceil(tokens / preset.page_size)
    row = int8_bounds_row_bytes(head_dim) if preset.bounds_dtype == "int8" else 2 * head_dim * elt
    page_bounds = batch * pages * kv_heads * row // preset.reselect_every
    selected_kv = batch * kv_heads * min(preset.token_budget, tokens) * 2 * head_dim * elt
    return dict(page_bounds=page_bounds, selected_kv=selected_kv, total=page_bounds + selected_kv)


def flashinfer_per_step(run: dict, layers: int) -> dict:
    """``attention_us`` and ``merge_us``: a run's FlashInfer attention and merge µs per step, each launched once
    per layer (checked)."""
    out = {}
    for key, name_part in (("attention_us", ATTENTION_KERNEL), ("merge_us", MERGE_KERNEL)):
        us, launches = kernel_time(run, name_part)
        if launches != layers:
            raise ValueError(f"{run['method']} {run['point']}: {launches:g} {name_part} launches per step, not one "
                             f"per layer ({layers})")
        out[key] = us
    return out


def dense_layer_us(batch: int, context: int, dense_runs: list[dict], layers: int) -> dict | None:
    """One dense layer's FlashInfer attention and merge µs at ``batch`` x ``context``: the dense run at that point
    (per launch), else the dense run nearest in KV tokens, scaled by the ratio of KV tokens (bytes read); None
    without a dense run. ``point``: the dense run's, ``scale``: the ratio applied (1 at the same point)."""
    if not dense_runs:
        return None
    kv_tokens = batch * context

    def distance(run: dict) -> float:
        b, c = e2e.parse_point(run["point"])
        return abs(math.log(b * c / kv_tokens))

    run = min(dense_runs, key=distance)
    b, c = e2e.parse_point(run["point"])
    scale = kv_tokens / (b * c)
    per_launch = {key: scale * us / layers for key, us in flashinfer_per_step(run, layers).items()}
    return dict(per_launch, point=run["point"], scale=scale)


def sparse_layer_us(run: dict, dense_layer: dict, shape: dict, preset: SparseConfig) -> dict:
    """µs per sparse layer of a sparse run's step, per kernel: each sgl-sparse kernel's per-step time over the
    sparse layers, and the sparse layers' share of FlashInfer's attention and merge (their per-step time minus
    ``preset.dense_layers`` x ``dense_layer``'s, over the sparse layers)."""
    sparse_layers = shape["layers"] - preset.dense_layers
    split = {k["name"]: k["us"] / sparse_layers for k in run["kernels"] if k["category"] == "sparse"}
    for key, us in flashinfer_per_step(run, shape["layers"]).items():
        split[f"flashinfer_{key[:-3]}"] = (us - preset.dense_layers * dense_layer[key]) / sparse_layers
    return split


def operator_row(operator: dict | None, config: str, batch: int, context: int, budget: int) -> dict | None:
    """The ``bench_decode`` row of ``config`` at the point and budget (None: not measured)."""
    rows = (operator or {}).get("rows", [])
    return next((r for r in rows if r.get("config") == config and r["batch"] == batch and r["context"] == context
                 and r["budget"] == (context if config == "dense" else budget)), None)


def accounting_row(run: dict, dense_runs: list[dict], operator: dict | None, shape: dict) -> dict:
    """Where a sparse run's step goes, per sparse layer (µs, bytes) and per step (ms, idle µs); a dense figure
    that was not measured is None."""
    preset = SparseConfig.load(run["method"])
    batch, context = e2e.parse_point(run["point"])
    dense = next((d for d in dense_runs if d["point"] == run["point"]), None)
    dense_layer = dense_layer_us(batch, context, dense_runs, shape["layers"])
    if dense_layer is None:
        raise ValueError(f"{run['method']} {run['point']}: the sparse layers' share of FlashInfer's kernels needs a "
                         "dense run")
    nbytes = sparse_layer_bytes(batch, run["prompt"], shape, preset)
    split = sparse_layer_us(run, dense_layer, shape, preset)
    op, op_dense = (operator_row(operator, c, batch, context, preset.token_budget) for c in (run["method"], "dense"))
    return dict(
        method=run["method"], point=run["point"], batch=batch, context=context, prompt=run["prompt"],
        layers=shape["layers"], sparse_layers=shape["layers"] - preset.dense_layers, page_size=preset.page_size,
        token_budget=preset.token_budget, ms_per_step=run["ms_per_step"],
        dense_ms_per_step=dense["ms_per_step"] if dense else None,
        bytes=nbytes, floor_us=nbytes["total"] / COPY_PEAK_GBPS / 1e3,
        in_server_us=sum(split.values()), in_server_split_us=split, dense_layer=dense_layer,
        operator_us=best_us(op) if op else None, operator_dense_us=best_us(op_dense) if op_dense else None,
        idle_us=run["idle_us"], dense_idle_us=dense["idle_us"] if dense else None,
        idle_vs_dense_us=run["idle_us"] - dense["idle_us"] if dense else None)


def same(values: list, what: str):
    """The one value of ``values`` (every run's GPU, versions or commit must agree)."""
    distinct = [v for i, v in enumerate(values) if v not in values[:i]]
    if len(distinct) != 1:
        raise ValueError(f"the combined files differ in {what}: {distinct}")
    return distinct[0]


def combine(runs: list[dict], operator: dict | None, model_config: dict, commit: str | None = None) -> dict:
    """Summaries of one GPU and commit (``commit`` for those that do not record it) -> ``gpu``, ``versions``,
    ``commit``, ``copy_peak_gbps``, ``model_shape``, ``runs`` and one ``accounting`` row per sparse run;
    ``operator``: the bench_decode result's GPU, commit, copy peak and L2 state (it must share the runs' GPU and
    commit)."""
    runs = [dict(r, commit=r.get("commit") or commit) for r in runs]
    if any(r["commit"] is None for r in runs):
        raise ValueError("a combined file records no commit: pass --commit")
    meta = {k: same([r[k] for r in runs], k) for k in ("gpu", "versions", "commit")}
    if operator is not None:
        for k in ("gpu", "commit"):
            same([meta[k], operator.get(k)], f"{k} (runs and operator benchmark)")
    shape = model_shape(model_config)
    dense_runs = [r for r in runs if r["method"] == "dense"]
    accounting = [accounting_row(r, dense_runs, operator, shape) for r in runs if r["method"] != "dense"]
    operator_meta = None if operator is None else {k: operator.get(k) for k in ("gpu", "commit", "peak_gbps", "l2")}
    return dict(meta, copy_peak_gbps=COPY_PEAK_GBPS, model_shape=shape, operator=operator_meta, runs=runs,
                accounting=accounting)


def wait_for_trace(trace_dir: Path, profile_id: str, timeout: float) -> Path:
    """The decode-stage trace SGLang exports when the traced steps are done (its write takes a while)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(trace_dir.glob(f"{profile_id}*DECODE*.trace.json.gz"))
        if found:
            size = found[0].stat().st_size
            time.sleep(1.0)
            if found[0].stat().st_size == size and size > 0:
                return found[0]
        time.sleep(1.0)
    raise e2e.BenchError(f"no decode trace {profile_id}*DECODE*.trace.json.gz in {trace_dir} after {timeout:.0f} s "
                         f"(files there: {sorted(p.name for p in trace_dir.glob('*'))})")


def profile_server(args) -> dict:
    """Start the method's server, prefill, time a step, trace ``args.steps`` decode steps; the summary."""
    batch, context = e2e.parse_point(args.point)
    config = json.loads((args.model / "config.json").read_text())
    bench_args = Namespace(mem_fraction_static=args.mem_fraction_static, steps=32, repeats=3, warm_steps=8)
    new_tokens = 1 + max(args.steps + 4, bench_args.steps, bench_args.warm_steps)
    prompt = e2e.prompt_length(context, config["max_position_embeddings"], new_tokens)
    backend, sparse_config, extra = e2e.server_spec(args.method, bench_args, [(batch, context)], {context: prompt},
                                                    new_tokens)
    path = e2e.decode_path(args.method, batch, prompt, new_tokens)
    if path != "sparse" and e2e.method_of(args.method) != "dense":
        print(f"note: {args.method} at {args.point} decodes on the {path} path (within the budget, below "
              "min_context or below the batch floor min_batch_tokens): the trace shows dense attention", flush=True)
    out = Path(args.out)
    trace_dir = (out.parent / (out.stem + "_trace")).resolve()
    trace_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    prompts = [rng.choices(range(config["vocab_size"]), k=prompt) for _ in range(batch)]
    server = ServerProcess(str(args.model), backend=backend, sparse_config=sparse_config, extra_args=extra,
                           log_path=trace_dir / f"server_{file_safe(args.method)}.log", env={"HF_HUB_OFFLINE": "1"})
    started = time.time()
    try:
        server.start().wait_ready(timeout=args.start_timeout)
        print(f"[{args.method}] ready after {time.time() - started:.0f} s", flush=True)
        timing = e2e.measure_point(server.url, prompts, bench_args)        # prefill + warm-up, then 3 pairs
        print(f"[{args.method}] {args.point}: {timing['ms_per_step']:.2f} ms/step (bench_e2e's timing; the trace's "
              "per-step window below is the direct figure)", flush=True)
        profile_id = f"{file_safe(args.method)}-{args.point}-{int(time.time())}"
        e2e.post_json(server.url + "/start_profile", dict(
            output_dir=str(trace_dir), num_steps=args.steps, activities=["CPU", "GPU"] if args.host else ["GPU"],
            profile_by_stage=True, with_stack=args.host, record_shapes=False, profile_id=profile_id),
            expect_json=False)                                              # answers in text
        e2e.timed_generate(server.url, prompts, args.steps + 4)
        trace = wait_for_trace(trace_dir, profile_id, args.trace_timeout)
    finally:
        server.stop()
    summary = summarize_trace(trace, args.steps, args.host)
    return dict(method=args.method, point=args.point, prompt=prompt, ms_per_step=timing["ms_per_step"],
                trace=str(trace), gpu=e2e.gpu_name(), versions=e2e.versions(), commit=e2e.git_commit(), **summary)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="quest", type=e2e.config_spec, metavar="CONFIG",
                    help="dense, a preset, or a preset with overrides as --sparse-config takes them "
                         "(quest-fast:reselect_min_cosine=-1)")
    ap.add_argument("--point", default="8x32K", help="BATCHxCONTEXT")
    ap.add_argument("--steps", type=int, default=16, help="decode steps to trace")
    ap.add_argument("--mem-fraction-static", type=float, default=0.8)
    ap.add_argument("--model", type=Path, default=e2e.MODEL_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--trace-timeout", type=float, default=120.0, help="seconds to wait for SGLang's trace file")
    ap.add_argument("--top", type=int, default=30, help="kernels to print")
    ap.add_argument("--host", action="store_true",
                    help="trace the host too (CPU activities and Python calls: much more host overhead, so the "
                         "step's idle time grows): the graph-launch period, the calls that waited for the device, "
                         "the top ops, this package's and the scheduler's functions")
    ap.add_argument("--out", default="out/profile_e2e.json")
    ap.add_argument("--summarize", type=Path, metavar="TRACE", help="summarize this trace file; start nothing")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="merge these --out files (sparse and dense runs) into --out, with the accounting; start "
                         "nothing")
    ap.add_argument("--operator", type=Path, metavar="JSON", help="with --combine: a launch/bench_decode.py result")
    ap.add_argument("--commit", help="with --combine: the commit of files that do not record one")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.combine:
        operator = json.loads(args.operator.read_text()) if args.operator else None
        try:
            result = combine([json.loads(p.read_text()) for p in args.combine], operator,
                             json.loads((args.model / "config.json").read_text()), args.commit)
        except ValueError as e:
            ap.error(str(e))
        for a in result["accounting"]:
            op = "not measured" if a["operator_us"] is None else f"{a['operator_us']:.1f} us"
            print(f"{a['method']} {a['point']}: {a['in_server_us']:.1f} us per sparse layer in the server, floor "
                  f"{a['floor_us']:.1f} us, operator benchmark {op}")
    elif args.summarize:
        s = summarize_trace(args.summarize, args.steps, args.host)
        print_summary(s, str(args.summarize), args.top)
        result = dict(trace=str(args.summarize), **s)
    else:
        stop_servers_on_sigterm()
        try:
            result = profile_server(args)
        except (ServerError, e2e.BenchError, OSError) as e:
            print(f"[{args.method}] FAILED: {type(e).__name__}: {e}", flush=True)
            return 1
        print_summary(result, f"{args.method} {args.point} ({result['gpu']}), {result['ms_per_step']:.2f} ms/step",
                      args.top)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
