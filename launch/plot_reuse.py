#!/usr/bin/env python3
"""Speedup of selection reuse against its interval R, from one ``launch/bench_decode.py`` run.

bench_decode times a config with ``reselect_every`` > 1 in both of its states: a selecting step (``us_select``,
the drift test included) and a reusing one (``us_reuse``). At interval R a request selects on one step in R, so a
step costs ``(select + (R - 1) * reuse) / R`` on average and one measurement gives the whole curve:
``speedup(R) = dense / that``, dense being the faster of the same run's eager and CUDA-graph dense steps.

The reusing state is measured one token after the selection. A reused selection also attends the pages written
since it was made: none more while R does not exceed the page size (16), one page more per 16 tokens beyond, so
past R = 16 the curve is slightly optimistic. The plain ``quest`` row of the same run (selecting every step,
without the drift test) is drawn as a point at R = 1.

    python launch/plot_reuse.py launch/results/bench_decode_h200.json --config quest-fast \\
        --out launch/results/bench_decode_reuse_h200.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench_e2e import label  # noqa: E402  (torch-free: a context as "32K")

INTERVALS = (1, 2, 4, 8, 16)


def short_commit(c: str | None) -> str:
    """A commit as its first 7 characters, "?" when unknown."""
    return c[:7] if c else "?"


def best_us(r: dict) -> float:
    """The faster of a bench_decode row's eager and CUDA-graph times (a NaN graph time: eager)."""
    return min(t for t in (r["us_eager"], r["us_graph"]) if not math.isnan(t))


def reuse_curves(data: dict, config: str = "quest-fast", intervals=INTERVALS) -> list[dict]:
    """Per (batch, context, budget) with a reusing row of ``config`` and a dense row: the measured select and reuse
    times and ``speedup`` ``{R: dense / ((select + (R - 1) reuse) / R)}``, plus ``quest`` (the plain Quest row's
    speedup at that point, None without one)."""
    rows = data["rows"]
    dense = {(r["batch"], r["context"]): best_us(r) for r in rows if r["method"] == "dense"}
    quest = {(r["batch"], r["context"], r["budget"]): r["speedup"] for r in rows if r.get("config") == "quest"}
    out = []
    for r in rows:
        if r.get("config") != config or "us_select" not in r or (r["batch"], r["context"]) not in dense:
            continue
        d = dense[(r["batch"], r["context"])]
        sel, reuse = r["us_select"], r["us_reuse"]
        out.append(dict(batch=r["batch"], context=r["context"], budget=r["budget"], us_select=sel, us_reuse=reuse,
                        dense_us=d, speedup={R: d * R / (sel + (R - 1) * reuse) for R in intervals},
                        limit=d / reuse, quest=quest.get((r["batch"], r["context"], r["budget"]))))
    return sorted(out, key=lambda c: (c["context"], c["batch"], c["budget"]))


def reuse_table(data: dict, config: str = "quest-fast") -> str:
    """Markdown: per point, the step times and the speedup at each interval (the README's and docs' table)."""
    curves = reuse_curves(data, config)
    head = " | ".join(f"R = {R}" for R in INTERVALS)
    lines = [f"{data['gpu']}, commit {short_commit(data.get('commit'))}, `{config}`: speedup over dense at reuse "
             "interval R from its measured selecting and reusing steps.", "",
             f"| batch × context | budget | select µs | reuse µs | `quest` | {head} | R → ∞ |",
             "|---|---|---|---|---|" + "---|" * len(INTERVALS) + "---|"]
    for c in curves:
        quest = "—" if c["quest"] is None else f"{c['quest']:.2f}"
        cells = " | ".join(f"{c['speedup'][R]:.2f}" for R in INTERVALS)
        lines.append(f"| {c['batch']} × {label(c['context'])} | {c['budget']} | {c['us_select']:.1f} | "
                     f"{c['us_reuse']:.1f} | {quest} | {cells} | {c['limit']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str, config: str = "quest-fast") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = reuse_curves(data, config, intervals=tuple(range(1, 33)))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c, marker in zip(curves, "osd^vx<>p*"):
        Rs = sorted(c["speedup"])
        line, = ax.plot(Rs, [c["speedup"][R] for R in Rs], marker=marker, markevery=[0, 1, 3, 7, 15, 31], ms=4,
                        label=f"B={c['batch']} × {label(c['context'])}")
        if c["quest"] is not None:
            ax.plot([1], [c["quest"]], marker="x", ms=8, color=line.get_color(), ls="none")
    ax.axvline(16, color="gray", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("reuse interval R (decode steps per selection)")
    ax.set_ylabel("speedup over dense FlashInfer")
    ax.set_title(f"{config}, budget {curves[0]['budget'] if curves else '?'}: x = plain quest at R = 1",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"selection reuse: one layer's decode step — {data['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="a bench_decode JSON with a reusing config (reselect_every > 1)")
    ap.add_argument("--config", default="quest-fast", help="the reusing config's name in the file")
    ap.add_argument("--out", default=None, help="PNG path (default: <result>_reuse.png)")
    args = ap.parse_args()
    data = json.loads(Path(args.result).read_text())
    if not reuse_curves(data, args.config):
        print(f"{args.result} has no rows of {args.config!r} with select and reuse times (reselect_every > 1) "
              "beside a dense row: run bench_decode.py --configs quest quest-fast", file=sys.stderr)
        return 2
    print(reuse_table(data, args.config), end="")
    out = args.out or str(Path(args.result).with_suffix("")) + "_reuse.png"
    plot(data, out, args.config)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
