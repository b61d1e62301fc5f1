#!/usr/bin/env python3
"""FlashInfer's attention over Quest's page rows, whole or split: what the attention of a sparse step costs.

A Quest step attends each (request, KV head) row's selected pages through FlashInfer's tensor-core decode
(``sgl_sparse.decode._PerHeadDecode``'s page view of SGLang's ``[slots, HK, D]`` cache: one row per request and KV
head, its G query heads, page index ``first_slot * HK + h``). At 32 × 32K and budget 2048 that is 256 rows of 128
pages, ~1 MiB of K/V each, and it moves them at ~3.6 TB/s where dense FlashInfer reads its cache at ~4.4 TB/s.
This benchmark times the same pages handed to FlashInfer as ``S`` shorter rows per (request, KV head) (each row's
pages cut into S runs, every run with the row's query), their outputs merged by LSE (``flashinfer.merge_states``),
against the whole rows, under FlashInfer's planner options and backends, each as a CUDA-graph replay of what a
step would run (the query copies and the merge included), and checks every variant's output against the first
variant's whole rows (largest difference over the largest output element, under 1 %).

    python launch/bench_attention_rows.py                                    # 8 and 32 x 32K, 16 x 128K; S = 1, 2, 4
    python launch/bench_attention_rows.py --points 32x32K --splits 1 2 --variants auto no-split fa3

Variants: ``auto`` (the operator's: FlashInfer's ``fa2`` tensor-core decode, whose planner always splits the KV
under CUDA graphs, so partial outputs and FlashInfer's own merge are paid even where a row is one chunk),
``no-split`` (``disable_split_kv=True``: neither), ``fa3`` (the wrapper built with ``backend="fa3"``; its JIT build
happens in ``plan()``, before the timed replays; it does not fuse a group's query heads, so each row's K/V is read
once per query head and its GB/s is bytes needed over time, not DRAM traffic). A variant FlashInfer refuses is
reported with its error instead of a time; a CUDA error (sticky for the process) ends the run.

Replays run back to back (warm L2, as ``bench_decode.py``'s default); ``--cold-l2`` empties the L2 before each
(the selected K/V of 8 × 32K, 64 MiB, is near the H200's 50 MB L2).

Writes a table to stdout and JSON (``--out``) naming the GPU, versions and commit.
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

from sgl_sparse.decode import _row_plan  # noqa: E402  (host indptr and last_page_len of rows of N tokens)

HQ, HK, D, P = 32, 8, 128, 16           # Llama-3.1-8B attention, SGLang page 16
G = HQ // HK
DTYPE = torch.bfloat16
VARIANTS = {"auto": ("auto", {}), "no-split": ("auto", {"disable_split_kv": True}), "fa3": ("fa3", {})}
DEFAULT_POINTS = ("8x32K", "32x32K", "16x128K")
CUDA_ERRORS = tuple(c for c in (getattr(torch, "AcceleratorError", None),) if c is not None)


def split_rows(indptr: torch.Tensor, last_page_len: torch.Tensor, splits: int, page_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[R]`` of a page list (host ``indptr`` ``[R + 1]`` from 0, ``last_page_len`` ``[R]``, int32) as
    ``R * splits`` rows over the same page list: row ``r``'s pages cut into ``splits`` consecutive runs, as equal as
    whole pages allow (the first ones one page longer), in the order ``r * splits + j``. Only a row's last run with
    pages ends on its partial page; the others end on full pages. Returns (indptr ``[R * splits + 1]``,
    last_page_len ``[R * splits]``) int32 (``sgl_sparse.decode._row_plan`` of the runs' tokens, the operator's own
    row plan); a run of no pages (a row shorter than ``splits`` pages) has last_page_len 0."""
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    pages = (indptr[1:] - indptr[:-1]).long()
    j = torch.arange(splits)
    run = pages[:, None] // splits + (j[None, :] < pages[:, None] % splits).long()   # [R, splits] pages per run
    is_last = j[None, :] == (pages.clamp(max=splits) - 1)[:, None]              # the row's last run with pages
    tokens = torch.where(is_last, (run - 1) * page_size + last_page_len.long()[:, None], run * page_size)
    return _row_plan(tokens.reshape(-1), page_size)


def row_pages(pool, batch: int, budget_pages: int, gen: torch.Generator) -> torch.Tensor:
    """Host ``[B * HK, budget_pages]`` int32 FlashInfer page indices (``first_slot * HK + h``): per (request, KV
    head) a random ascending set of the request's full pages, as a Quest selection would list them."""
    r2t = pool.req_to_token.cpu()[pool.req_pool_indices.cpu().long()]        # [B, max_ctx]
    full_pages = int(pool.seq_lens.min()) // P
    first_slots = r2t[:, : full_pages * P : P].long()                         # [B, full_pages]
    pick = torch.rand((batch, HK, full_pages), generator=gen).argsort(-1)[..., :budget_pages].sort(-1).values
    slots = torch.gather(first_slots[:, None, :].expand(batch, HK, full_pages), 2, pick)
    return (slots * HK + torch.arange(HK)[None, :, None]).reshape(batch * HK, budget_pages).to(torch.int32)


def run_point(batch: int, context: int, budget: int, splits: list[int], variants: list[str], reps: int,
              gen: torch.Generator) -> list[dict]:
    import flashinfer
    from bench_decode import time_fn
    from sgl_sparse.synthetic import capture_graph, make_pool

    pool = make_pool([context] * batch, HK, D, P, DTYPE, "cuda", gen)
    R, k = batch * HK, budget // P
    indices = row_pages(pool, batch, k, gen).reshape(-1).cuda()
    indptr, last = _row_plan(torch.full((R,), budget), P)
    slots = pool.k_cache.shape[0]          # the page view of _PerHeadDecode: page index first_slot * HK + h
    kv = tuple(c.as_strided(((slots - P + 1) * HK, P, 1, D), (D, HK * D, D, 1)) for c in (pool.k_cache, pool.v_cache))
    q = torch.randn((R, G, D), generator=torch.Generator("cuda").manual_seed(1), device="cuda").to(DTYPE)
    nbytes = R * k * P * D * 2 * pool.k_cache.element_size()                 # the selected pages' K and V
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows, reference = [], None
    for variant in variants:
        backend, plan_kwargs = VARIANTS[variant]
        for S in splits:
            row = dict(batch=batch, context=context, budget=budget, variant=variant, splits=S, rows=R * S,
                       bytes=nbytes)
            try:
                s_indptr, s_last = split_rows(indptr, last, S, P)
                dev_indptr, dev_last = s_indptr.cuda(), s_last.cuda()
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=dev_indptr,
                    paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=dev_last, backend=backend)
                wrapper.plan(s_indptr, indices[:0], s_last, G, 1, D, P, q_data_type=DTYPE, kv_data_type=DTYPE,
                             sm_scale=1.0 / math.sqrt(D), **plan_kwargs)

                outputs = {}

                def step(wrapper=wrapper, S=S):
                    if S == 1:
                        outputs["o"] = wrapper.run(q, kv)
                        return
                    o, lse = wrapper.run(q.repeat_interleave(S, 0), kv, return_lse=True)
                    outputs["o"] = flashinfer.merge_states(o.view(R, S, G, D), lse.view(R, S, G))[0]

                graph = capture_graph(step)               # outputs["o"]: the graph's output buffer
                graph.replay()
                torch.cuda.synchronize()
                out = outputs["o"].float()
                us = time_fn(graph.replay, reps)
                if reference is None:
                    reference, reference_of = out.clone(), f"{variant}, S = {S}"
                err = float((out - reference).abs().max() / reference.abs().max())
                row.update(us=us, gbps=nbytes / us / 1e3, rel_max_diff=err, ok=err < 1e-2,
                           checked_against=reference_of)
                del graph, wrapper, outputs
            except Exception as e:                                            # FlashInfer refused the variant
                if isinstance(e, CUDA_ERRORS) or "CUDA error" in str(e):
                    raise                                                     # sticky: every later variant would fail
                row.update(us=None, error=f"{type(e).__name__}: {(str(e).splitlines() or [repr(e)])[0][:200]}")
            rows.append(row)
            print(f"{batch}x{context // 1024}K S={S} {variant}: " + (f"{row['us']:.1f} us, {row['gbps']:.0f} GB/s, "
                  f"max |diff| / max |out| {row['rel_max_diff']:.3g}" if row["us"] is not None else row["error"]),
                  file=sys.stderr, flush=True)
    del pool, workspace
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="BATCHxCONTEXT, e.g. 32x32K")
    ap.add_argument("--budget", type=int, default=2048, help="tokens per (request, KV head)")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4], help="rows per (request, KV head)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--cold-l2", action="store_true", help="empty the L2 before every timed replay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench_attention_rows.json")
    args = ap.parse_args(argv)
    from bench_e2e import parse_point
    try:
        points = [parse_point(p) for p in args.points]
    except ValueError as e:
        ap.error(str(e))
    if args.budget % P or args.budget < P:
        ap.error(f"--budget must be a positive multiple of the page size {P}, got {args.budget}")
    if any(s < 1 or s > args.budget // P for s in args.splits):
        ap.error(f"--splits must be between 1 and the budget's pages ({args.budget // P}), got {args.splits}")
    if 1 not in args.splits:
        args.splits = [1] + args.splits                                       # the whole rows: the reference
    if any(c < args.budget for _, c in points):
        ap.error(f"every point's context must hold the budget ({args.budget} tokens)")
    if not torch.cuda.is_available():
        print("bench_attention_rows needs a CUDA GPU and flashinfer; none found", file=sys.stderr)
        return 2
    import bench_decode
    from bench_e2e import git_commit, versions
    if args.cold_l2:
        bench_decode.L2_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    l2 = "cold (emptied before every timed replay)" if args.cold_l2 else "warm (back to back)"
    gen = torch.Generator().manual_seed(args.seed)
    rows, t0 = [], time.time()
    gpu = torch.cuda.get_device_name(0)
    for batch, context in points:
        rows += run_point(batch, context, args.budget, sorted(set(args.splits)), args.variants, args.reps, gen)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(gpu=gpu, versions=versions(), commit=git_commit(), shape=dict(HQ=HQ, HK=HK, D=D, page=P),
                           l2=l2, rows=rows), f, indent=1)
    print(f"\nFlashInfer over Quest's page rows, budget {args.budget}, CUDA-graph replays, {l2} L2 - {gpu} "
          f"({time.time() - t0:.0f} s)")
    print(f"{'batch x context':>15s} {'variant':>9s} {'S':>2s} {'rows':>5s} {'us':>8s} {'GB/s':>6s} {'rel diff':>9s}")
    for r in rows:
        point = f"{r['batch']} x {r['context'] // 1024}K"
        if r["us"] is None:
            print(f"{point:>15s} {r['variant']:>9s} {r['splits']:2d} {r['rows']:5d}  {r['error']}")
        else:
            print(f"{point:>15s} {r['variant']:>9s} {r['splits']:2d} {r['rows']:5d} {r['us']:8.1f} {r['gbps']:6.0f} "
                  f"{r['rel_max_diff']:9.3g}" + ("" if r["ok"] else "  (differs from S = 1)"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
