#!/usr/bin/env python3
"""One sparse decode step per method at a target shape: for Nsight Compute, or its own per-kernel times.

    ncu --clock-control none --section SpeedOfLight python launch/profile_step.py --batch 32 --context 32768
    python launch/profile_step.py --kernel-times --shapes 1x32768 8x32768 32x32768 --steps 20

Runs each method's per-layer step (the new token's side-table work as SGLang's backend splits it, selection,
attention; Llama-3.1-8B attention shape, synthetic heavy-tailed attention; see ``launch/bench_decode.py``)
``--steps`` times eagerly after a warm-up, each followed by the once-per-step launch that refreshes every layer's
page bounds, so every kernel of the step shows up once per step in a profile; a config with selection reuse
(``quest-fast``) runs its selecting step, then its reusing one. With ``--kernel-times`` it records the steps with
torch.profiler (CUPTI) and prints, per method and shape, each kernel's device time per step and launches per step,
sorted, and their sum, the all-layer bounds launch recorded on its own and counted as one layer's share (its time
and launches over ``LAYERS``); ``--out`` writes them as JSON. Unlike Nsight Compute this neither serialises nor
replays kernels, so the times are those of a normal run (the sum leaves out the launch gaps a CUDA-graph replay
still pays).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.decode import SparseDecodeOperator  # noqa: E402
from sgl_sparse.metadata import SparseKVMetadata  # noqa: E402
from sgl_sparse.synthetic import ServerStepUpdates, make_pool, plan_reusing_step, shape_attention  # noqa: E402
from bench_decode import HQ, HK, D, P, LAYERS  # noqa: E402  (the benchmark's Llama-3.1-8B shape)


def kernel_times(step, steps: int) -> dict[str, tuple[float, float]]:
    """kernel name -> (launches per step, device us per step) of ``steps`` calls of ``step``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(ev.name[:60], [0, 0.0])
            r[0] += 1
            r[1] += ev.time_range.elapsed_us()
    return {name: (n / steps, us / steps) for name, (n, us) in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--shapes", nargs="+", default=None, help="BATCHxCONTEXT list (instead of --batch/--context)")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--max-context", type=int, default=131072,
                    help="the operator's capacity, as a server builds it for the model's context length")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: dense quest twilight vattention (quest twilight vattention with --kernel-times)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--kernel-times", action="store_true", help="print each kernel's device time per step")
    ap.add_argument("--out", default=None, help="--kernel-times: JSON file")
    args = ap.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else [(args.batch, args.context)]
    methods = args.methods or (["quest", "twilight", "vattention"] if args.kernel_times
                               else ["dense", "quest", "twilight", "vattention"])
    results = {}
    for B, L in shapes:
        gen = torch.Generator().manual_seed(0)
        pool = make_pool([L] * B, HK, D, P, torch.bfloat16, "cuda", gen, max_ctx=L + 2 * P)
        q = shape_attention(pool, torch.randn((B, HQ, D), generator=gen).to(torch.bfloat16).cuda(), "heavy_tailed",
                            gen)
        new_slots = pool.last_slots
        for method in methods:
            cfg = SparseConfig.load(method).replace(token_budget=args.budget, dense_layers=0, min_context=0,
                                                    min_batch_tokens=0) \
                if method != "dense" else SparseConfig(method="dense")
            meta = SparseKVMetadata(cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK,
                                    head_dim=D, dtype=torch.bfloat16, device="cuda")
            if cfg.is_sparse:
                meta.update(0, pool.k_cache, pool.written_slots)
            op = SparseDecodeOperator(cfg, num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, num_layers=1,
                                      max_batch=B, max_context=max(L, args.max_context), dtype=torch.bfloat16)
            op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
            updates = ServerStepUpdates(meta, pool.k_cache, new_slots, LAYERS) if cfg.is_sparse else None

            def step():
                if updates is not None:
                    updates.per_layer()
                op.run(0, q, pool.k_cache, pool.v_cache, meta)

            # A config that reuses its selection (reselect_every > 1) runs in both of its states: the steps of the
            # first select (and keep their selections), those of the second reuse them.
            for state in ("selecting", "reusing") if cfg.reselect_every > 1 else ("",):
                if state == "reusing":
                    plan_reusing_step(op, pool)
                label = f"{method} {B}x{L}" + (f" {state}" if state else "")
                for _ in range(1 if not args.kernel_times else 3):   # warm-up (compiles on first use)
                    step()
                    if updates is not None:
                        updates.all_layers()
                torch.cuda.synchronize()
                if args.kernel_times:
                    times = kernel_times(step, args.steps)
                    if updates is not None:      # every layer's bounds, one launch per model step: a layer's share
                        # (its K reads hit the L2 over the aliases: bench_decode charges at least its bytes)
                        for name, (n, us) in kernel_times(updates.all_layers, args.steps).items():
                            times[name] = (n / LAYERS, us / LAYERS)
                    total = sum(us for _, us in times.values())
                    print(f"== {label} budget {args.budget}: kernel sum {total:.1f} us/step")
                    for name, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
                        print(f"   {us:8.1f} us  x{n:.3g}  {name}")
                    results[label] = {"total_us": total, "kernels": {k: v[1] for k, v in times.items()}}
                else:
                    for _ in range(args.steps):
                        step()
                        if updates is not None:
                            updates.all_layers()
                    torch.cuda.synchronize()
                    print(f"{label}: done ({B} x {L}, budget {args.budget})", file=sys.stderr)
            del op, meta
        del pool
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
