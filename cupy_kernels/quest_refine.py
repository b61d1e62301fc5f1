"""Quest refinement: page scores inside the coarse pages a request kept (coarse-to-fine scoring).

Spec: :func:`cupy_kernels.reference.quest_refine_scores`. Kernel: ``quest_refine.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_tensor, early_launch_pays, i32, kernel, launch, u64
from .quest_scores import THREADS, check_score_inputs, group_mean, scores_out


def quest_refine_scores(q: torch.Tensor, page_key_bounds: torch.Tensor, req_to_token: torch.Tensor,
                        req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, coarse_pages: torch.Tensor,
                        coarse_count: torch.Tensor, page_size: int, ratio: int, max_pages: int,
                        out: torch.Tensor | None = None, skip_pages_upto: int = 0,
                        skip_rows: torch.Tensor | None = None, group_score: str = "max") -> torch.Tensor:
    """Score the pages inside each (request, KV head)'s kept coarse pages; the request's other pages ``-inf``.

    Args:
        q: ``[B, HQ, D]`` fp16/bf16 decode queries.
        page_key_bounds: ``[num_pages_total, HK, 2, D]`` (pages of ``page_size`` tokens), dtype of ``q``.
        req_to_token: ``[max_reqs, max_ctx]`` int32; req_pool_indices, seq_lens: ``[B]`` int32/int64.
        coarse_pages: ``[B, HK, Wc]`` int32, kept coarse pages (logical, ``ratio`` pages each; as from
            :func:`topk_pages` over coarse scores), ``coarse_count`` ``[B, HK]`` int32 of them valid.
        page_size: P. ratio: pages per coarse page (R). max_pages: output columns.
        out: optional ``[B, HK, max_pages]`` float32 buffer.
        skip_pages_upto / skip_rows / group_score: as in :func:`quest_page_scores`.

    Returns:
        ``[B, HK, max_pages]`` float32. Only the columns below each scored request's page count are written
        (as :func:`quest_page_scores`: what top-k reads); the rest of ``out`` keeps what it held.
    """
    check(page_key_bounds.dtype != torch.uint8, "this kernel reads bf16/fp16 bounds only; int8 bounds (bounds_dtype "
                                                "int8) are not supported here (coarse-to-fine scoring)")
    B, D, HK, G, r2t, rpi, sl = check_score_inputs(q, page_key_bounds, req_to_token, req_pool_indices, seq_lens,
                                                   skip_pages_upto, skip_rows)
    dev = q.device
    check_tensor(coarse_pages, "coarse_pages", dtypes=[torch.int32], ndim=3, device=dev)
    check_tensor(coarse_count, "coarse_count", dtypes=[torch.int32], ndim=2, device=dev)
    check(tuple(coarse_pages.shape[:2]) == (B, HK) and tuple(coarse_count.shape) == (B, HK),
          f"coarse_pages must be [{B}, {HK}, W] and coarse_count [{B}, {HK}]")
    check(ratio >= 1, f"ratio must be >= 1, got {ratio}")
    out = scores_out(out, B, HK, max_pages, dev)
    if B == 0 or max_pages == 0 or coarse_pages.shape[2] == 0:
        return out
    fn = kernel("quest_refine.cu", "quest_refine_scores", dev, KV_BF16=KV_DTYPES[q.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, GROUP=G, PAGE_SIZE=page_size, RATIO=ratio, GROUP_MEAN=group_mean(group_score))
    skip = skip_rows if skip_rows is not None else u64(0)
    launch(fn, (B, HK), (THREADS,), (q, page_key_bounds, r2t, rpi, sl, coarse_pages, coarse_count, skip, out,
                                      i32(r2t.shape[1]), i32(coarse_pages.shape[2]), i32(max_pages),
                                      i32(skip_pages_upto), i32(early_launch_pays(B, HK, dev))), dev)
    return out
