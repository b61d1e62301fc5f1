#!/usr/bin/env python3
"""Accuracy vs attended fraction: generated RULER-style tasks, every method and budget against dense.

    python launch/eval_accuracy.py --model smollm2 --tasks passkey niah_single_1 --lengths 1024 2048
    python launch/eval_accuracy.py --model qwen05b --lengths 4096 8192 16384 32768 --budgets 512 1024 2048
    python launch/eval_accuracy.py --path sglang --model smollm2 --lengths 2048 4096 7680 --log-dir out/logs
    python launch/eval_accuracy.py --path sglang --model qwen05b --methods vattention --budgets 384 \
        --set sample_capacity=256 epsilon=0.3 --no-dense --out out/vattn_50.json     # dense from another run
    python launch/eval_accuracy.py --combine out/dense_quest.json out/vattn_50.json --out out/all.json
    python launch/eval_accuracy.py --path sglang --model qwen05b --tasks passkey cwe --lengths 4096 32000 \
        --depths 0.1 0.3 0.5 0.7 0.9 --seeds 2 --methods quest --budgets 512 1024 2048 4096   # 10 per task x length

Paths (see sgl_sparse/accuracy.py): ``cpu`` (transformers + the torch reference selection, anywhere) and
``sglang`` (GPU host: one real SGLang server per config, one at a time, driven by SGLang's frontend
``run_batch``; the model from ``--model-dir``, else ``$GPU_HOST_MODELS/<model>``, else the converted download).
Prints a table (method x budget x length -> score, dense score, attended fraction) titled with the path that
produced it, writes JSON (also saved as it goes and when interrupted: `"complete": false`) and two PNGs beside
it: ``<out>.png`` (score vs attended fraction per length) and ``<out>_curve.png`` (the accuracy/attended curve at
``--curve-length``, default the longest: score relative to dense per config, 95 % intervals, dense as a line).
``--set field=value`` overrides fields of every sparse config of the run (``field=budget``: each config's token
budget, e.g. ``sample_capacity=budget``); ``--combine`` merges the results of several runs of one model and path
(e.g. one per GPU of a host, or per ``--set``) into one table, JSON and PNG.

Instances: every task x length x depth x seed (``--seeds N``: seeds ``--seed`` .. ``--seed + N - 1``), the same
for every config; give depths x seeds >= 10 for intervals that mean something. JSON rows (sgl_sparse.accuracy
.summarize): per config and budget, ``scope`` ``length`` (all tasks at one length), ``overall`` (all tasks and
lengths), ``task`` (one task, all lengths), ``task_length``; each with ``score``/``score_ci``, ``dense_score``,
``relative``/``relative_ci`` (paired bootstrap), ``attended_fraction`` and ``n``. The header holds ``gpu``,
``versions``, ``commit`` (``SGL_SPARSE_COMMIT`` overrides it) and, on the sglang path, per-config ``timings``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import git_commit, gpu_name, versions  # noqa: E402
from sgl_sparse import accuracy, tasks  # noqa: E402
from sgl_sparse.config import SparseConfigError, parse_overrides  # noqa: E402
from sgl_sparse.models import MODELS  # noqa: E402

MARKERS = "osd^vP*Xh"


def _errorbars(points, value, ci):
    """matplotlib yerr (2 x n) from [low, high] intervals around ``value``."""
    lo = [max(0.0, p[value] - p[ci][0]) if p.get(ci) else 0.0 for p in points]
    hi = [max(0.0, p[ci][1] - p[value]) if p.get(ci) else 0.0 for p in points]
    return [lo, hi]


def _fraction_axis(ax, fractions) -> None:
    """Log x axis with ticks at 1/2^k (labelled "1/64") over the range of ``fractions``."""
    from matplotlib.ticker import NullFormatter

    finite = [f for f in fractions if f is not None and f == f and f > 0]
    if not finite:
        ax.set_xscale("log")
        return
    lo, hi = min(finite), max(finite)
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xscale("log")
    ticks = [2.0 ** -k for k in range(0, 16) if lo / 1.6 <= 2.0 ** -k <= hi * 1.6] or [lo]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["1" if t == 1 else f"1/{round(1 / t)}" for t in ticks], fontsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(rows, path, title):
    """Score vs attended fraction, one panel per length, one line per config (95 % intervals), dense as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows if r.get("scope", "length") == "length"})
    if not lengths:
        return
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        curve = accuracy.curve_points(rows, L)
        dense = curve["dense"]
        if dense:
            ax.axhline(dense["score"], color="black", lw=1, label="dense")
            if dense.get("score_ci"):
                ax.axhspan(*dense["score_ci"], color="black", alpha=0.08, lw=0)
        for (label, pts), marker in zip(sorted(curve["lines"].items()), MARKERS * 4):
            ax.errorbar([p["attended_fraction"] for p in pts], [p["score"] for p in pts],
                        yerr=_errorbars(pts, "score", "score_ci"), marker=marker, capsize=2, label=label)
        _fraction_axis(ax, [p["attended_fraction"] for pts in curve["lines"].values() for p in pts])
        ax.set_title(f"{L} tokens")
        ax.set_xlabel("mean attended fraction")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve: dict, path, title):
    """The accuracy/attended curve at one length (:func:`sgl_sparse.accuracy.curve_points`): left, score relative
    to dense (dense = 1); right, the score itself with dense's interval; 95 % bootstrap intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sorted(curve["lines"].items())
    longest = max((len(label) for label, _ in lines), default=0)      # one legend below both panels
    ncol = 1 if len(lines) <= 4 else 2 if len(lines) <= 10 or longest > 40 else 3
    legend_rows = -(-(len(lines) + 1) // ncol)
    legend_in = 0.17 * legend_rows
    fig, (rel_ax, abs_ax) = plt.subplots(1, 2, figsize=(11, 4.2 + legend_in))
    colors = plt.get_cmap("tab20" if len(lines) > 10 else "tab10").colors
    dense = curve["dense"]
    rel_ax.axhline(1.0, color="black", lw=1, label="dense")
    if dense:
        abs_ax.axhline(dense["score"], color="black", lw=1, label=f"dense {dense['score']:.3f}")
        if dense.get("score_ci"):
            abs_ax.axhspan(*dense["score_ci"], color="black", alpha=0.08, lw=0)
    for i, (label, pts) in enumerate(lines):
        style = dict(marker=MARKERS[i % len(MARKERS)], color=colors[i % len(colors)], capsize=3, label=label)
        rel = [p for p in pts if p.get("relative") is not None]
        if rel:
            rel_ax.errorbar([p["attended_fraction"] for p in rel], [p["relative"] for p in rel],
                            yerr=_errorbars(rel, "relative", "relative_ci"), **style)
        abs_ax.errorbar([p["attended_fraction"] for p in pts], [p["score"] for p in pts],
                        yerr=_errorbars(pts, "score", "score_ci"), **style)
        for p in pts:
            abs_ax.annotate(str(p["budget"]), (p["attended_fraction"], p["score"]), fontsize=6,
                            xytext=(3, -9), textcoords="offset points")
    counts = sorted({p["n"] for pts in curve["lines"].values() for p in pts if p.get("n")})  # instances per point
    n = f", n = {'/'.join(map(str, counts))} per point" if counts else ""
    fractions = [p["attended_fraction"] for pts in curve["lines"].values() for p in pts]
    for ax, ylabel in ((rel_ax, "score relative to dense"), (abs_ax, "score (all tasks)")):
        _fraction_axis(ax, fractions)
        ax.set_xlabel("mean attended fraction")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    rel_ax.set_title(f"{curve['length']} tokens: relative to dense (95 % paired bootstrap){n}", fontsize=9)
    abs_ax.set_title(f"{curve['length']} tokens: score (95 % bootstrap; labels = token budget)", fontsize=9)
    fig.suptitle(title)
    handles, labels = abs_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (4.2 + legend_in), 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--path", choices=["cpu", "sglang"], default="cpu")
    ap.add_argument("--model-dir", help="sglang path: checkpoint directory (default: $GPU_HOST_MODELS/<model> if "
                    "set, else the converted download)")
    ap.add_argument("--log-dir", default="out/sglang_logs", help="sglang path: one server log per config here")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "niah_single_1", "niah_single_2"], choices=tasks.TASKS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--seeds", type=int, default=1,
                    help="instances per (task, length, depth), seeds --seed .. --seed + N - 1: depths x seeds "
                         "instances per (task, length)")
    ap.add_argument("--methods", nargs="*", default=["quest", "twilight", "vattention"],
                    help="presets (configs/*.yaml) or YAML files, with inline overrides (quest:page_size=8), each run "
                         "at every --budgets; one that sets token_budget inline runs at that budget alone (none "
                         "given: dense only)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seed", type=int, default=0, help="the first instance seed")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="override these config fields in every sparse config (e.g. sample_capacity=256; "
                         "sample_capacity=budget: each config's token budget)")
    ap.add_argument("--measure-error", action="store_true",
                    help="cpu path: compare every sparse decode attention with dense on the same q/k/v (mean "
                         "relative error per method and task; always on for vAttention)")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="sglang path: N servers at a time side by side on the GPU (configs in groups of N; start-up "
                         "paid once per group; request latencies then include the other servers' load)")
    ap.add_argument("--server-page-size", type=int, metavar="N",
                    help="sglang path: SGLang's --page-size for every server, a multiple of each config's page "
                         "(default: each config's own), e.g. 16 with quest:page_size=8: 8-token selection inside "
                         "SGLang's 16-token pages")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense baseline (when another run of the same session provides it; --combine)")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge these result files instead of running")
    ap.add_argument("--only-tasks", nargs="+", choices=tasks.TASKS,
                    help="--combine: keep these tasks' results only (e.g. to leave out a task a run scored wrongly)")
    ap.add_argument("--only-seeds", nargs="+", type=int, metavar="SEED",
                    help="--combine: keep these instance seeds only (e.g. to score the instances one run added "
                         "apart from the ones another run had)")
    ap.add_argument("--curve-length", type=int,
                    help="length of the accuracy/attended curve (<out>_curve.png; default: the longest)")
    ap.add_argument("--resamples", type=int, default=accuracy.RESAMPLES,
                    help="bootstrap replicates per 95%% interval (seeded: the same file gives the same intervals)")
    ap.add_argument("--out", default="out/eval_accuracy.json")
    args = ap.parse_args()

    if args.combine:
        return combine(args.combine, args.out, args.only_tasks, args.curve_length, args.resamples, args.only_seeds)
    try:
        overrides = parse_overrides(args.set, "--set")
    except SparseConfigError as e:
        ap.error(str(e))
    configs = accuracy.named_configs(args.methods, args.budgets, **overrides)
    if args.no_dense:
        configs = configs[1:]
    if not configs:
        raise SystemExit("nothing to run: no --methods and --no-dense")
    if args.parallel < 1:
        ap.error(f"--parallel must be >= 1, got {args.parallel}")
    if args.server_page_size is not None:
        if args.path != "sglang":
            ap.error("--server-page-size applies to the sglang path only (the cpu path has no SGLang pages)")
        try:
            for label, cfg in configs:
                accuracy.check_server_page_size(args.server_page_size, cfg, label, "--server-page-size")
        except ValueError as e:
            ap.error(str(e))
    specs = accuracy.instance_specs(args.tasks, args.lengths, args.depths, args.seeds, args.seed)
    per = len(args.depths) * args.seeds
    print(f"{len(configs)} configs x {len(specs)} instances ({len(args.tasks)} tasks x {len(args.lengths)} lengths "
          f"x {len(args.depths)} depths x {args.seeds} seeds) = {len(configs) * len(specs)} generate calls",
          file=sys.stderr, flush=True)
    if per < 10:
        print(f"note: {per} instances per (task, length): intervals will be wide (give depths x seeds >= 10)",
              file=sys.stderr)
    if args.path == "sglang":
        args.model_dir = str(accuracy.model_dir_for(args.model, args.model_dir))
        described = f"sglang path: {accuracy.server_path_description()}"
        gpu = gpu_name()
        # a SIGTERM (e.g. a time limit) kills the server first, then unwinds: no server is left behind
        from sgl_sparse.serving import stop_servers_on_sigterm
        stop_servers_on_sigterm()
    else:
        import torch
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        described = CPU_PATH
        gpu = "none (cpu path)"
    t0 = last_save = time.time()
    results, timings = [], []
    meta = dict(gpu=gpu, versions=versions(), commit=git_commit(), timings=timings,
                instances_per_task_length=per)

    def save(rows=None):
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), path=described, complete=rows is not None, **meta,
                           elapsed_s=time.time() - t0, rows=rows or [],
                           results=[dataclasses.asdict(r) for r in results]), f, indent=1)

    from sgl_sparse.serving import Progress
    done = Progress(len(configs) * len(specs))

    def progress(r):
        nonlocal last_save
        results.append(r)
        if time.time() - last_save > 5:
            save()
            last_save = time.time()
        print(f"[{time.time() - t0:6.0f}s {done.step()}] {r.label:10s} budget={r.budget:<6d} {r.task:16s} "
              f"L={r.length:<6d} depth={r.depth:.2f} seed={r.seed} score={r.score:.2f} "
              f"attended={r.attended_fraction:.3f} {r.output[:40]!r}", file=sys.stderr, flush=True)

    try:
        if args.path == "sglang":
            accuracy.evaluate_server(args.model_dir, args.model, args.tasks, args.lengths, args.depths, configs,
                                     args.seed, progress, log_dir=args.log_dir, seeds=args.seeds, timings=timings,
                                     parallel=args.parallel, page_size=args.server_page_size)
        else:
            accuracy.evaluate(args.model, args.tasks, args.lengths, args.depths, configs, args.seed, progress,
                              measure_error=args.measure_error, seeds=args.seeds)
    except BaseException:
        save()                                   # keep what finished (marked complete: false)
        raise
    elapsed = time.time() - t0
    print(f"elapsed {elapsed:.0f} s for {len(results)} generate calls", file=sys.stderr)
    report(results, described, args.model, f"tasks {', '.join(args.tasks)}, depths {args.depths}, "
           f"{args.seeds} seed(s)", args.out, dict(args=vars(args), path=described, complete=True, **meta,
                                                   elapsed_s=elapsed),
           curve_length=args.curve_length, resamples=args.resamples)
    return 0


def _merged(values):
    """One value where the runs agree, else the distinct values in order; None where no run has one."""
    distinct = []
    for v in values:
        if v is not None and v not in distinct:
            distinct.append(v)
    return None if not distinct else distinct[0] if len(distinct) == 1 else distinct


CPU_PATH = "cpu path: transformers + torch reference selection"
RUN_META = ("gpu", "versions", "commit", "elapsed_s", "timings", "instances_per_task_length")


def combine(paths: list[str], out: str, only_tasks: list[str] | None = None, curve_length: int | None = None,
            resamples: int = accuracy.RESAMPLES, only_seeds: list[int] | None = None) -> int:
    """Merge the results of several runs (same model and path) into one report (``only_tasks``, ``only_seeds``:
    keep those tasks' and instance seeds' results)."""
    runs = [json.load(open(p)) for p in paths]
    for r in runs:                    # the first files had neither (written once, at the end, by the cpu path)
        r.setdefault("path", CPU_PATH if {x["path"] for x in r["results"]} == {"cpu"} else "unknown")
        r.setdefault("complete", True)
    described = {r["path"] for r in runs}
    # a combined file has no args of its own: it lists the runs it merged, which this report lists in its place
    plain = [inner for r in runs for inner in
             ([dict(args=r["args"], complete=r["complete"], **{k: r[k] for k in RUN_META if k in r})]
              if "args" in r else r["runs"])]
    models = {r["args"]["model"] for r in plain}
    if len(described) != 1 or len(models) != 1:
        raise SystemExit(f"--combine needs runs of one model on one path, got models {sorted(models)}, "
                         f"paths {sorted(described)}")
    results = [accuracy.Result(**r) for run in runs for r in run["results"]
               if (only_tasks is None or r["task"] in only_tasks)
               and (only_seeds is None or r.get("seed", 0) in only_seeds)]
    tasks_ = sorted({r.task for r in results})
    meta = dict(gpu=_merged(r.get("gpu") for r in plain), versions=_merged(r.get("versions") for r in plain),
                commit=_merged(r.get("commit") for r in plain), combined_at_commit=git_commit(),
                timings=[t for r in plain for t in r.get("timings") or []])
    report(results, described.pop(), models.pop(), f"tasks {', '.join(tasks_)}; runs {', '.join(paths)}", out,
           dict(combined=paths, only_tasks=only_tasks, only_seeds=only_seeds, runs=plain, path=runs[0]["path"],
                complete=all(r["complete"] for r in runs), **meta),
           curve_length=curve_length, resamples=resamples)
    return 0


def _ci(ci, fmt=".2f") -> str:
    return f"[{ci[0]:{fmt}},{ci[1]:{fmt}}]" if ci else "-"


def print_rows(rows: list[dict]) -> None:
    """The per-length and overall rows (all tasks) with their 95 % intervals."""
    print(f"{'config':24s} {'budget':>6s} {'length':>6s} {'n':>5s} {'score':>6s} {'95% CI':>13s} {'dense':>6s} "
          f"{'rel.':>6s} {'95% CI':>13s} {'attended':>8s} {'P(err>eps)':>10s} {'mean err':>8s}")
    for r in rows:
        if r.get("task") is not None or r.get("scope") not in ("length", "overall"):
            continue
        rel = f"{r['relative']:.3f}" if r["relative"] is not None else "-"
        viol = f"{r['violation_rate']:.4f}" if r.get("violation_rate") is not None else "-"
        err = f"{r['mean_error']:.4f}" if r.get("mean_error") is not None else "-"
        dense = f"{r['dense_score']:.3f}" if r["dense_score"] is not None else "-"
        length = "all" if r["length"] is None else str(r["length"])
        print(f"{r['config'][-24:]:24s} {r['budget']:6d} {length:>6s} {r['n']:5d} {r['score']:6.3f} "
              f"{_ci(r['score_ci']):>13s} {dense:>6s} {rel:>6s} {_ci(r['relative_ci']):>13s} "
              f"{r['attended_fraction']:8.4f} {viol:>10s} {err:>8s}")


def report(results, described: str, model: str, what: str, out: str, header: dict, curve_length: int | None = None,
           resamples: int = accuracy.RESAMPLES) -> None:
    """Print the table, write the JSON (``header`` + rows + curve + results) and the PNGs."""
    rows = accuracy.summarize(results, resamples=resamples)
    print(f"\nAccuracy ({described}), model {model}, {what}")
    print_rows(rows)
    by_task = accuracy.summarize_by_task(results)
    errors_by_task = accuracy.summarize_by_task(results, "mean_error")
    task_names = sorted({t for scores in by_task.values() for t in scores})
    for title, table, fmt in (("Score per task", by_task, "15.2f"),
                              ("Mean relative error of the attention outputs per task", errors_by_task, "15.4f")):
        if len(task_names) > 1 and table:
            print(f"\n{title}")
            print(f"{'config':24s} {'budget':>6s} {'length':>6s} " + " ".join(f"{t[-15:]:>15s}" for t in task_names))
            for (label, budget, length), values in table.items():
                print(f"{label[-24:]:24s} {budget:6d} {length:6d} " + " ".join(
                    format(values[t], fmt) if t in values else f"{'-':>15s}" for t in task_names))
    curve = accuracy.curve_points(rows, curve_length)
    goals = accuracy.goal_report(rows, length=curve_length)
    print("\nGoals at length", goals[0]["length"] if goals else None)
    for g in goals:
        print("  " + accuracy.describe_goal(g))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(header, resamples=resamples, rows=rows, curve=curve, goals=goals,
                       by_task=[dict(method=m, budget=b, length=L, scores=s, mean_errors=errors_by_task.get((m, b, L)))
                                for (m, b, L), s in by_task.items()],
                       results=[dataclasses.asdict(r) for r in results]), f, indent=1)
    stem = os.path.splitext(out)[0]
    pngs = [stem + ".png", stem + "_curve.png"]
    try:
        plot(rows, pngs[0], f"{model}, {described}")
        if curve["length"] is not None:
            plot_curve(curve, pngs[1], f"{model}, {described}")
    except ImportError:
        pngs = ["(matplotlib missing: no plot)"]
    print(f"wrote {out} {' '.join(pngs)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
