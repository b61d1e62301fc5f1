#!/usr/bin/env python3
"""Serving throughput the way operators measure it: SGLang's own ``python -m sglang.bench_serving``.

One server per config (``dense``: ``--attention-backend flashinfer --page-size 16``; a preset, optionally with inline
overrides such as ``twilight:residual_sample=true,token_budget=2048``: ``--attention-backend sgl_sparse
--sparse-config <config> --page-size 16``) serves Llama-3.1-8B-shaped random weights (``--load-format
dummy`` on ``launch/models/llama-3.1-8b/config.json``, CUDA graphs for decode, prefill graphs off, the KV pool capped
at what the largest concurrency needs so that every config gets the same pool). Against it, bench_serving runs each
workload at each concurrency (``--max-concurrency C --request-rate inf``):

- ``32k``: random prompts of 32768 tokens, 2048 output tokens each (``--random-range-ratio 1``);
- ``mixed``: prompt lengths uniform in 1K..32K and output lengths in 64..2K (``--random-range-ratio 1/32``).

Prompts are random token ids (``--dataset-name random-ids --tokenize-prompt``): no dataset download. bench_serving
still needs a tokenizer (it counts streamed text and re-tokenizes outputs), and so does the server (its detokenizer
streams the text bench_serving times), so ``--skip-tokenizer-init`` is not usable here. Without ``--tokenizer``, a
word-level tokenizer with one token per id of the model's vocabulary (``t0`` ... ``t128255``) is written to
``out/bench_serving_tokenizer/`` and given to both (``--tokenizer-path``): offline, exact vocabulary size, every
token decodes to non-empty text, and re-tokenizing an output gives back its token count. A real Llama-3 tokenizer
directory works too (``--tokenizer DIR``). ``--flush-cache`` empties the radix cache after bench_serving's warm-up
request, and each concurrency uses its own seed, so no measured prompt is served from cache.

    python launch/bench_serving.py                                  # dense and every sparse preset, both workloads
    python launch/bench_serving.py --configs dense quest --workloads 32k --concurrency 16
    python launch/bench_serving.py --dry-run                        # commands, flags checked by SGLang's parsers
    python launch/bench_serving.py --combine out/a.json out/b.json  # merge runs (e.g. one per GPU or time limit)

Rows (``--out``, rewritten after every measurement): ``config``, ``workload``, ``concurrency``, ``input_len``,
``output_len``, ``output_throughput`` (tok/s), ``median_tpot_ms``, ``p99_tpot_ms``, ``median_ttft_ms`` and more, from
bench_serving's ``--output-file``; a PNG beside it; server and bench_serving logs in ``<out>_logs/``.

Prefill stays dense, so the share of the run spent in decode bounds what sparse decode can give. ``decode_share``
estimates it per row: 1 - (prompt tokens x prefill seconds per token) / duration, the prefill cost per token taken
from the same config's concurrency-1 run of that workload (mean TTFT x requests / prompt tokens; at concurrency 1
nothing else runs during a prefill). With decode k times faster a run is at most 1 / (1 - s + s / k) faster.

Targets (issue 16, the ``quest`` preset; other presets are reported against the same figures): at concurrency 16
on ``32k``, median TPOT >= 1.9x better than dense, output throughput >= 1.4x dense, median TTFT <= dense + 10 %; on
``mixed``, output throughput never below dense.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

from bench_e2e import (MODEL_DIR, PAGE_SIZE, check_flags, config_spec, git_commit, gpu_name,  # noqa: E402
                       method_of, server_commands, versions)
from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.serving import ServerError, ServerProcess, file_safe, stop_servers_on_sigterm  # noqa: E402

WORKLOADS = {"32k": dict(input_len=32768, output_len=2048, range_ratio=1.0),
             "mixed": dict(input_len=32768, output_len=2048, range_ratio=1 / 32)}
DEFAULT_CONFIGS = ["dense", "quest", "quest-fast", "twilight", "vattention"]
TARGET_CONFIG = "quest"                   # the preset the targets are for
TPOT_SPEEDUP, THROUGHPUT_RATIO, TTFT_RATIO_MAX, MIXED_THROUGHPUT_RATIO = 1.9, 1.4, 1.10, 1.0
TOKENIZER_DIR = ROOT / "out" / "bench_serving_tokenizer"
RESULT_FIELDS = ("completed", "duration", "total_input_tokens", "total_output_tokens", "output_throughput",
                 "median_tpot_ms", "p99_tpot_ms", "mean_tpot_ms", "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms",
                 "median_itl_ms", "p99_itl_ms", "median_e2e_latency_ms", "request_throughput")


class BenchError(RuntimeError):
    pass


def num_prompts(concurrency: int, rounds: int) -> int:
    """``rounds`` waves of ``concurrency`` requests, at least two."""
    return max(2, rounds * concurrency)


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer with one token per id (``t<id>``, whitespace-separated): what bench_serving and the
    server need to stream and count text, without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = path / "tokenizer_config.json"
    if config.exists() and json.loads(config.read_text()).get("sgl_sparse_vocab_size") == vocab_size:
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tmp = f".tmp{os.getpid()}"                  # each file appears whole: runs on other GPUs may share the folder
    tokenizer.save(str(path / f"tokenizer.json{tmp}"))
    os.replace(path / f"tokenizer.json{tmp}", path / "tokenizer.json")
    (path / f"tokenizer_config.json{tmp}").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False, model_max_length=1 << 20,
        sgl_sparse_vocab_size=vocab_size)))
    os.replace(path / f"tokenizer_config.json{tmp}", config)
    return path


def server_spec(config: str, args, tokenizer: Path) -> tuple[str, str | None, list[str]]:
    """(attention backend, sparse config, extra flags) of ``config``'s server; every config gets the same pool."""
    max_c = max(args.concurrency)
    longest = max(WORKLOADS[w]["input_len"] + WORKLOADS[w]["output_len"] for w in args.workloads)
    pool = max_c * (longest + PAGE_SIZE) + 8192
    extra = ["--load-format", "dummy", "--tokenizer-path", str(tokenizer), "--mem-fraction-static",
             str(args.mem_fraction_static), "--max-total-tokens", str(pool), "--max-running-requests", str(max_c),
             "--cuda-graph-max-bs-decode", str(max_c), "--cuda-graph-backend-prefill", "disabled",
             "--page-size", str(PAGE_SIZE)]
    return ("flashinfer", None, extra) if config == "dense" else ("sgl_sparse", config, extra)


def bench_command(port: int, model: Path, tokenizer: Path, workload: str, concurrency: int, prompts: int,
                  seed: int, output_file: Path) -> list[str]:
    w = WORKLOADS[workload]
    return [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1",
            "--port", str(port), "--model", str(model), "--tokenizer", str(tokenizer),
            "--dataset-name", "random-ids", "--tokenize-prompt", "--random-input-len", str(w["input_len"]),
            "--random-output-len", str(w["output_len"]), "--random-range-ratio", repr(w["range_ratio"]),
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--seed", str(seed), "--flush-cache", "--warmup-requests", "1", "--ready-check-timeout-sec", "0",
            "--disable-tqdm", "--output-file", str(output_file)]


def check_bench_flags(cmd: list[str]):
    """Parse a bench_serving command line with bench_serving's own parser (its ``cli_main``, benchmark not run);
    returns the parsed arguments."""
    import sglang.benchmark.serving as serving

    parsed, saved = [], (serving.run_benchmark, sys.argv)
    serving.run_benchmark, sys.argv = parsed.append, ["bench_serving"] + cmd[cmd.index("sglang.bench_serving") + 1:]
    try:
        serving.cli_main()
    except SystemExit as e:
        raise BenchError(f"bench_serving rejected its flags (exit {e.code}): {shlex.join(cmd)}") from e
    finally:
        serving.run_benchmark, sys.argv = saved
    return parsed[0]


def parse_result(path: Path) -> dict:
    """The result bench_serving appended last to its ``--output-file`` (JSON lines)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not lines:
        raise BenchError(f"bench_serving wrote no result to {path}")
    return json.loads(lines[-1])


def decode_path(config: str, workload: str, concurrency: int) -> str:
    """The path a config's decode steps take at this point, from its batch floor (``min_batch_tokens``): ``dense``
    where even the fullest step (every running request at its longest) does not select
    (:func:`sgl_sparse.policies.needs_selection`: every step runs the dense path, the row measures the floor, not
    the method); ``sparse`` without a floor; ``both`` otherwise (the steps while fewer requests run, as the wave
    ramps up and down, are dense)."""
    if config == "dense":
        return "dense"
    cfg = SparseConfig.load(config)
    if cfg.min_batch_tokens == 0:
        return "sparse"
    import torch

    from sgl_sparse.policies import needs_selection

    w = WORKLOADS[workload]
    return "both" if needs_selection(cfg, torch.full((concurrency,), w["input_len"] + w["output_len"])) else "dense"


def result_row(config: str, workload: str, concurrency: int, prompts: int, result: dict) -> dict:
    """A row from bench_serving's result; ``error`` where requests failed."""
    w = WORKLOADS[workload]
    row = dict(config=config, method=method_of(config), workload=workload, concurrency=concurrency,
               input_len=w["input_len"], output_len=w["output_len"], range_ratio=w["range_ratio"], num_prompts=prompts,
               decode_path=decode_path(config, workload, concurrency))
    row.update({k: result[k] for k in RESULT_FIELDS if k in result})
    row["duration_s"] = row.pop("duration", None)
    if row.get("completed"):
        row["mean_input_len"] = row["total_input_tokens"] / row["completed"]
        row["mean_output_len"] = row["total_output_tokens"] / row["completed"]
    if row.get("completed") != prompts:
        row["error"] = f"{row.get('completed', 0)} of {prompts} requests completed"
    return row


def measured(r: dict) -> bool:
    return "error" not in r and "output_throughput" in r


def add_decode_shares(rows: list[dict]) -> None:
    """Each measured row's ``decode_share``: 1 - prompt tokens x (prefill seconds per token at concurrency 1 of the
    same config and workload) / duration; None without such a row. The prefill rate is a property of the server,
    not a comparison, so a combined file takes it from the row's own run where that run measured concurrency 1,
    else from the first run that did (``decode_share_from_run`` names which)."""
    by_run: dict[tuple, tuple[int, float]] = {}     # (run, config, workload) -> (run, prefill s per token)
    first: dict[tuple, tuple[int, float]] = {}      # (config, workload) -> the first run's
    for r in rows:
        if measured(r) and r["concurrency"] == 1 and r.get("total_input_tokens"):
            run, key = r.get("run", 0), (r["config"], r["workload"])
            rate = r["mean_ttft_ms"] / 1e3 * r["completed"] / r["total_input_tokens"]
            by_run.setdefault((run, *key), (run, rate))
            first.setdefault(key, (run, rate))
    for r in rows:
        key = (r.get("config"), r.get("workload"))
        found = by_run.get((r.get("run", 0), *key)) or first.get(key)
        if measured(r) and found is not None and r.get("duration_s"):
            run, rate = found
            r["decode_share"] = min(1.0, max(0.0, 1 - r["total_input_tokens"] * rate / r["duration_s"]))
            if run != r.get("run", 0):
                r["decode_share_from_run"] = run


def evaluate_targets(rows: list[dict], configs) -> list[dict]:
    """Each sparse config against the dense server of its own run: TPOT, throughput and TTFT at 32k x 16, throughput
    on every mixed concurrency. ``met`` None: not measured (no row, or no dense row in its run); ``binding``: the
    issue's target (quest)."""
    by_key = {(r["config"], r["workload"], r["concurrency"]): r for r in rows if measured(r)}
    dense_rows = dense_by_point(rows)
    mixed_cs = sorted({r["concurrency"] for r in rows if r.get("workload") == "mixed"})
    checks = [("32k", 16, "median_tpot_speedup", ">=", TPOT_SPEEDUP),
              ("32k", 16, "output_throughput_ratio", ">=", THROUGHPUT_RATIO),
              ("32k", 16, "median_ttft_ratio", "<=", TTFT_RATIO_MAX)]
    checks += [("mixed", c, "output_throughput_ratio", ">=", MIXED_THROUGHPUT_RATIO) for c in mixed_cs]
    targets = []
    for config in [c for c in configs if c != "dense"]:
        for workload, c, metric, op, required in checks:
            r = by_key.get((config, workload, c))
            dense = None if r is None else dense_of(dense_rows, r)
            value = None if dense is None else ratios(dense, r)[metric]
            met = None if value is None else (value >= required if op == ">=" else value <= required)
            targets.append(dict(config=config, workload=workload, concurrency=c, metric=metric, op=op,
                                required=required, value=value, met=met, binding=config == TARGET_CONFIG))
    return targets


def dense_by_point(rows: list[dict]) -> dict:
    """The measured dense rows by (run, workload, concurrency); ``run`` is the index of the run in a combined file
    (0 in a single run's file)."""
    return {(r.get("run", 0), r["workload"], r["concurrency"]): r for r in rows
            if r["config"] == "dense" and measured(r)}


def dense_of(dense: dict, r: dict) -> dict | None:
    """The dense row of ``r``'s own run, workload and concurrency, or None: a config is compared only with the dense
    server measured beside it (same run, same GPU), never with another run's."""
    return dense.get((r.get("run", 0), r["workload"], r["concurrency"]))


def ratios(dense: dict, r: dict) -> dict:
    return dict(median_tpot_speedup=dense["median_tpot_ms"] / r["median_tpot_ms"],
                output_throughput_ratio=r["output_throughput"] / dense["output_throughput"],
                median_ttft_ratio=r["median_ttft_ms"] / dense["median_ttft_ms"])


def table_order(r: dict) -> tuple:
    """Rows by workload and concurrency, each run's dense row first with its run's configs below it."""
    return r["workload"], r["concurrency"], r.get("run", 0), r["config"] != "dense", r["config"]


def print_table(rows: list[dict], targets: list[dict], gpu: str) -> None:
    print(f"\nsglang.bench_serving, Llama-3.1-8B shape (dummy weights), page {PAGE_SIZE} - {gpu}")
    print(f"{'config':11s} {'workload':8s} {'conc':>4s} {'in':>6s} {'out':>5s} {'tok/s':>8s} {'TPOT p50':>8s} "
          f"{'p99':>7s} {'TTFT p50':>9s} {'decode':>6s} {'xTPOT':>6s} {'xtok/s':>6s}")
    dense = dense_by_point(rows)
    for r in sorted(rows, key=table_order):
        head = f"{r['config'] + (' *' if r.get('decode_path') == 'dense' and r['config'] != 'dense' else ''):11s} "\
               f"{r['workload']:8s} {r['concurrency']:4d}"
        if not measured(r):
            print(f"{head}  {r.get('error', 'not measured')}")
            continue
        share = f"{r['decode_share']:6.0%}" if r.get("decode_share") is not None else f"{'-':>6s}"
        base = dense_of(dense, r)
        x = ratios(base, r) if base is not None and r["config"] != "dense" else None
        rel = f"{x['median_tpot_speedup']:6.2f} {x['output_throughput_ratio']:6.2f}" if x else f"{'':13s}"
        print(f"{head} {r['mean_input_len']:6.0f} {r['mean_output_len']:5.0f} {r['output_throughput']:8.1f} "
              f"{r['median_tpot_ms']:8.2f} {r['p99_tpot_ms']:7.2f} {r['median_ttft_ms']:9.0f} {share} {rel}")
    print("in/out: mean tokens per request; decode: estimated share of the run spent in decode (prefill is dense); "
          "xTPOT, xtok/s: dense median TPOT / config's, config's output throughput / dense (the dense row above it: "
          "same run, same GPU); *: every decode step ran the dense path (below the config's min_batch_tokens)")
    for r in [r for r in rows if r["config"] == "dense" and r.get("decode_share") is not None]:
        s = r["decode_share"]
        bound = "unbounded" if s >= 1 else f"{1 / (1 - s):.2f}x"
        print(f"dense {r['workload']} c={r['concurrency']}: decode ~{s:.0%} of the run; with decode free the run "
              f"could be at most {bound} faster, with decode 2x faster at most {1 / (1 - s / 2):.2f}x")
    for t in targets:
        value = "not measured" if t["met"] is None else f"{t['value']:.2f} {'met' if t['met'] else 'NOT met'}"
        print(f"{'target' if t['binding'] else 'report'} {t['config']:10s} {t['workload']:5s} c={t['concurrency']:<3d} "
              f"{t['metric']} {t['op']} {t['required']}: {value}")


def plot(rows: list[dict], path: str, gpu: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if any(r.get("workload") == w and measured(r) for r in rows)]
    metrics = [("output_throughput", "output throughput (tok/s)"), ("median_tpot_ms", "median TPOT (ms)")]
    fig, axes = plt.subplots(2, max(1, len(workloads)), figsize=(5.5 * max(1, len(workloads)), 7), squeeze=False)
    for j, workload in enumerate(workloads):
        for i, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            for k, config in enumerate(dict.fromkeys(r["config"] for r in rows if measured(r))):
                by_c = {}                        # dense: one point per concurrency (the first run's)
                for r in rows:
                    if measured(r) and r["config"] == config and r["workload"] == workload:
                        by_c.setdefault(r["concurrency"], r[metric])
                pts = sorted(by_c.items())
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{k}", label=config)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.set_title(f"{workload}: {label}")
            ax.legend(fontsize=7)
    fig.suptitle(f"sglang.bench_serving, Llama-3.1-8B shape (dummy weights) - {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_config(config: str, args, tokenizer: Path, log_dir: Path, rows: list[dict], save) -> None:
    """Start ``config``'s server, run every workload x concurrency with bench_serving, stop it. A row per point
    (a failed point becomes a row with ``error``; the next point still runs while the server lives); ``save``
    after each."""
    backend, sparse_config, extra = server_spec(config, args, tokenizer)
    server = ServerProcess(str(args.model), backend=backend, sparse_config=sparse_config, extra_args=extra,
                           log_path=log_dir / f"server_{file_safe(config)}.log", env={"HF_HUB_OFFLINE": "1"})
    started = time.time()
    print(f"[{config}] starting server (log {server.log_path})", flush=True)
    try:
        server.start().wait_ready(timeout=args.start_timeout)
        print(f"[{config}] ready after {time.time() - started:.0f} s", flush=True)
        for workload in args.workloads:
            for concurrency in args.concurrency:
                stage = f"{workload} c={concurrency}"
                prompts = num_prompts(concurrency, args.rounds if workload == "32k" else args.mixed_rounds)
                point_start = time.time()
                try:
                    row = run_point(server.port, config, workload, concurrency, prompts, args, tokenizer, log_dir)
                    result = row.get("error") or (f"{row['output_throughput']:.1f} tok/s, median TPOT "
                                                  f"{row['median_tpot_ms']:.2f} ms, median TTFT "
                                                  f"{row['median_ttft_ms']:.0f} ms")
                except (BenchError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                    row = dict(config=config, method=method_of(config), workload=workload, concurrency=concurrency,
                               failed_at=stage, error=f"{type(e).__name__}: {e}"[:3000], log=str(server.log_path))
                    result = f"FAILED: {row['error']}"
                rows.append(row)
                save()
                print(f"[{config}] {stage}: {result} ({prompts} prompts, {time.time() - point_start:.0f} s; "
                      f"{time.time() - started:.0f} s since start-up)", flush=True)
                if not server.alive():
                    raise ServerError(f"server exited with code {server.proc.returncode} during {stage}")
    except ServerError as e:
        print(f"[{config}] FAILED: {e}\n(server log: {server.log_path})", flush=True)
        rows.append(dict(config=config, method=method_of(config), workload="-", concurrency=0, failed_at="server",
                         error=f"ServerError: {e}"[:3000], log=str(server.log_path)))
        save()
    finally:
        server.stop()
    print(f"[{config}] done in {time.time() - started:.0f} s", flush=True)


def run_point(port: int, config: str, workload: str, concurrency: int, prompts: int, args, tokenizer: Path,
              log_dir: Path) -> dict:
    name = f"{file_safe(config)}_{workload}_c{concurrency}"
    output_file, log = log_dir / f"bench_{name}.jsonl", log_dir / f"bench_{name}.log"
    output_file.unlink(missing_ok=True)
    cmd = bench_command(port, args.model, tokenizer, workload, concurrency, prompts, args.seed + concurrency,
                        output_file)
    start = time.time()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.bench_timeout,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if done.returncode != 0:
        raise BenchError(f"bench_serving exited with {done.returncode}; log {log}:\n{log.read_text()[-3000:]}")
    row = result_row(config, workload, concurrency, prompts, parse_result(output_file))
    row["wall_s"] = time.time() - start
    return row


def save_results(path: Path, rows: list[dict], configs, **meta) -> list[dict]:
    """Decode shares and targets from the rows; the JSON rewritten (so a cut-off run keeps its rows)."""
    add_decode_shares(rows)
    targets = evaluate_targets(rows, configs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta, rows=rows, targets=targets), indent=1))
    return targets


def combine(paths: list[str], out: Path) -> int:
    """Rows of several runs -> one JSON, table and PNG. The first run's row of a sparse (config, workload,
    concurrency) that has a dense row beside it in its run wins (else the first run's row, without ratios), with
    its commit and ``run`` (a combined file can be combined again); every run keeps the dense rows its kept configs
    are compared with, so each ratio stays within one run on one GPU. A point measured for dense alone keeps its
    first dense row."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    candidates, names, merged = [], [], []
    for path, run in zip(paths, runs):
        combined = bool(run.get("combined"))       # a combined input: its files and runs go in its place
        first = len(merged)
        names += run["combined"] if combined else [Path(path).name]
        merged += run["runs"] if combined else [{k: run.get(k) for k in ("gpu", "commit", "versions", "settings")}]
        candidates += [dict(r, run=first + (r.get("run", 0) if combined else 0),
                            commit=r.get("commit") or run.get("commit")) for r in run["rows"] if measured(r)]
    dense_points = dense_by_point(candidates)
    chosen: dict[tuple, dict] = {}
    for r in candidates:                            # first wins, but a row whose run has a dense row beats one
        key = (r["config"], r["workload"], r["concurrency"])       # whose run has none
        paired = (r["run"], r["workload"], r["concurrency"]) in dense_points
        if r["config"] != "dense" and (key not in chosen or (paired and not chosen[key][1])):
            chosen[key] = (r, paired)
    rows = [r for r, _ in chosen.values()]
    needed = {(r["run"], r["workload"], r["concurrency"]) for r in rows}
    dense = [r for r in candidates if r["config"] == "dense"]
    kept = {}
    for r in dense:                                 # the dense rows the kept configs are compared with
        key = (r["run"], r["workload"], r["concurrency"])
        if key in needed:
            kept.setdefault(key, r)
    points = {(workload, c) for _, workload, c in kept}
    for r in dense:                                 # points measured for dense alone: the first run's row
        if (r["workload"], r["concurrency"]) not in points:
            points.add((r["workload"], r["concurrency"]))
            kept[(r["run"], r["workload"], r["concurrency"])] = r
    rows += kept.values()
    rows.sort(key=table_order)
    gpu = " / ".join(sorted({r["gpu"] for r in runs if r.get("gpu")})) or "unknown GPU"
    configs = list(dict.fromkeys(r["config"] for r in rows))
    targets = save_results(out, rows, configs, gpu=gpu, combined=names, runs=merged)
    print_table(rows, targets, gpu)
    try:
        plot(rows, str(out.with_suffix(".png")), gpu)
    except ImportError:
        pass
    print(f"wrote {out}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, type=config_spec, metavar="CONFIG",
                    help=f"dense and presets, optionally with inline overrides "
                         f"(twilight:residual_sample=true,token_budget=2048), each its own server (default: "
                         f"{' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=1, help="32k: prompts = rounds x concurrency (at least 2)")
    ap.add_argument("--mixed-rounds", type=int, default=2, help="mixed: prompts = rounds x concurrency (at least 2)")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="directory with the model's config.json")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory for the server and bench_serving "
                                                   f"(default: a word-level one written to {TOKENIZER_DIR})")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=1, help="bench_serving's seed is this + the concurrency")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for each server")
    ap.add_argument("--bench-timeout", type=float, default=600.0, help="seconds for each bench_serving run")
    ap.add_argument("--out", default="launch/results/bench_serving_h200.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, check their flags with SGLang's "
                                                           "parsers, start nothing")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge these result files into --out; runs nothing")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, Path(args.out))

    vocab_size = json.loads((args.model / "config.json").read_text())["vocab_size"]
    tokenizer = args.tokenizer or TOKENIZER_DIR
    commands = server_commands(str(args.model), {c: server_spec(c, args, tokenizer) for c in args.configs})
    out_path = Path(args.out)
    log_dir = out_path.with_name(out_path.stem + "_logs")
    for workload in args.workloads:
        for c in args.concurrency:
            n = num_prompts(c, args.rounds if workload == "32k" else args.mixed_rounds)
            cmd = bench_command(0, args.model, tokenizer, workload, c, n, args.seed + c, log_dir / "x.jsonl")
            print(f"bench {workload} c={c}: {shlex.join(cmd)}", flush=True)
    if args.dry_run:
        check_flags(commands)
        for workload in args.workloads:
            check_bench_flags(bench_command(0, args.model, tokenizer, workload, 1, 2, 0, log_dir / "x.jsonl"))
        print("bench_serving accepted every command line", flush=True)
        return 0
    stop_servers_on_sigterm()           # a time limit's SIGTERM kills the running server; measured rows are saved
    if args.tokenizer is None:
        write_tokenizer(TOKENIZER_DIR, vocab_size)

    started, gpu, rows = time.time(), gpu_name(), []
    settings = dict(workloads={w: WORKLOADS[w] for w in args.workloads}, concurrency=args.concurrency,
                    rounds=args.rounds, mixed_rounds=args.mixed_rounds, seed=args.seed, tokenizer=str(tokenizer),
                    mem_fraction_static=args.mem_fraction_static, page_size=PAGE_SIZE)

    def save() -> list[dict]:
        return save_results(out_path, rows, args.configs, gpu=gpu, versions=versions(), commit=git_commit(),
                            model=str(args.model), wall_s=time.time() - started, settings=settings,
                            commands={c: shlex.join(cmd) for c, cmd in commands.items()})

    for config in args.configs:
        run_config(config, args, tokenizer, log_dir, rows, save)
    print_table(rows, save(), gpu)
    try:
        plot(rows, str(out_path.with_suffix(".png")), gpu)
        print(f"wrote {out_path} and its PNG in {time.time() - started:.0f} s (logs in {log_dir})", flush=True)
    except ImportError:
        print(f"wrote {out_path} (matplotlib missing: no plot; logs in {log_dir})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
