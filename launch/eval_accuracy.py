#!/usr/bin/env python3
"""Accuracy vs attended fraction: generated RULER-style tasks, every method and budget against dense.

    python launch/eval_accuracy.py --model smollm2 --tasks passkey niah_single_1 --lengths 1024 2048
    python launch/eval_accuracy.py --model qwen05b --lengths 4096 8192 16384 32768 --budgets 512 1024 2048
    python launch/eval_accuracy.py --path sglang --model smollm2 --lengths 2048 4096 7680 --log-dir out/logs
    python launch/eval_accuracy.py --path sglang --model qwen05b --methods vattention --budgets 384 \
        --set sample_capacity=256 epsilon=0.3 --no-dense --out out/vattn_50.json     # dense from another run
    python launch/eval_accuracy.py --combine out/dense_quest.json out/vattn_50.json --out out/all.json

Paths (see sgl_sparse/accuracy.py): ``cpu`` (transformers + the torch reference selection, anywhere) and
``sglang`` (GPU host: one real SGLang server per config, one at a time, driven by SGLang's frontend
``run_batch``; the model from ``--model-dir``, else ``$GPU_HOST_MODELS/<model>``, else the converted download).
Prints a table (method x budget x length -> score, dense score, attended fraction) titled with the path that
produced it, writes JSON (also saved as it goes and when interrupted: `"complete": false`) and a PNG
(score vs attended fraction per method, dense as a line). ``--set field=value`` overrides fields of every sparse
config of the run; ``--combine`` merges the results of several runs of one model and path (e.g. one per GPU of a
host, or per ``--set``) into one table, JSON and PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgl_sparse import accuracy, tasks  # noqa: E402
from sgl_sparse.models import MODELS  # noqa: E402


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        dense = [r for r in rows if r["method"] == "dense" and r["length"] == L]
        if dense:
            ax.axhline(dense[0]["score"], color="black", lw=1, label="dense")
        for m, marker in zip(("quest", "twilight", "vattention"), "osd"):
            pts = sorted((r["attended_fraction"], r["score"]) for r in rows if r["method"] == m and r["length"] == L)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=m)
        ax.set_xscale("log")
        ax.set_title(f"{L} tokens")
        ax.set_xlabel("mean attended fraction")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    ap.add_argument("--methods", nargs="+", default=["quest", "twilight", "vattention"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="override these config fields in every sparse config (e.g. sample_capacity=256)")
    ap.add_argument("--measure-error", action="store_true",
                    help="cpu path: compare every sparse decode attention with dense on the same q/k/v (mean "
                         "relative error per method and task; always on for vAttention)")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense baseline (when another run of the same session provides it; --combine)")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge these result files instead of running")
    ap.add_argument("--only-tasks", nargs="+", choices=tasks.TASKS,
                    help="--combine: keep these tasks' results only (e.g. to leave out a task a run scored wrongly)")
    ap.add_argument("--out", default="out/eval_accuracy.json")
    args = ap.parse_args()

    if args.combine:
        return combine(args.combine, args.out, args.only_tasks)
    overrides = parse_overrides(args.set)
    configs = accuracy.configs_for(args.methods, args.budgets, **overrides)
    if args.no_dense:
        configs = configs[1:]
    if args.path == "sglang":
        args.model_dir = str(accuracy.model_dir_for(args.model, args.model_dir))
        described = f"sglang path: {accuracy.server_path_description()}"
        # a SIGTERM (e.g. a time limit) kills the server first, then unwinds: no server is left behind
        from sgl_sparse.serving import stop_servers_on_sigterm
        stop_servers_on_sigterm()
    else:
        import torch
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        described = "cpu path: transformers + torch reference selection"
    t0 = last_save = time.time()
    results = []

    def save(rows=None):
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), path=described, complete=rows is not None, rows=rows or [],
                           results=[dataclasses.asdict(r) for r in results]), f, indent=1)

    def progress(r):
        nonlocal last_save
        results.append(r)
        if time.time() - last_save > 5:
            save()
            last_save = time.time()
        print(f"[{time.time() - t0:6.0f}s] {r.method:10s} budget={r.budget:<6d} {r.task:16s} L={r.length:<6d} "
              f"depth={r.depth:.2f} score={r.score:.2f} attended={r.attended_fraction:.3f} {r.output[:40]!r}",
              file=sys.stderr, flush=True)

    try:
        if args.path == "sglang":
            accuracy.evaluate_server(args.model_dir, args.model, args.tasks, args.lengths, args.depths, configs,
                                     args.seed, progress, log_dir=args.log_dir)
        else:
            accuracy.evaluate(args.model, args.tasks, args.lengths, args.depths, configs, args.seed, progress,
                              measure_error=args.measure_error)
    except BaseException:
        save()                                   # keep what finished (marked complete: false)
        raise
    report(results, described, args.model, f"tasks {', '.join(args.tasks)}, depths {args.depths}", args.out,
           dict(args=vars(args), path=described, complete=True))
    return 0


def parse_overrides(items: list[str]) -> dict:
    """``["epsilon=0.3", "sample_capacity=256"]`` -> ``{"epsilon": 0.3, "sample_capacity": 256}``."""
    import yaml

    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        out[field.strip()] = yaml.safe_load(value)
    return out


def combine(paths: list[str], out: str, only_tasks: list[str] | None = None) -> int:
    """Merge the results of several runs (same model and path) into one report (``only_tasks``: keep those)."""
    runs = [json.load(open(p)) for p in paths]
    described = {r["path"] for r in runs}
    # a combined file has no args of its own: it lists the runs it merged, which this report lists in its place
    plain = [inner for r in runs for inner in
             ([dict(args=r["args"], complete=r["complete"])] if "args" in r else r["runs"])]
    models = {r["args"]["model"] for r in plain}
    if len(described) != 1 or len(models) != 1:
        raise SystemExit(f"--combine needs runs of one model on one path, got models {sorted(models)}, "
                         f"paths {sorted(described)}")
    results = [accuracy.Result(**r) for run in runs for r in run["results"]
               if only_tasks is None or r["task"] in only_tasks]
    tasks_ = sorted({r.task for r in results})
    report(results, described.pop(), models.pop(), f"tasks {', '.join(tasks_)}; runs {', '.join(paths)}", out,
           dict(combined=paths, only_tasks=only_tasks, runs=plain,
                path=runs[0]["path"], complete=all(r["complete"] for r in runs)))
    return 0


def report(results, described: str, model: str, what: str, out: str, header: dict) -> None:
    """Print the table, write the JSON (``header`` + rows + results) and the PNG."""
    rows = accuracy.summarize(results)
    print(f"\nAccuracy ({described}), model {model}, {what}")
    print(f"{'method':10s} {'budget':>6s} {'length':>6s} {'score':>6s} {'dense':>6s} {'rel.':>6s} {'attended':>8s} "
          f"{'P(err>eps)':>10s} {'mean err':>8s}")
    for r in rows:
        rel = f"{r['relative']:.2f}" if r["relative"] is not None else "  -"
        viol = f"{r['violation_rate']:.4f}" if r.get("violation_rate") is not None else "-"
        err = f"{r['mean_error']:.4f}" if r.get("mean_error") is not None else "-"
        dense = f"{r['dense_score']:6.2f}" if r["dense_score"] is not None else "     -"
        print(f"{r['method']:10s} {r['budget']:6d} {r['length']:6d} {r['score']:6.2f} {dense} "
              f"{rel:>6s} {r['attended_fraction']:8.4f} {viol:>10s} {err:>8s}")
    by_task = accuracy.summarize_by_task(results)
    errors_by_task = accuracy.summarize_by_task(results, "mean_error")
    task_names = sorted({t for scores in by_task.values() for t in scores})
    for title, table, fmt in (("Score per task", by_task, "15.2f"),
                              ("Mean relative error of the attention outputs per task", errors_by_task, "15.4f")):
        if len(task_names) > 1 and table:
            print(f"\n{title}")
            print(f"{'method':10s} {'budget':>6s} {'length':>6s} " + " ".join(f"{t[-15:]:>15s}" for t in task_names))
            for (method, budget, length), values in table.items():
                print(f"{method:10s} {budget:6d} {length:6d} " + " ".join(
                    format(values[t], fmt) if t in values else f"{'-':>15s}" for t in task_names))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(header, rows=rows, by_task=[dict(method=m, budget=b, length=L, scores=s,
                                                        mean_errors=errors_by_task.get((m, b, L)))
                                                   for (m, b, L), s in by_task.items()],
                       results=[dataclasses.asdict(r) for r in results]), f, indent=1)
    png = os.path.splitext(out)[0] + ".png"
    try:
        plot(rows, png, f"{model}, {described}")
    except ImportError:
        png = "(matplotlib missing: no plot)"
    print(f"wrote {out} {png}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
