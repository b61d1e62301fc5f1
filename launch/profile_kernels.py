#!/usr/bin/env python3
"""Where a sparse decode step's time goes: device time of each kernel per step (torch.profiler / CUPTI).

    python launch/profile_kernels.py --shapes 1x32768 8x32768 32x32768 --methods quest twilight vattention

Same step as ``profile_step.py`` (one layer: metadata update of the new token, selection, attention; Llama-3.1-8B
attention shape, synthetic heavy-tailed attention), eager, ``--steps`` times after a warm-up. Prints per method
and shape the kernels sorted by time (us per step, launches per step) and their sum; ``--out`` writes JSON.
Unlike Nsight Compute it does not serialise or replay kernels, so the times are the ones of a normal run (the
sum excludes the launch gaps that a CUDA-graph replay in ``bench_decode.py`` still pays).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.decode import SparseDecodeOperator  # noqa: E402
from sgl_sparse.metadata import SparseKVMetadata  # noqa: E402
from sgl_sparse.synthetic import make_pool, shape_attention  # noqa: E402

HQ, HK, D, P = 32, 8, 128, 16
def step(meta, op, pool, q, new_slots) -> None:
    meta.update(0, pool.k_cache, new_slots)
    op.run(0, q, pool.k_cache, pool.v_cache, meta)


def kernel_times(meta, op, pool, q, new_slots, steps: int) -> dict[str, tuple[float, float]]:
    """kernel name -> (launches per step, device us per step)."""
    for _ in range(3):
        step(meta, op, pool, q, new_slots)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(meta, op, pool, q, new_slots)
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
    ap.add_argument("--shapes", nargs="+", default=["1x32768", "8x32768", "32x32768"], help="BATCHxCONTEXT")
    ap.add_argument("--methods", nargs="+", default=["quest", "twilight", "vattention"])
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args()
    results = {}
    for shape in args.shapes:
        B, L = map(int, shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        pool = make_pool([L] * B, HK, D, P, torch.bfloat16, "cuda", gen, max_ctx=L + 2 * P)
        q = shape_attention(pool, torch.randn((B, HQ, D), generator=gen).to(torch.bfloat16).cuda(), "heavy_tailed",
                            gen)
        new_slots = torch.stack([pool.req_to_token[int(r), int(n) - 1]
                                 for r, n in zip(pool.req_pool_indices, pool.seq_lens)]).long()
        for method in args.methods:
            cfg = SparseConfig.load(method).replace(token_budget=args.budget, dense_layers=0, min_context=0)
            meta = SparseKVMetadata(cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK,
                                    head_dim=D, dtype=torch.bfloat16, device="cuda")
            meta.update(0, pool.k_cache, pool.written_slots)
            op = SparseDecodeOperator(cfg, num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, num_layers=1, max_batch=B,
                                      max_context=L, dtype=torch.bfloat16)
            op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
            times = kernel_times(meta, op, pool, q, new_slots, args.steps)
            total = sum(us for _, us in times.values())
            print(f"== {method} {B}x{L} budget {args.budget}: kernel sum {total:.1f} us/step")
            for name, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
                print(f"   {us:8.1f} us  x{n:.0f}  {name}")
            results[f"{method} {shape}"] = {"total_us": total, "kernels": {k: v[1] for k, v in times.items()}}
            del op, meta
        del pool
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
