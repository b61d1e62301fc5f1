#!/usr/bin/env python3
"""End-to-end decode benchmark: a real SGLang server, dense FlashInfer vs each sparse preset.

Measures the decode step time (ms per step = per generated token of each request of the batch) of
``python -m sglang.launch_server`` serving Llama-3.1-8B-shaped random weights (``--load-format dummy`` on
``launch/models/llama-3.1-8b/config.json``; no tokenizer: ``--skip-tokenizer-init``, random token ids) at batch B
and context L, CUDA graphs on for decode (prefill graphs off: their capture costs minutes), page size 16, for
``--attention-backend flashinfer`` (dense) and ``--attention-backend sgl_sparse --sparse-config {quest,twilight,
vattention}``. One server per method serves every point. ``--dense-eager`` adds a dense server without CUDA graphs;
the baseline of every speedup is then the faster dense server at that point, and each dense row carries the
bandwidth it reached (weights + KV cache read per step / step time).

How a point is timed: its B prompts (distinct random sequences; a shorter context's prompt is a prefix of the
longer one's, so the 128K prompts extend the cached 32K ones) are sent once untimed with 1 + W new tokens (prefill
of what is not cached yet, decode warm-up at batch B); then, with their KV in SGLang's radix cache, in pairs: with
1 new token (the last page re-extended and sampled, no decode step) and with 1 + S new tokens. ms/step =
(fastest long - fastest short) / S: the re-extension, HTTP and scheduling costs appear in both and cancel. A
point whose fastest long request is not slower than its fastest short one is not measurable and fails (never a
negative or noise-made figure).
Requests are greedy with ``ignore_eos``; every answer must hold exactly the tokens asked for. Near the model's
131072 positions the prompt is shortened so that prompt + new tokens fit (the ``prompt`` column).

Caveat: with random weights Twilight's top-p set and vAttention's sample size follow an arbitrary attention
distribution; their times here are not a trained model's. Dense and Quest (fixed budget) do not depend on it.

    python launch/bench_e2e.py                          # 8x1K 8x32K 16x32K 4x128K; dense, quest, twilight, vattention
    python launch/bench_e2e.py --methods dense quest --points 8x32K 4x128K
    python launch/bench_e2e.py --dry-run                # the plan and the server commands, flags checked by SGLang

Writes a table to stdout, JSON (``--out``), a PNG next to it (speedup vs context per method, one line per batch)
and the server logs in ``<out>_logs/``. Targets (same run): >= 0.98x at 8 x 1K (short requests never slower),
>= 1.75x at 8 x 32K, >= 2.2x at 16 x 32K and >= 2.5x at 4 x 128K.
"""

from __future__ import annotations

import argparse
import json
import random
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cupy_kernels import _cuda as ck_cuda  # noqa: E402  (PDL: how the servers it starts launch our kernels)
from sgl_sparse.config import METHODS, SparseConfig, SparseConfigError, presets  # noqa: E402
from sgl_sparse.serving import (Progress, ServerError, ServerProcess, file_safe, server_command,  # noqa: E402
                                 stop_servers_on_sigterm)

MODEL_DIR = ROOT / "launch" / "models" / "llama-3.1-8b"
PAGE_SIZE = SparseConfig.load("dense").page_size          # every preset's page size; the dense baseline uses it too
TARGETS = {(8, 1024): 0.98, (8, 32768): 1.75, (16, 32768): 2.2, (4, 131072): 2.5}   # (batch, context) -> speedup
DEFAULT_POINTS = ["8x1K", "8x32K", "16x32K", "4x128K"]
DENSE_EAGER = "dense-eager"                               # config name of the dense server without CUDA graphs
POSITION_MARGIN = 64                                      # SGLang's own limit is max_position_embeddings - 6
REQUEST_TIMEOUT_S = 1800


class BenchError(RuntimeError):
    pass


def parse_point(text: str) -> tuple[int, int]:
    """``8x32K`` -> (8, 32768)."""
    batch, _, context = text.upper().partition("X")
    scale = 1024 if context.endswith("K") else 1
    return int(batch), int(context.rstrip("K")) * scale


def label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def prompt_length(context: int, max_positions: int, new_tokens: int) -> int:
    """The context itself, or less where prompt + new tokens would pass the model's positions; whole pages."""
    return min(context, max_positions - new_tokens - POSITION_MARGIN) // PAGE_SIZE * PAGE_SIZE


def server_spec(method: str, args, points, prompt_lens, new_tokens: int) -> tuple[str, str | None, list[str]]:
    """(attention backend, sparse config, extra flags) of ``method``'s server."""
    batches = sorted({b for b, _ in points})
    pool_tokens = max(b * (prompt_lens[c] + new_tokens + PAGE_SIZE) for b, c in points) + 8 * 1024
    extra = ["--load-format", "dummy", "--skip-tokenizer-init", "--mem-fraction-static", str(args.mem_fraction_static),
             "--max-total-tokens", str(pool_tokens), "--max-running-requests", str(max(batches)),
             "--cuda-graph-bs-decode", *map(str, batches), "--cuda-graph-backend-prefill", "disabled"]
    if method == DENSE_EAGER:
        return "flashinfer", None, extra + ["--page-size", str(PAGE_SIZE), "--disable-cuda-graph"]
    if method == "dense":
        return "flashinfer", None, extra + ["--page-size", str(PAGE_SIZE)]
    return "sgl_sparse", method, extra


def config_spec(text: str) -> str:
    """argparse type of ``--methods``: ``dense`` or a preset, optionally with inline overrides."""
    if text == "dense":
        return text
    base = text.partition(":")[0]
    if base not in presets():
        raise argparse.ArgumentTypeError(f"{base!r} is not a preset (choose from {', '.join(presets())})")
    try:
        SparseConfig.load(text)
    except SparseConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def method_of(config: str) -> str:
    """The method a server config runs (a preset name: ``quest-fast`` runs ``quest``)."""
    if config in ("dense", DENSE_EAGER):
        return "dense"
    return SparseConfig.load(config).method


def bytes_per_step(model_config: dict, batch: int, context: int) -> int:
    """What a dense decode step must read: every weight once (bf16) and every token's K and V in every layer."""
    h, layers, inter = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads", heads)
    head_dim = model_config.get("head_dim", h // heads)
    per_layer = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * inter
    embeddings = model_config["vocab_size"] * h * (1 if model_config.get("tie_word_embeddings") else 2)
    weights = 2 * (layers * per_layer + embeddings)
    kv = batch * context * layers * 2 * kv_heads * head_dim * 2
    return weights + kv


def server_commands(model: str, specs: dict[str, tuple[str, str | None, list[str]]]) -> dict[str, list[str]]:
    """The ``launch_server`` command line of each server spec (name -> (backend, sparse config, extra flags)),
    printed; the port is a placeholder (each server gets a free one when it starts)."""
    commands = {name: server_command(model, backend=b, sparse_config=s, port=0, extra_args=e)
                for name, (b, s, e) in specs.items()}
    for name, cmd in commands.items():
        print(f"{name}: {shlex.join(cmd)}  (--port: a free one)", flush=True)
    return commands


def check_flags(commands: dict[str, list[str]]) -> None:
    """Parse each command line with SGLang's own parser, plugins loaded as launch_server loads them."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    for cmd in commands.values():
        parser.parse_args(cmd[cmd.index("sglang.launch_server") + 1:])
    print(f"all flags accepted by sglang {metadata.version('sglang')}'s launch_server parser", flush=True)


def post_json(url: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S, expect_json: bool = True):
    """POST ``body`` as JSON; the decoded JSON answer (``expect_json=False``: the answer's text, for endpoints such
    as ``/start_profile`` that answer in plain text)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
            return json.loads(answer) if expect_json else answer.decode(errors="replace")
    except urllib.error.HTTPError as e:
        raise BenchError(f"HTTP {e.code} from {url}: {e.read()[:1000].decode(errors='replace')}") from e


def timed_generate(url: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for the whole batch to come back with exactly ``new_tokens`` tokens per request."""
    body = {"input_ids": prompts,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    start = time.perf_counter()
    answers = post_json(url + "/generate", body)
    seconds = time.perf_counter() - start
    got = sorted({a["meta_info"]["completion_tokens"] for a in answers})
    if got != [new_tokens]:
        raise BenchError(f"asked {new_tokens} new tokens per request, got {got}")
    return seconds


def measure_point(url: str, prompts: list[list[int]], args) -> dict:
    """Warm-up (and prefill of what is not cached), then ``args.repeats`` pairs of 1-token and (1 + S)-token
    requests; the fastest of each kind is the least disturbed."""
    warm_s = timed_generate(url, prompts, 1 + args.warm_steps)
    short_s, long_s = [], []
    for _ in range(args.repeats):
        short_s.append(timed_generate(url, prompts, 1))
        long_s.append(timed_generate(url, prompts, 1 + args.steps))
    ms = step_ms(short_s, long_s, args.steps)
    return dict(ms_per_step=ms, tokens_per_s=len(prompts) * 1e3 / ms, warm_s=warm_s, short_s=short_s, long_s=long_s)


def step_ms(short_s: list[float], long_s: list[float], steps: int) -> float:
    """ms per decode step from the fastest short and long requests; refuses timings where the fastest long request
    was not slower than the fastest short one by at least a millisecond (the difference would be noise, or
    negative)."""
    if min(long_s) - min(short_s) < 1e-3:
        raise BenchError(f"decode time not measurable: short requests {[round(t, 4) for t in short_s]} s vs "
                         f"long ones {[round(t, 4) for t in long_s]} s for {steps} steps; raise --steps")
    return (min(long_s) - min(short_s)) / steps * 1e3


def decode_path(config: str, batch: int, prompt: int, new_tokens: int) -> str:
    """The path the decode steps of ``batch`` requests of ``prompt`` tokens take while each generates
    ``new_tokens``: ``sparse``, ``dense`` (nothing to select: within the budget, below ``min_context`` or below
    the batch floor ``min_batch_tokens``; the point then measures the dense path) or ``both`` (it changes on the
    way)."""
    if method_of(config) == "dense":
        return "dense"
    import torch

    from sgl_sparse.policies import needs_selection

    cfg = SparseConfig.load(config)
    first, last = (needs_selection(cfg, torch.full((batch,), prompt + n)) for n in (1, new_tokens))
    return "sparse" if first and last else "dense" if not (first or last) else "both"


def run_method(method: str, spec, args, points, prompt_lens, new_tokens, sequences, log_dir: Path,
               rows: list[dict], save=lambda: None, progress: Progress | None = None) -> None:
    """Start ``method``'s server, time every point that fits its KV pool, stop it. Appends a row per point to
    ``rows`` (errors become rows) and calls ``save`` after each, so a cut-off run keeps what it measured."""
    backend, sparse_config, extra = spec
    server = ServerProcess(str(args.model), backend=backend, sparse_config=sparse_config, extra_args=extra,
                           log_path=log_dir / f"server_{file_safe(method)}.log", env={"HF_HUB_OFFLINE": "1"})
    started, stage = time.time(), "start-up"
    print(f"[{method}] starting server (log {server.log_path})", flush=True)
    try:
        server.start().wait_ready(timeout=args.start_timeout)
        pool_tokens = post_json(server.url + "/server_info")["max_total_num_tokens"]
        print(f"[{method}] ready after {time.time() - started:.0f} s, KV pool {pool_tokens} tokens", flush=True)
        for batch, context in points:
            stage = f"{batch}x{label(context)}"
            row = dict(method=method_of(method), config=method, batch=batch, context=context,
                       prompt=prompt_lens[context],
                       decode_path=decode_path(method, batch, prompt_lens[context], new_tokens))
            if batch * (prompt_lens[context] + new_tokens + PAGE_SIZE) > pool_tokens:
                rows.append(dict(row, error=f"does not fit the KV pool ({pool_tokens} tokens)"))
                print(f"[{method}] {stage}: skipped, {rows[-1]['error']}"
                      f"{f'; {progress.step()}' if progress else ''}", flush=True)
                continue
            prompts = [seq[:prompt_lens[context]] for seq in sequences[:batch]]
            row.update(measure_point(server.url, prompts, args))
            rows.append(row)
            save()
            dense_path = row["decode_path"] == "dense" and row["method"] != "dense"
            print(f"[{method}] {stage}{' (dense path)' if dense_path else ''}: {row['ms_per_step']:.2f} ms/step, "
                  f"{row['tokens_per_s']:.0f} tok/s (warm-up/prefill {row['warm_s']:.1f} s)"
                  f"{f'; {progress.step()}' if progress else ''}", flush=True)
    except (ServerError, BenchError, OSError, KeyError, ValueError) as e:
        message = f"{type(e).__name__}: {e}"[:3000]
        print(f"[{method}] FAILED at {stage}: {message}\n(server log: {server.log_path})", flush=True)
        rows.append(dict(method=method_of(method), config=method, failed_at=stage, error=message,
                         log=str(server.log_path)))
    finally:
        server.stop()
    print(f"[{method}] done in {time.time() - started:.0f} s", flush=True)


def add_speedups(rows: list[dict], configs, points) -> list[dict]:
    """Speedup over dense at each point; returns each sparse config's result at each target point of the run
    (``met`` None: not measured)."""
    dense: dict = {}
    for r in rows:                  # the faster dense server (graphs or eager) is the baseline
        if r["method"] == "dense" and "ms_per_step" in r:
            point = (r["batch"], r["context"])
            dense[point] = min(dense.get(point, float("inf")), r["ms_per_step"])
    for r in rows:
        point = (r.get("batch"), r.get("context"))
        if "ms_per_step" in r and point in dense:
            r["speedup"] = dense[point] / r["ms_per_step"]
    return target_results(rows, configs, points)


def target_results(rows: list[dict], configs, points) -> list[dict]:
    """Each sparse config's speedup (from its row) at each target point of ``points``; ``met`` None: not
    measured."""
    speedups = {(r.get("config", r["method"]), (r.get("batch"), r.get("context"))): r["speedup"]
                for r in rows if "speedup" in r}
    targets = []
    for point in [p for p in points if p in TARGETS]:
        for config in [c for c in configs if method_of(c) != "dense"]:
            speedup = speedups.get((config, point))
            targets.append(dict(method=method_of(config), config=config, batch=point[0], context=point[1],
                                required=TARGETS[point], speedup=speedup,
                                met=None if speedup is None else speedup >= TARGETS[point]))
    return targets


def print_table(rows: list[dict], targets: list[dict], gpu: str) -> None:
    print(f"\nSGLang decode step, Llama-3.1-8B shape (dummy weights), bf16, page {PAGE_SIZE}, CUDA graphs - {gpu}")
    print(f"{'config':11s} {'batch':>5s} {'context':>7s} {'prompt':>7s} {'ms/step':>8s} {'tok/s':>8s} {'speedup':>7s} "
          f"{'GB/s':>6s}")
    for r in rows:
        if "batch" not in r:
            continue
        name = r.get("config", r["method"])
        mark = " *" if (r["batch"], r["context"]) in TARGETS else ""
        if "ms_per_step" in r:
            speedup = f"{r['speedup']:7.2f}" if "speedup" in r else f"{'-':>7s}"
            gbps = f"{r['gbps']:6.0f}" if "gbps" in r else f"{'':6s}"
            print(f"{name:11s} {r['batch']:5d} {label(r['context']):>7s} {r['prompt']:7d} "
                  f"{r['ms_per_step']:8.2f} {r['tokens_per_s']:8.0f} {speedup} {gbps}{mark}")
        else:
            print(f"{name:11s} {r['batch']:5d} {label(r['context']):>7s} {r['prompt']:7d}  {r['error']}{mark}")
    for r in rows:
        if "batch" not in r:
            print(f"{r.get('config', r['method']):11s} FAILED at {r['failed_at']}: {r['error'].splitlines()[0]} "
                  f"(log {r['log']})")
    print("speedup: over the faster dense server at the point; GB/s: weights + KV cache read per dense step")
    print("* target point")
    for t in targets:
        result = "not measured" if t["met"] is None else f"{t['speedup']:.2f}x {'met' if t['met'] else 'NOT met'}"
        print(f"target {t['batch']}x{label(t['context'])} >= {t['required']}x: {t.get('config', t['method']):10s} "
              f"{result}")


def plot(rows: list[dict], path: str, gpu: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in dict.fromkeys(r.get("config", r["method"]) for r in rows if "speedup" in r and
                                        r["method"] != "dense")]
    fig, axes = plt.subplots(1, max(1, len(configs)), figsize=(5 * max(1, len(configs)), 4), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for i, batch in enumerate(sorted({r["batch"] for r in rows if "speedup" in r})):
            pts = sorted((r["context"], r["speedup"]) for r in rows
                         if r.get("config", r["method"]) == config and r.get("batch") == batch and "speedup" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"batch {batch}")
        for (batch, context), required in TARGETS.items():
            if not any(r.get("batch") == batch and r.get("context") == context for r in rows):
                continue
            ax.scatter([context], [required], marker="*", s=120, color="red", zorder=3)
            ax.annotate(f"target {batch}x{label(context)}", (context, required), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(config)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step speedup over dense FlashInfer")
        ax.legend(fontsize=7)
    fig.suptitle(f"SGLang end-to-end decode, Llama-3.1-8B shape (dummy weights) - {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def combine(paths: list[str], out: Path) -> int:
    """Rows of several runs -> one JSON, table, PNG. A sparse config's first measurement of a point wins; its
    speedup is over the dense server of its own run (ratios are measured side by side), or, where that run did
    not time dense at the point, over the first run that did (``baseline_run``). The dense rows kept are those
    some kept row is measured against."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {r["gpu"] for r in runs if r.get("gpu")}
    gpu = " / ".join(sorted(gpus)) or "unknown GPU"
    dense: dict[int, dict] = {}                       # run -> point -> fastest dense ms
    for i, run in enumerate(runs):
        for r in run["rows"]:
            if r["method"] == "dense" and "ms_per_step" in r:
                point = (r["batch"], r["context"])
                dense.setdefault(i, {})[point] = min(dense.get(i, {}).get(point, float("inf")), r["ms_per_step"])
    rows, seen = [], set()
    for i, run in enumerate(runs):
        for r in run["rows"]:
            key = (r.get("config", r["method"]), r.get("batch"), r.get("context"))
            if "ms_per_step" not in r or (r["method"] != "dense" and key in seen):
                continue
            seen.add(key)
            row = {k: v for k, v in r.items() if k != "speedup"}
            row.update(run=i, commit=r.get("commit", run.get("commit")))
            point = (r["batch"], r["context"])
            base = i if point in dense.get(i, {}) else next((j for j in sorted(dense) if point in dense[j]), None)
            if base is not None:
                row.update(speedup=dense[base][point] / r["ms_per_step"], baseline_run=base)
            rows.append(row)
    used = {(r["baseline_run"], r["batch"], r["context"]) for r in rows if r["method"] != "dense" and "speedup" in r}
    rows = [r for r in rows if r["method"] != "dense" or (r["run"], r["batch"], r["context"]) in used or not used]
    configs = list(dict.fromkeys(r.get("config", r["method"]) for r in rows))
    points = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    targets = target_results(rows, configs, points)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(gpu=gpu, combined=[Path(p).name for p in paths], runs=[dict(
        gpu=r.get("gpu"), commit=r.get("commit"), versions=r.get("versions"), settings=r.get("settings"),
        commands=r.get("commands")) for r in runs], rows=rows, targets=targets), indent=1))
    print_table(rows, targets, gpu)
    try:
        plot(rows, str(out.with_suffix(".png")), gpu)
    except ImportError:
        pass
    print(f"wrote {out}", flush=True)
    return 0


def add_bandwidth(rows: list[dict], model_config: dict) -> None:
    """Dense rows: the bandwidth the step reached (what it must read / its time), GB/s."""
    for r in rows:
        if r["method"] == "dense" and "ms_per_step" in r:
            r["gbps"] = bytes_per_step(model_config, r["batch"], r["context"]) / r["ms_per_step"] / 1e6


def git_commit() -> str:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or ``unknown``. ``SGL_SPARSE_COMMIT``
    overrides it (a copy of the working tree without its git history, as on a remote GPU host)."""
    if os.environ.get("SGL_SPARSE_COMMIT"):
        return os.environ["SGL_SPARSE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    found = {}
    for dist in ("sglang", "torch", "flashinfer-python", "cupy-cuda12x", "cupy-cuda13x", "sgl-sparse"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def gpu_name() -> str:
    """The (first visible) GPU's name from nvidia-smi: this process never creates a CUDA context, so it holds no
    GPU memory beside the servers."""
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "no CUDA GPU"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "no CUDA GPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), type=config_spec, metavar="CONFIG",
                    help="dense and sparse configs to run, each its own server: presets (configs/*.yaml: "
                         f"{', '.join(presets())}), optionally with overrides as --sparse-config takes them "
                         f"(quest-fast:reselect_min_cosine=-1); default: {' '.join(METHODS)}")
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="BATCHxCONTEXT, e.g. 8x32K 4x128K")
    ap.add_argument("--dense-eager", action="store_true",
                    help="also run dense without CUDA graphs (the faster dense server is the baseline)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps of each timed request (S)")
    ap.add_argument("--repeats", type=int, default=2, help="timed request pairs per point (the fastest counts)")
    ap.add_argument("--warm-steps", type=int, default=8, help="decode steps of the untimed warm-up request (W)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.8,
                    help="SGLang's; the KV pool is also capped (--max-total-tokens) at what the largest point needs")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="directory with the model's config.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for each server")
    ap.add_argument("--out", default="out/bench_e2e.json")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the server commands, check their "
                                                           "flags with SGLang's parser, start nothing")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="merge the rows of these result files (runs of one session, e.g. one per GPU or per time "
                         "limit) into --out, with its table and PNG; runs nothing")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, Path(args.out))

    config = json.loads((args.model / "config.json").read_text())
    new_tokens = 1 + max(args.steps, args.warm_steps)
    points = sorted({parse_point(p) for p in args.points}, key=lambda p: (p[1], -p[0]))   # largest batch first
    prompt_lens = {c: prompt_length(c, config["max_position_embeddings"], new_tokens) for _, c in points}
    servers = list(args.methods) + ([DENSE_EAGER] if args.dense_eager else [])
    specs = {m: server_spec(m, args, points, prompt_lens, new_tokens) for m in servers}
    print("points: " + ", ".join(f"{b}x{label(c)} (prompt {prompt_lens[c]})" for b, c in points), flush=True)
    commands = server_commands(str(args.model), specs)
    if args.dry_run:
        check_flags(commands)
        return 0
    stop_servers_on_sigterm()           # a time limit's SIGTERM kills the running server; measured rows are saved

    out_path = Path(args.out)
    log_dir = out_path.with_name(out_path.stem + "_logs")
    rng = random.Random(args.seed)
    longest = max(prompt_lens.values())
    sequences = [rng.choices(range(config["vocab_size"]), k=longest) for _ in range(max(b for b, _ in points))]
    started = time.time()
    rows: list[dict] = []

    def save(gpu: str | None) -> list[dict]:
        """Rewrite the JSON (after every point and method, so a cut-off run keeps its rows); returns the targets."""
        targets = add_speedups(rows, args.methods, points)
        add_bandwidth(rows, config)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(dict(
            gpu=gpu, versions=versions(), commit=git_commit(), model=str(args.model), wall_s=time.time() - started,
            settings=dict(steps=args.steps, repeats=args.repeats, warm_steps=args.warm_steps, seed=args.seed,
                          mem_fraction_static=args.mem_fraction_static, page_size=PAGE_SIZE,
                          programmatic_dependent_launch=ck_cuda.PDL),
            commands={m: shlex.join(c) for m, c in commands.items()}, rows=rows, targets=targets), indent=1))
        return targets

    gpu = gpu_name()
    progress = Progress(len(servers) * len(points))       # points timed (server start-ups count into the pace)
    for method in servers:
        run_method(method, specs[method], args, points, prompt_lens, new_tokens, sequences, log_dir, rows,
                   lambda: save(gpu), progress)
        save(gpu)
    print_table(rows, save(gpu), gpu)
    png = out_path.with_suffix(".png")
    try:
        plot(rows, str(png), gpu)
        print(f"wrote {out_path} and {png} (server logs in {log_dir})", flush=True)
    except ImportError:
        print(f"wrote {out_path} (matplotlib missing: no plot; server logs in {log_dir})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
