#!/usr/bin/env python3
"""One sparse decode step per method at a target shape, for Nsight Compute.

    ncu --clock-control none --section SpeedOfLight python launch/profile_step.py --batch 32 --context 32768

Runs each method's per-layer step (metadata update of the new token, selection, attention) ``--steps`` times
eagerly after a warm-up, so every kernel of the step shows up once per step in the profile.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.decode import SparseDecodeOperator  # noqa: E402
from sgl_sparse.metadata import SparseKVMetadata  # noqa: E402
from sgl_sparse.synthetic import make_pool, shape_attention  # noqa: E402

HQ, HK, D, P = 32, 8, 128, 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["dense", "quest", "twilight", "vattention"])
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    B, L = args.batch, args.context
    gen = torch.Generator().manual_seed(0)
    pool = make_pool([L] * B, HK, D, P, torch.bfloat16, "cuda", gen, max_ctx=L + 2 * P)
    q = shape_attention(pool, torch.randn((B, HQ, D), generator=gen).to(torch.bfloat16).cuda(), "heavy_tailed", gen)
    new_slots = torch.stack([pool.req_to_token[int(r), int(n) - 1] for r, n in
                             zip(pool.req_pool_indices, pool.seq_lens)]).long()
    for method in args.methods:
        cfg = SparseConfig.load(method).replace(token_budget=args.budget, dense_layers=0, min_context=0) \
            if method != "dense" else SparseConfig(method="dense")
        meta = SparseKVMetadata(cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                                dtype=torch.bfloat16, device="cuda")
        if cfg.is_sparse:
            meta.update(0, pool.k_cache, pool.written_slots)
        op = SparseDecodeOperator(cfg, num_qo_heads=HQ, num_kv_heads=HK, head_dim=D, num_layers=1, max_batch=B,
                                  max_context=L, dtype=torch.bfloat16)
        op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
        for _ in range(1 + args.steps):
            if cfg.is_sparse:
                meta.update(0, pool.k_cache, new_slots)
            op.run(0, q, pool.k_cache, pool.v_cache, meta)
        torch.cuda.synchronize()
        print(f"{method}: done ({B} x {L}, budget {args.budget})", file=sys.stderr)
        del op, meta
    return 0


if __name__ == "__main__":
    sys.exit(main())
