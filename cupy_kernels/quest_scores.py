"""Quest page scores: the upper bound of q.k over each page, max over the GQA group, per KV head.

Spec: :func:`cupy_kernels.reference.quest_page_scores`. Kernel: ``quest_scores.cu`` (the scores as a matrix product
on tensor cores).
"""

from __future__ import annotations

import torch

from ._cuda import (KV_DTYPES, check, check_batch, check_group, check_tensor, early_launch_pays, i32, kernel, launch,
                    resident_blocks, u64)
from .page_bounds import check_bounds

THREADS = 256
TILE_PAGES = (THREADS // 32) * 16          # pages one tile covers (a block's unit of work): 16 (MMA rows) per warp


def group_mean(group_score: str) -> int:
    """The GROUP_MEAN define of the score kernels: 0 for ``max``, 1 for ``mean``."""
    check(group_score in ("max", "mean"), f"group_score must be 'max' or 'mean', got {group_score!r}")
    return int(group_score == "mean")


def check_score_inputs(q: torch.Tensor, page_key_bounds: torch.Tensor, req_to_token: torch.Tensor,
                       req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, skip_pages_upto: int,
                       skip_rows: torch.Tensor | None) -> tuple:
    """Validate the inputs every page-score kernel takes (bounds in the KV dtype, or int8 rows ``[pages, HK,
    2D + 8]`` uint8); returns ``(B, D, HK, G, req_to_token, req_pool_indices, seq_lens)``, the index tensors as
    int32."""
    check_tensor(q, "q", dtypes=list(KV_DTYPES), ndim=3)
    dev = q.device
    B, HQ, D = q.shape
    int8 = check_bounds(page_key_bounds, "page_key_bounds", q.dtype, None, None, D, dev)
    HK = page_key_bounds.shape[1]
    G = check_group(HQ, HK)
    check(D in (64, 128, 256), f"head_dim must be 64, 128 or 256, got {D}")
    align = 8 if int8 else 16                    # the kernels' widest loads: 16-byte vectors, 8 in int8 rows
    for t, name, need in ((q, "q", 16), (page_key_bounds, "page_key_bounds", align)):
        check(t.data_ptr() % need == 0, f"{name} must start at a {need}-byte aligned address (the kernels load "
                                        f"{need}-byte vectors), got {t.data_ptr():#x}: pass a .clone() of the view")
    r2t, rpi, sl = check_batch(req_to_token, req_pool_indices, seq_lens, dev)
    check(seq_lens.shape[0] == B, f"seq_lens has {seq_lens.shape[0]} entries for a batch of {B}")
    check(skip_pages_upto >= 0, f"skip_pages_upto must be >= 0, got {skip_pages_upto}")
    if skip_rows is not None:
        check_tensor(skip_rows, "skip_rows", dtypes=[torch.int32], ndim=1, device=dev)
        check(skip_rows.shape[0] == B, f"skip_rows has {skip_rows.shape[0]} entries for a batch of {B}")
    return B, D, HK, G, r2t, rpi, sl


def scores_out(out: torch.Tensor | None, B: int, HK: int, max_pages: int, dev) -> torch.Tensor:
    """The ``[B, HK, max_pages]`` float32 score buffer a page-score kernel writes: ``out`` checked, or a new one."""
    if out is None:
        return torch.empty((B, HK, max_pages), dtype=torch.float32, device=dev)
    check_tensor(out, "out", dtypes=[torch.float32], ndim=3, device=dev)
    check(tuple(out.shape) == (B, HK, max_pages), f"out must be {(B, HK, max_pages)}, got {tuple(out.shape)}")
    return out


def quest_page_scores(q: torch.Tensor, page_key_bounds: torch.Tensor, req_to_token: torch.Tensor,
                      req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, page_size: int, max_pages: int,
                      out: torch.Tensor | None = None, skip_pages_upto: int = 0,
                      skip_rows: torch.Tensor | None = None, group_score: str = "max") -> torch.Tensor:
    """Score every page of every request per KV head.

    The launch shape depends on the batch size only: the blocks walk the pages present (see the kernel), so
    the same launch (or captured graph) costs what the batch's pages cost, whatever ``max_pages`` is.

    Args:
        q: ``[B, HQ, D]`` fp16/bf16 decode queries.
        page_key_bounds: ``[num_pages_total, HK, 2, D]``, dtype of ``q``, or int8 rows ``[num_pages_total, HK,
            2D + 8]`` uint8 (``bounds_dtype: int8``: the BOUNDS_INT8 kernel, 264 instead of 512 bytes per page and
            KV head at D = 128).
        req_to_token: ``[max_reqs, max_ctx]`` int32; req_pool_indices, seq_lens: ``[B]`` int32/int64.
        page_size: P. max_pages: output columns (>= pages of the longest request).
        out: optional ``[B, HK, max_pages]`` float32 buffer.
        skip_pages_upto: requests with at most this many pages are not scored (their rows are not written).
        skip_rows: optional ``[B]`` int32; requests with a nonzero entry are not scored either (a reused
            selection: ``reuse_from`` of :func:`topk_pages`).
        group_score: ``max`` or ``mean`` over the GQA group (see the reference).

    Returns:
        ``[B, HK, max_pages]`` float32 scores. Only columns below each scored request's page count are
        written; the rest of ``out`` keeps what it held (uninitialised for a fresh tensor).
    """
    B, D, HK, G, r2t, rpi, sl = check_score_inputs(q, page_key_bounds, req_to_token, req_pool_indices, seq_lens,
                                                   skip_pages_upto, skip_rows)
    dev = q.device
    out = scores_out(out, B, HK, max_pages, dev)
    if B == 0 or max_pages == 0:
        return out
    fn = kernel("quest_scores.cu", "quest_page_scores", dev, KV_BF16=KV_DTYPES[q.dtype], HEAD_DIM=D, NUM_KV_HEADS=HK,
                GROUP=G, PAGE_SIZE=page_size, GROUP_MEAN=group_mean(group_score),
                BOUNDS_INT8=int(page_key_bounds.dtype == torch.uint8))
    # As many blocks per KV head as the GPU holds at once (no more tiles than the capacity can have).
    most_tiles = B * -(-max_pages // TILE_PAGES)
    blocks = max(1, min(most_tiles, resident_blocks(fn, THREADS, dev) // HK))
    skip = skip_rows if skip_rows is not None else u64(0)
    early = i32(early_launch_pays(B, HK, dev))
    launch(fn, (blocks, HK), (THREADS,), (q, page_key_bounds, r2t, rpi, sl, skip, out, i32(B), i32(r2t.shape[1]),
                                          i32(max_pages), i32(skip_pages_upto), early), dev, shared_mem=4 * (B + 1))
    return out
