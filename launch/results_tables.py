#!/usr/bin/env python3
"""Markdown tables of the benchmark result files, written into the docs between markers.

    python launch/results_tables.py            # rewrite the marked tables of README.md and docs/*.md
    python launch/results_tables.py --check    # exit 1 if a marked table differs from its result file

A table is marked in a Markdown file as::

    <!-- table: bench_decode_h200 -->
    ...generated...
    <!-- /table -->

(``<!-- table: bench_serving_h200 compact -->`` picks another style of a kind, where it has one: ``compact`` for
``bench_serving``, ``reuse`` for ``bench_decode``: speedup against the reuse interval, ``launch/plot_reuse.py``.)

and made from ``launch/results/<name>.json`` (its kind by the name's start: ``bench_decode``, ``bench_e2e``,
``bench_serving``, ``bench_attention_rows``, ``accuracy``, ``soak``, ``profile_e2e``), so the numbers the docs
show are the numbers of the result files, with the GPU and the commit each was measured at.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

from bench_e2e import label  # noqa: E402
from bench_serving import dense_by_point, dense_of, measured, ratios, table_order  # noqa: E402
from plot_reuse import best_us, reuse_table, short_commit as _commit  # noqa: E402
RESULTS = ROOT / "launch" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"(?P<open><!-- table: (?P<name>[\w.-]+)(?: (?P<style>\w+))? -->\n)(?P<body>.*?)"
                    r"(?P<close><!-- /table -->)", re.S)


def bench_decode_table(data: dict) -> str:
    rows = data["rows"]
    lines = [f"{data['gpu']}, commit {_commit(data.get('commit'))}, copy peak {data['peak_gbps'] / 1000:.2f} TB/s, "
             f"{data.get('l2', '')} L2.", "",
             "| config | batch × context | budget | µs per step | speedup | attended | rel L2 | %peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = best_us(r)
        mark = " (eager)" if r["us_eager"] < r["us_graph"] else ""
        if "us_select" in r:
            mark = f" ({r['us_select']:.1f} selecting, {r['us_reuse']:.1f} reusing)"
        speed = f"**{r['speedup']:.2f}**" if r["method"] != "dense" else "1.00"
        budget = "—" if r["method"] == "dense" else str(r["budget"])
        lines.append(f"| {r.get('config', r['method'])} | {r['batch']} × {label(r['context'])} | {budget} | "
                     f"{us:.1f}{mark} | {speed} | {r['attended_fraction']:.4f} | {r['rel_l2']:.3f} | "
                     f"{100 * r['peak_fraction']:.0f} |")
    return "\n".join(lines) + "\n"


def bench_e2e_table(data: dict) -> str:
    rows = [r for r in data["rows"] if "ms_per_step" in r]
    lines = [f"{data['gpu']}; each speedup over the dense server of the same run (same GPU); commit per row.", "",
             "| config | batch × context | ms per step | speedup | dense GB/s | commit |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speed = "1.00" if r["method"] == "dense" else f"**{r['speedup']:.2f}**" if "speedup" in r else "—"
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        lines.append(f"| {r.get('config', r['method'])} | {r['batch']} × {label(r['context'])} | "
                     f"{r['ms_per_step']:.2f} | {speed} | {gbps} | {_commit(r.get('commit', data.get('commit')))} |")
    return "\n".join(lines) + "\n"


def _ci(low_high) -> str:
    return f"[{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else ""


def _accuracy_runs(data: dict) -> str:
    """Commit, model and instances of an accuracy file; for a combined one (``eval_accuracy.py --combine``) the
    commit of each run with the configs it served."""
    runs = data.get("runs") or [data]
    inst = {r.get("instances_per_task_length") for r in runs} - {None}
    what = f"{runs[0]['args']['model']}, {'/'.join(map(str, sorted(inst))) or '?'} instances per task and length"
    if len(runs) == 1:
        return f"commit {_commit(runs[0].get('commit'))}, {what}"
    configs = [", ".join(sorted({t["config"] for t in r.get("timings") or []})) for r in runs]
    served = "; ".join(f"{_commit(r.get('commit'))}: {c}" for r, c in zip(runs, configs))
    return (f"{what}; {len(runs)} runs merged (commit: configs) {served}; a config run more than once is scored by "
            "its answers averaged per instance")


def accuracy_table(data: dict) -> str:
    """Per config, budget and length: score with its 95 % interval, relative to dense with its interval, the
    attended fraction, the instances behind the row; then the per-task scores."""
    rows = sorted((r for r in data["rows"] if r.get("scope") in ("length", "overall")),
                  key=lambda r: (r["config"] != "dense", r["config"], r["budget"], r["length"] is None, r["length"] or 0))
    lines = [f"{data['gpu']}, {_accuracy_runs(data)}, 95 % bootstrap intervals over instances.", "",
             "| config | budget | length | score | 95 % CI | relative to dense | 95 % CI | attended | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "—" if r["method"] == "dense" else str(r["budget"])
        rel = "1.00" if r["method"] == "dense" else f"**{r['relative']:.3f}**"
        lines.append(f"| {r['config']} | {budget} | {r['length'] or 'all'} | "
                     f"{r['score']:.3f} | {_ci(r['score_ci'])} | {rel} | "
                     f"{_ci(r['relative_ci']) if r['method'] != 'dense' else ''} | {r['attended_fraction']:.4f} | "
                     f"{r['n']} |")
    tasks = sorted({r["task"] for r in data["rows"] if r.get("scope") == "task_length"})
    if tasks:
        lines += ["", "| config | budget | length | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
        cells: dict = {}
        for r in data["rows"]:
            if r.get("scope") == "task_length":
                cells.setdefault((r["config"], r["budget"], r["length"]), {})[r["task"]] = r["score"]
        for (config, budget, length), by_task in sorted(cells.items(), key=lambda c: (c[0][0] != "dense", c[0])):
            lines.append(f"| {config} | {budget if config != 'dense' else '—'} | {length} | "
                         + " | ".join(f"{by_task[t]:.2f}" if t in by_task else "" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def soak_table(data: dict) -> str:
    """One row per config: what the soak sent, what came back, and the issue's checks."""
    lines = [f"{data['gpu']}, commit per row; "
             "memory in MiB of the server's processes, after the warm-up and at the end; decode steps from a graph: "
             "share of SGLang's logged decode batches (one in 40) that replayed a CUDA graph.", "",
             "| config | commit | load (s) | requests | completed | client hang-ups | rejected (400) | server errors | "
             "leaked tokens | probe mismatches | retracted | memory start → end | output tokens/s | "
             "decode steps from a graph | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "requests" not in r:
            error = r.get("error", "?").splitlines()[0]
            lines.append(f"| {r['config']} | {_commit(r.get('commit'))} | failed: {error} |||||||||||||")
            continue
        share = r.get("decode_graph_share")
        graph = "—" if share is None else f"{100 * share:.0f} %"
        rate = "—" if r.get("output_tokens") is None else f"{r['output_tokens'] / r['duration_s']:.0f}"
        lines.append(f"| {r['config']} | {_commit(r.get('commit'))} | {r['duration_s']:.0f} | {r['requests']} | "
                     f"{r['completed']} | {r['aborted']} | {r['rejected']} | {r['server_errors']} | "
                     f"{r.get('leaked_tokens')} | "
                     f"{r.get('probe_mismatches')} | {r.get('retracted_reqs', 0)} | "
                     f"{r.get('gpu_memory_start_mib')} → {r.get('gpu_memory_end_mib')} | {rate} | {graph} | "
                     f"{'yes' if r['passed'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def _serving_rows(data: dict) -> tuple[list[dict], dict]:
    """The measured rows of a bench_serving file and its dense rows by (run, workload, concurrency)."""
    return [r for r in data["rows"] if measured(r)], dense_by_point(data["rows"])


def _serving_config(r: dict) -> str:
    """A serving row's config, marked where every decode step ran the dense path (below its batch floor)."""
    return r["config"] + (" (dense path)" if r.get("decode_path") == "dense" and r["config"] != "dense" else "")


def _row_commit(r: dict, data: dict) -> str:
    return _commit(r.get("commit") or data.get("commit"))


def accuracy_goals_table(data: dict) -> str:
    """The accuracy goals (``sgl_sparse.accuracy.ACCURACY_GOALS``) against the file's all-task rows at its longest
    length: met or not, the best row within each goal's attended limit, and where the goal is reached."""
    from sgl_sparse.accuracy import goal_report      # (the repository root is on sys.path through bench_e2e)

    goals = goal_report(data["rows"])
    length = goals[0]["length"] if goals else None
    min_n = goals[0]["min_n"] if goals else None
    lines = [f"{data['gpu']}, {_accuracy_runs(data)}; length {length}, all tasks, rows of at least {min_n} instances.",
             "",
             "| method | goal | met | best within the attended limit | reached at |", "|---|---|---|---|---|"]

    def point(r):
        return (f"{r['relative']:.3f} {_ci(r['relative_ci'])} at {100 * r['attended_fraction']:.3g} % "
                f"({r['config']}, {r['budget']})")
    for g in goals:
        goal = f"≥ {g['relative']:.2f} of dense at ≤ {100 * g['max_attended']:.3g} % attended"
        if g["met"] is None:
            lines.append(f"| {g['method']} | {goal} | not measured | | |")
            continue
        best = "no row within the limit" if g["best"] is None else point(g["best"])
        reached = (f"not reached up to {100 * g['measured_up_to']:.3g} % attended" if g["reached_at"] is None
                   else point(g["reached_at"]))
        lines.append(f"| {g['method']} | {goal} | {'**yes**' if g['met'] else 'no'} | {best} | {reached} |")
    return "\n".join(lines) + "\n"


def bench_serving_table(data: dict) -> str:
    """One row per config, workload and concurrency, each run's dense row above its configs, with the ratios to
    that dense row (same run, same GPU) and the estimated decode share of the dense run; then the targets."""
    rows, dense = _serving_rows(data)
    commits = sorted({_row_commit(r, data) for r in rows})
    lines = [f"{data['gpu']}, commit {', '.join(commits)}; ratios against the dense server of the same run, workload "
             "and concurrency (the dense row above them; — where the config's run had none); decode: estimated "
             "share of the dense run spent in decode.",
             "", "| config | workload | concurrency | output tok/s | median TPOT (ms) | p99 TPOT (ms) | median TTFT (ms) | "
             "TPOT speedup | throughput ratio | decode | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=table_order):
        base = dense_of(dense, r)
        if r["config"] == "dense":
            rel = "| | |"
        elif base is None:
            rel = "| — | — |"
        else:
            x = ratios(base, r)
            rel = f"| **{x['median_tpot_speedup']:.2f}** | **{x['output_throughput_ratio']:.2f}** |"
        share = f"{100 * r['decode_share']:.0f} %" if r["config"] == "dense" and r.get("decode_share") else ""
        lines.append(f"| {_serving_config(r)} | {r['workload']} | {r['concurrency']} | {r['output_throughput']:.1f} | "
                     f"{r['median_tpot_ms']:.2f} | {r['p99_tpot_ms']:.2f} | {r['median_ttft_ms']:.0f} {rel} {share} | "
                     f"{_row_commit(r, data)} |")
    targets = [t for t in data.get("targets", []) if t.get("binding")]
    if targets:
        lines += ["", "| target (`quest`) | required | measured |", "|---|---|---|"]
        for t in targets:
            got = "not measured" if t["met"] is None else f"{t['value']:.2f} ({'met' if t['met'] else 'not met'})"
            lines.append(f"| {t['workload']}, concurrency {t['concurrency']}: {t['metric']} | {t['op']} "
                         f"{t['required']} | {got} |")
    return "\n".join(lines) + "\n"


def bench_serving_compact(data: dict) -> str:
    """Each sparse config against the dense server of its own run at the same workload and concurrency, one line
    each (the README's view: no project targets)."""
    rows, dense = _serving_rows(data)
    lines = [f"{data['gpu']}; each config against the dense server of the same run, workload and concurrency.", "",
             "| config | workload | concurrent requests | median TPOT, dense → config | TPOT speedup | output throughput "
             "| TTFT | decode share of the dense run | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["config"], r["workload"], r["concurrency"])):
        base = dense_of(dense, r)
        if r["config"] == "dense":
            continue
        if base is None:
            lines.append(f"| {r['config']} | {r['workload']} | {r['concurrency']} | — → {r['median_tpot_ms']:.2f} ms "
                         f"| — (no dense server in its run) | — | — | — | {_row_commit(r, data)} |")
            continue
        x = ratios(base, r)
        share = f"{100 * base['decode_share']:.0f} %" if base.get("decode_share") else "—"
        lines.append(f"| {_serving_config(r)} | {r['workload']} | {r['concurrency']} | "
                     f"{base['median_tpot_ms']:.2f} → "
                     f"{r['median_tpot_ms']:.2f} ms | **{x['median_tpot_speedup']:.2f}×** | "
                     f"{x['output_throughput_ratio']:.2f}× | {x['median_ttft_ratio']:.2f}× | {share} | "
                     f"{_row_commit(r, data)} |")
    return "\n".join(lines) + "\n"


def _us(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.1f}"


def profile_e2e_table(data: dict) -> str:
    """One column per sparse run (``launch/profile_e2e.py --combine``): per sparse layer its bytes, their floor at
    the copy peak, the operator benchmark and the in-server time split per kernel; per step the server's time and
    its idle time against the dense server."""
    rows = data["accounting"]
    first = rows[0]
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items())
    dense_layers = first["layers"] - first["sparse_layers"]
    scaled = ("; where the dense server was not traced at the point, its nearest point's time scaled by the ratio "
              "of KV bytes" if any(r["dense_layer"]["scale"] != 1 for r in rows) else "")
    op = data.get("operator")
    operator = (f" Operator benchmark: `bench_decode`, commit {_commit(op['commit'])}, {op['l2']} L2, the faster of "
                "eager and CUDA graph." if op else "")
    lines = [f"{data['gpu']}, commit {_commit(data['commit'])}, {versions}. `{first['method']}` preset: "
             f"{first['sparse_layers']} sparse layers of {first['layers']}, budget {first['token_budget']} tokens "
             f"(pages of {first['page_size']}). Floor: the layer's bytes at the copy peak "
             f"({data['copy_peak_gbps'] / 1000:.2f} TB/s). In server: each sgl-sparse kernel's time per step over the "
             f"sparse layers, and the sparse layers' share of FlashInfer's attention and merge (their time per step "
             f"minus {dense_layers} dense layers', a dense layer's from the dense server's trace{scaled}).{operator}",
             "",
             "| per sparse layer | " + " | ".join(f"{r['method']} {r['batch']} × {label(r['context'])}"
                                                  for r in rows) + " |",
             "|---|" + "---|" * len(rows)]

    def line(title: str, cell) -> None:
        lines.append(f"| {title} | " + " | ".join(cell(r) for r in rows) + " |")

    def dense_source(r: dict) -> str:
        d = r["dense_layer"]
        b, _, c = d["point"].partition("x")
        scaled = "" if d["scale"] == 1 else f" × {d['scale']:g}, KV bytes"
        return f"{d['attention_us']:.1f} + {d['merge_us']:.1f} (dense {b} × {c}{scaled})"

    line("bytes to read (MB): page bounds + selected K/V",
         lambda r: f"{r['bytes']['page_bounds'] / 1e6:.1f} + {r['bytes']['selected_kv'] / 1e6:.1f}")
    line("floor at the copy peak (µs)", lambda r: f"{r['floor_us']:.1f}")
    line("operator benchmark (µs)", lambda r: _us(r["operator_us"]))
    line("**in server (µs)**", lambda r: f"**{r['in_server_us']:.1f}**")
    kernels = list(dict.fromkeys(k for r in rows for k in r["in_server_split_us"]))
    titles = {"flashinfer_attention": "FlashInfer attention, sparse layers' share",
              "flashinfer_merge": "FlashInfer merge, sparse layers' share"}
    for k in kernels:
        line(titles.get(k, f"`{k}`"), lambda r: f"{r['in_server_split_us'][k]:.1f}" if k in r["in_server_split_us"]
             else "—")                                                   # a kernel that run did not launch
    line("a dense layer: FlashInfer attention + merge (µs)", dense_source)
    line("operator benchmark, dense layer (µs)", lambda r: _us(r["operator_dense_us"]))
    line("**per step**", lambda r: "")
    line("server ms per step: sparse / dense",
         lambda r: f"{r['ms_per_step']:.2f} / " + ("not measured" if r["dense_ms_per_step"] is None
                                                    else f"{r['dense_ms_per_step']:.2f}"))
    line("idle µs per step (no kernel running): sparse / dense",
         lambda r: f"{r['idle_us']:.1f} / " + ("not measured" if r["dense_idle_us"] is None
                                               else f"{r['dense_idle_us']:.1f} ({r['idle_vs_dense_us']:+.1f})"))
    return "\n".join(lines) + "\n"


def attention_rows_table(data: dict) -> str:
    """``launch/bench_attention_rows.py``: FlashInfer over the same selected pages per variant and split."""
    lines = [f"{data['gpu']}, commit {_commit(data.get('commit'))}, {data.get('l2', '')} L2, CUDA-graph replays; "
             "rel diff: largest difference from the first variant's whole rows over its largest output element.", "",
             "| batch × context | variant | rows per (request, KV head) | rows | µs | GB/s | rel diff |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("us") is None:                                        # a variant FlashInfer refused
            lines.append(f"| {r['batch']} × {label(r['context'])} | {r['variant']} | {r['splits']} | {r['rows']} | "
                         f"{r.get('error', 'failed')} | | |")
            continue
        lines.append(f"| {r['batch']} × {label(r['context'])} | {r['variant']} | {r['splits']} | {r['rows']} | "
                     f"{r['us']:.1f} | {r['gbps']:.0f} | {r['rel_max_diff']:.4f}"
                     f"{'' if r.get('ok', True) else ' (differs)'} |")
    return "\n".join(lines) + "\n"


RENDERERS = {"bench_decode": bench_decode_table, "bench_attention_rows": attention_rows_table,
             "bench_e2e": bench_e2e_table, "bench_serving": bench_serving_table, "accuracy": accuracy_table,
             "soak": soak_table, "profile_e2e": profile_e2e_table}
STYLES = {("bench_serving", "compact"): bench_serving_compact, ("bench_decode", "reuse"): reuse_table,
          ("accuracy", "goals"): accuracy_goals_table}


def render(name: str, style: str | None = None) -> str:
    kind = next((k for k in RENDERERS if name.startswith(k)), None)
    if kind is None:
        raise SystemExit(f"no table kind for {name!r}: names start with one of {', '.join(RENDERERS)}")
    renderer = RENDERERS[kind] if style is None else STYLES.get((kind, style))
    if renderer is None:
        styles = [s for k, s in STYLES if k == kind]
        raise SystemExit(f"no {style!r} style for {kind} tables: choose from {', '.join(styles) or 'none'}")
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the benchmark or fix the table marker's name")
    return renderer(json.loads(path.read_text()))


def update(text: str) -> str:
    return MARKER.sub(lambda m: m.group("open") + render(m.group("name"), m.group("style")) + m.group("close"), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report marked tables that differ from the result files")
    args = ap.parse_args()
    stale = []
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text()
        new = update(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("tables differ from launch/results: " + ", ".join(map(str, stale)) +
              " (python launch/results_tables.py)", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "updated: ") + (", ".join(map(str, stale)) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
