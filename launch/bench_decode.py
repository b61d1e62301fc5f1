#!/usr/bin/env python3
"""Benchmark the sparse decode step against dense FlashInfer (one layer, Llama-3.1-8B attention shape).

Times the *whole* per-layer decode step of each method as SGLang's backend runs it — the new token's side-table
work, Quest page scores, top-k, Twilight's int4 scores and top-p, vAttention's sampling and second attention,
index compaction and FlashInfer's attention — eagerly and as a CUDA-graph replay, with dense FlashInfer (GQA,
page size 1, as SGLang runs it) measured in the same process. Reports speedup over dense, the bytes the step
must move, the fraction of the measured HBM peak reached, and each method's relative L2 error vs exact attention
on the same data (synthetic heavy-tailed attention: a Pareto logit boost along the query, values with a shared
mean).

    python launch/bench_decode.py                      # 8K/32K/128K x batch 1/8/32 (+16 at 128K) x budget 1024/2048/4096
    python launch/bench_decode.py --quick              # a small smoke run
    python launch/bench_decode.py --cold-l2            # empty the L2 before every timed call

By default a case's step is timed back to back, so what the previous call left in the L2 (50 MB on an H100/H200:
part of the page bounds and of the selected K/V) is reused. In a model the other layers' weights and KV pass
through the L2 between two calls of one layer; ``--cold-l2`` overwrites a 256 MiB buffer before every timed call
(outside the timed region) to measure that case.

A config with ``reselect_every`` R > 1 (e.g. ``--configs quest-fast``) is timed in both of its states, a
selecting step and a reusing one, and reported at its steady-state mean (one selecting step in R):
``us_select``, ``us_reuse`` and ``us_eager``/``us_graph`` = (select + (R - 1) reuse) / R.

The side-table work is split as the server splits it (``sgl_sparse.synthetic.ServerStepUpdates``): Twilight's
int4 key of the new token inside each layer's step; every layer's page bounds in one launch per model step after
the last layer, of which each of the model's ``LAYERS`` layers carries an equal share (``us_bounds_update``: the
slower of that launch, timed over aliases of the benchmark's one layer, and the bytes it moves in a server at
the copy peak, divided by ``LAYERS``; eager and graph each with their own launch time).

Writes a table to stdout, JSON (``--out``) and a PNG plot (speedup vs context per config).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_e2e import config_spec  # noqa: E402  (argparse type: a preset with optional inline overrides)
from sgl_sparse.config import SparseConfig, SparseConfigError, presets  # noqa: E402
from sgl_sparse.decode import SparseDecodeOperator  # noqa: E402
from sgl_sparse.fidelity import dense_attention, relative_l2  # noqa: E402
from sgl_sparse.metadata import SparseKVMetadata  # noqa: E402
from sgl_sparse.synthetic import (ServerStepUpdates, capture_graph, make_pool, plan_reusing_step,  # noqa: E402
                                  shape_attention)

HQ, HK, D, P = 32, 8, 128, 16
LAYERS = 32                      # Llama-3.1-8B: the layers whose page bounds one launch per step refreshes
DTYPE = torch.bfloat16
METHODS = ("quest", "twilight", "vattention")
L2_FLUSH: torch.Tensor | None = None   # --cold-l2: overwritten before every timed call


def measure_peak_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(8):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2] / 1e9


def time_fn(fn, reps: int) -> float:
    """Median µs of ``fn`` (events around each call, after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        if L2_FLUSH is not None:
            L2_FLUSH.zero_()
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
    return sorted(out)[len(out) // 2]


def graphed(fn):
    """``fn`` captured in a CUDA graph: its replay."""
    return capture_graph(fn).replay


def needed_bytes(method: str, B: int, L: int, budget: int, counts: torch.Tensor, op: SparseDecodeOperator,
                 cfg: SparseConfig) -> float:
    """Fewest bytes the step must move: what it reads once, at the sizes it selected."""
    kv_tok = HK * D * 2 * 2 / HK                         # K+V bytes per token per KV head
    if method == "dense":
        return B * L * HK * kv_tok
    pages = math.ceil(L / P)
    if cfg.coarse:                                        # coarse pages, then the pages inside the kept ones
        pages = math.ceil(L / cfg.coarse_page_tokens) + min(pages, cfg.coarse_top_k * cfg.coarse_ratio)
    per_page_head = SparseKVMetadata.bounds_bytes_per_page_head(cfg, D, DTYPE)   # 512 bf16, 264 int8 (D=128)
    meta = B * HK * pages * per_page_head / cfg.reselect_every   # page bounds, read on one step in R
    attended = float(counts.sum())                        # (request, head, token) triples attended
    total = meta + attended * kv_tok
    if method == "twilight":
        total += B * HK * budget * (D // 2 + 8)           # int4 codes + (scale, zero) of the candidates
    if cfg.samples_residual:
        base = cfg.base_rate if cfg.base_rate >= 1 else math.ceil(cfg.base_rate * L)
        total += B * HK * 2 * min(base, L) * kv_tok       # base sample, read twice (two-pass variance)
    return total


def pool_page(configs) -> int:
    """SGLang's page of the synthetic pool: 16, or a coarse page of a config (coarse pages are whole SGLang
    pages); one pool per case serves every config, so a run with a coarse config lays every config (dense too) out
    in pages of that size."""
    return max([P] + [SparseConfig.load(c).sglang_page_size for c in configs])


def bench_case(B: int, L: int, budgets, reps: int, peak: float, graphs: bool, rows: list, progress,
               capacity: int = 0, configs=METHODS):
    gen = torch.Generator().manual_seed(B * 1000003 + L)
    page = pool_page(configs)
    pool = make_pool([L] * B, HK, D, page, DTYPE, "cuda", gen, spare_pages=B + 8, max_ctx=L + 2 * page)
    # Start each request at L-1 tokens and decode one: the new token's slot is written every step.
    q = torch.randn((B, HQ, D), generator=gen).to(DTYPE).to("cuda")
    q = shape_attention(pool, q, "heavy_tailed", gen)
    new_slots = pool.last_slots
    sm = 1 / math.sqrt(D)
    dense_ref = dense_attention(q, pool.k_cache, pool.v_cache, _batch(pool), sm) if B * L <= (1 << 20) else None

    dense_cfg = SparseConfig(method="dense", page_size=P)
    op = SparseDecodeOperator(dense_cfg, num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, num_layers=1,
                              max_batch=B, max_context=max(L, capacity), dtype=DTYPE)
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    meta0 = SparseKVMetadata(dense_cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK,
                             head_dim=D, dtype=DTYPE, device="cuda")
    out = {}
    step = lambda: out.__setitem__("o", op.run(0, q, pool.k_cache, pool.v_cache, meta0))  # noqa: E731
    t_dense = time_fn(step, reps)
    t_dense_g = time_fn(graphed(step), reps) if graphs else float("nan")
    if dense_ref is None:
        dense_ref = out["o"].clone()      # FlashInfer dense as the reference on the biggest cases
    def faster(eager_us, graph_us):                       # the faster of eager and graph
        return min(eager_us, graph_us) if graphs else eager_us

    dense_best = faster(t_dense, t_dense_g)
    dbytes = needed_bytes("dense", B, L, 0, None, op, dense_cfg)
    rows.append(dict(method="dense", config="dense", batch=B, context=L, budget=L, us_eager=t_dense, us_graph=t_dense_g,
                     speedup=1.0, attended_fraction=1.0, rel_l2=float(relative_l2(out["o"], dense_ref).mean()),
                     gbps=dbytes / dense_best / 1e3, peak_fraction=dbytes / dense_best / 1e3 / peak))
    progress(rows[-1])
    del op

    for budget in budgets:
        if budget >= L:
            continue
        for name in configs:
            try:
                cfg = SparseConfig.load(name).replace(token_budget=budget, dense_layers=0, min_context=0,
                                                       min_batch_tokens=0)
            except SparseConfigError as e:         # e.g. a coarse_token_budget below this budget
                print(f"skip {name} at budget {budget}: {e}", file=sys.stderr)
                continue
            method = cfg.method
            meta = SparseKVMetadata(cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK,
                                    head_dim=D, dtype=DTYPE, device="cuda")
            meta.update(0, pool.k_cache, pool.written_slots)
            op = SparseDecodeOperator(cfg, num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, num_layers=1,
                                      max_batch=B, max_context=max(L, capacity), dtype=DTYPE)
            op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
            updates = ServerStepUpdates(meta, pool.k_cache, new_slots, LAYERS)

            def step():
                updates.per_layer()
                out["o"] = op.run(0, q, pool.k_cache, pool.v_cache, meta)

            # every layer's page bounds: one launch per model step, a layer's share of it (see ServerStepUpdates),
            # eager and graph alike, never less than the bytes the server's launch moves at the copy peak
            floor_us = updates.floor_bytes() / peak / 1e3
            upd_eager = max(time_fn(updates.all_layers, reps), floor_us) / LAYERS
            upd_graph = max(time_fn(graphed(updates.all_layers), reps), floor_us) / LAYERS if graphs else 0.0
            t_eager = time_fn(step, reps) + upd_eager
            t_graph = time_fn(graphed(step), reps) + upd_graph if graphs else float("nan")
            counts = op.last_counts.clone()
            R = cfg.reselect_every
            nbytes = needed_bytes(method, B, L, budget, counts, op, cfg)
            extra = {}
            if R > 1:
                # The steps above selected (and kept their selections); the R - 1 steps after reuse them.
                plan_reusing_step(op, pool)
                r_eager = time_fn(step, reps) + upd_eager
                r_graph = time_fn(graphed(step), reps) + upd_graph if graphs else float("nan")
                extra = dict(reselect_every=R, us_select=faster(t_eager, t_graph), us_reuse=faster(r_eager, r_graph))
                t_eager, t_graph = (t_eager + (R - 1) * r_eager) / R, (t_graph + (R - 1) * r_graph) / R
            best = faster(t_eager, t_graph)
            rows.append(dict(method=method, config=name, batch=B, context=L, budget=budget, us_eager=t_eager,
                             us_graph=t_graph, speedup=dense_best / best,
                             attended_fraction=float(counts.float().sum() / (B * HK * L)),
                             rel_l2=float(relative_l2(out["o"], dense_ref).mean()),
                             gbps=nbytes / best / 1e3, peak_fraction=nbytes / best / 1e3 / peak,
                             us_bounds_update=upd_graph if graphs else upd_eager, **extra))
            progress(rows[-1])
            del op, meta
            torch.cuda.empty_cache()
    del pool
    torch.cuda.empty_cache()


def _batch(pool):
    from sgl_sparse.policies import DecodeBatch
    return DecodeBatch(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.max_pages())


def fits(B: int, L: int) -> bool:
    need = B * L * HK * D * 2 * 2 * 1.6 + (2 << 30)       # K/V + metadata, temporaries and workspace
    return need < torch.cuda.get_device_properties(0).total_memory * 0.85


def plot(rows, path: str, gpu: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows if r["method"] != "dense"})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        configs = [c for c in dict.fromkeys(r.get("config", r["method"]) for r in rows) if c != "dense"]
        for config, marker in zip(configs, "osd^vx"):
            for B, ls in zip(batches, ["-", "--", ":", "-."]):
                pts = sorted((r["context"], r["speedup"]) for r in rows
                             if r.get("config", r["method"]) == config and r["budget"] == budget and r["batch"] == B)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls,
                            label=f"{config} B={B}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"budget {budget} tokens")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speedup over dense FlashInfer (CUDA graphs)")
        ax.legend(fontsize=7)
    fig.suptitle(f"sparse decode step vs dense, Llama-3.1-8B attention, bf16 — {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(path, gpu, peak, rows, skipped) -> None:
    from bench_e2e import git_commit, versions
    from cupy_kernels import _cuda as ck_cuda

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(gpu=gpu, peak_gbps=peak, versions=versions(), commit=git_commit(),
                       programmatic_dependent_launch=ck_cuda.PDL, shape=dict(HQ=HQ, HK=HK, D=D, page=P),
                       l2="cold (emptied before every timed call)" if L2_FLUSH is not None else "warm (back to back)",
                       rows=rows, skipped=skipped), f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-context", type=int, default=131072,
                    help="the operator's capacity (a server builds it for the model's context length; kernels must "
                         "cost what the context present costs, not the capacity)")
    ap.add_argument("--configs", nargs="+", default=list(METHODS), type=config_spec, metavar="CONFIG",
                    help=f"sparse presets (configs/*.yaml: {', '.join(presets())}) beside dense, optionally with "
                         f"inline overrides (quest:bounds_dtype=bf16,coarse_page_tokens=64); default: {' '.join(METHODS)}")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--cold-l2", action="store_true", help="empty the L2 before every timed call (see above)")
    ap.add_argument("--quick", action="store_true", help="one small case per method")
    ap.add_argument("--out", default="out/bench_decode.json")
    ap.add_argument("--png", default=None, help="plot path (default: next to --out)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU (and flashinfer); none found", file=sys.stderr)
        return 2
    if args.quick:
        args.contexts, args.batches, args.budgets, args.reps = [8192], [2], [1024], 5
    gpu = torch.cuda.get_device_name(0)
    peak = measure_peak_gbps()
    print(f"# {gpu}: measured copy peak {peak:.0f} GB/s", file=sys.stderr)
    global L2_FLUSH
    if args.cold_l2:
        L2_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows: list = []
    cases = [(B, L) for L in args.contexts for B in args.batches]
    if 131072 in args.contexts and 16 not in args.batches and not args.quick:
        cases.append((16, 131072))          # the 128K target case
    cases.sort(key=lambda c: (c[1], c[0]))
    t0 = time.time()

    def progress(r):
        done = len({(x["batch"], x["context"]) for x in rows})
        print(f"[{done}/{len(cases)} {time.time() - t0:6.0f}s] {r['config']:10s} B={r['batch']:<3d} "
              f"L={r['context']:<7d} budget={r['budget']:<6d} {r['us_graph']:9.1f} us  x{r['speedup']:.2f}  "
              f"err {r['rel_l2']:.4f}", file=sys.stderr, flush=True)

    skipped = []
    for B, L in cases:
        if not fits(B, L):
            skipped.append((B, L))
            print(f"skip B={B} L={L}: does not fit in GPU memory", file=sys.stderr)
            continue
        bench_case(B, L, args.budgets, args.reps, peak, not args.no_graph, rows, progress, args.max_context,
                   [c for c in args.configs if c != "dense"])
        save(args.out, gpu, peak, rows, skipped)      # after every case, so a cut-off run keeps its rows

    hdr = (f"{'config':10s} {'batch':>5s} {'context':>7s} {'budget':>6s} {'eager us':>9s} {'graph us':>9s} "
           f"{'speedup':>7s} {'attended':>8s} {'rel L2':>7s} {'GB/s':>6s} {'%peak':>5s}")
    l2 = "L2 emptied before every timed call" if args.cold_l2 else "warm L2 (back to back)"
    print(f"\nSparse decode step vs dense FlashInfer — {gpu}, copy peak {peak:.0f} GB/s, {l2}\n{hdr}")
    for r in rows:
        print(f"{r['config']:10s} {r['batch']:5d} {r['context']:7d} {r['budget']:6d} {r['us_eager']:9.1f} "
              f"{r['us_graph']:9.1f} {r['speedup']:7.2f} {r['attended_fraction']:8.4f} {r['rel_l2']:7.4f} "
              f"{r['gbps']:6.0f} {100 * r['peak_fraction']:5.1f}")
    for B, L in skipped:
        print(f"(batch {B} x {L}: skipped, does not fit in GPU memory)")
    save(args.out, gpu, peak, rows, skipped)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    try:
        plot(rows, png, gpu)
        print(f"wrote {args.out} and {png}", file=sys.stderr)
    except ImportError:
        print(f"wrote {args.out} (matplotlib missing: no plot)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
