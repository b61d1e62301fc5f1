"""Top-k page selection per (request, KV head) with forced sink and local pages.

Spec: :func:`cupy_kernels.reference.topk_pages`. Kernel: ``topk_pages.cu`` (radix select on keys held in
registers, no sort). ``topk_pages_radix4`` runs the previous kernel (``topk_pages_radix4.cu``) on the same arguments:
it exists only as the baseline of ``launch/bench_kernels.py`` and of the GPU tests, not for the product.
"""

from __future__ import annotations

import torch

from ._cuda import as_int32, check, check_batch, check_tensor, i32, kernel, launch, u64

Reuse = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
# (req_to_token [max_reqs, max_ctx], req_pool_indices [B], indptr [R + 1], page_indices [>= R * W],
#  last_page_len [R], num_tokens [B, HK]): where the selection also goes as FlashInfer rows (see page_rows)
PageRowsOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

THREADS = 512                 # threads per (request, KV head) block, as in the kernels
MAX_KEYS_PER_THREAD = 16      # register capacity: 16 * 512 = 8192 pages (128K tokens at page 16)


def keys_per_thread(max_pages: int) -> int:
    """The kernel's KEYS_PER_THREAD for rows of ``max_pages``: the smallest power of two whose ``* 512`` holds a
    row, at most 16 (longer rows run in chunks of 8192 pages)."""
    kpt = 1
    while kpt * THREADS < max_pages and kpt < MAX_KEYS_PER_THREAD:
        kpt *= 2
    return kpt


def topk_pages(page_scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, top_k: int, n_sink: int,
               n_local: int, select_all_upto: int = 0, out: tuple[torch.Tensor, torch.Tensor] | None = None,
               *, reuse: Reuse | None = None, row_top_k: torch.Tensor | None = None,
               page_rows_out: PageRowsOut | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the ``top_k`` best pages of each (request, KV head), or reuse a kept selection.

    Args:
        page_scores: ``[B, HK, max_pages]`` float32.
        seq_lens: ``[B]`` int32/int64 (request b has ``ceil(seq_len / P)`` pages).
        top_k: pages kept, ``>= n_sink + n_local``; n_sink / n_local: first / last pages always kept.
        select_all_upto: requests with at most ``max(top_k, select_all_upto)`` pages keep every page (the
            dense fallback for short requests).
        out: optional (selected ``[B, HK, W]`` int32, count ``[B, HK]`` int32) buffers,
            ``W = max(top_k, select_all_upto)`` (``max(.., top_k + extra_pages)`` with ``reuse``).
        reuse: optional ``(req_pool_indices [B], reuse_from [B] int32, kept [max_reqs, HK, top_k] int32,
            extra_pages)``: see :func:`cupy_kernels.reference.topk_pages`.
        row_top_k: optional ``[B]`` int32, each request's own number of pages (``n_sink + n_local .. top_k``;
            not checked on the device): see the reference.
        page_rows_out: optional ``(req_to_token, req_pool_indices, indptr, page_indices, last_page_len,
            num_tokens)``: the selection is also written as FlashInfer's per-head paged rows into the last four,
            as :func:`cupy_kernels.page_rows.page_rows` writes them from the returned selection (its spec:
            ``reference.page_rows`` of ``reference.topk_pages``), without that launch. With ``reuse``, its
            req_pool_indices must be the same tensor; rows that select or reuse must have distinct request slots
            (each block reads the other rows' kept selections for its offset).

    Returns:
        selected_pages ``[B, HK, W]`` int32 in ascending page order (entries past the count are not
        written), num_selected ``[B, HK]`` int32.
    """
    return _topk_pages(page_scores, seq_lens, page_size, top_k, n_sink, n_local, select_all_upto, out, reuse,
                       row_top_k, page_rows_out, baseline=False)


def topk_pages_radix4(page_scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, top_k: int, n_sink: int,
                      n_local: int, select_all_upto: int = 0, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      *, reuse: Reuse | None = None, row_top_k: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Benchmark baseline only: :func:`topk_pages` by the previous kernel (4 radix passes over global memory,
    ``topk_pages_radix4.cu``); same arguments, same results. The product calls :func:`topk_pages`."""
    return _topk_pages(page_scores, seq_lens, page_size, top_k, n_sink, n_local, select_all_upto, out, reuse,
                       row_top_k, None, baseline=True)


def _topk_pages(page_scores, seq_lens, page_size, top_k, n_sink, n_local, select_all_upto, out, reuse, row_top_k,
                page_rows_out, *, baseline: bool):
    check_tensor(page_scores, "page_scores", dtypes=[torch.float32], ndim=3)
    dev = page_scores.device
    B, HK, M = page_scores.shape
    check_tensor(seq_lens, "seq_lens", dtypes=[torch.int32, torch.int64], ndim=1, device=dev)
    check(seq_lens.shape[0] == B, f"seq_lens has {seq_lens.shape[0]} entries for a batch of {B}")
    check(top_k >= 1, f"top_k must be >= 1, got {top_k}")
    check(n_sink >= 0 and n_local >= 0, f"n_sink and n_local must be >= 0, got {n_sink}, {n_local}")
    check(top_k >= n_sink + n_local, f"top_k ({top_k}) must be >= n_sink + n_local ({n_sink} + {n_local})")
    fit = max(top_k, select_all_upto)
    W = fit
    rpi = reuse_from = kept = u64(0)
    if reuse is not None:
        rpi, reuse_from, kept, extra = reuse
        check_tensor(rpi, "req_pool_indices", dtypes=[torch.int32], ndim=1, device=dev)
        check_tensor(reuse_from, "reuse_from", dtypes=[torch.int32], ndim=1, device=dev)
        check_tensor(kept, "kept", dtypes=[torch.int32], ndim=3, device=dev)
        check(rpi.shape[0] == B and reuse_from.shape[0] == B, f"req_pool_indices and reuse_from need {B} entries")
        check(tuple(kept.shape[1:]) == (HK, top_k), f"kept must be [max_reqs, {HK}, {top_k}], got {tuple(kept.shape)}")
        W = max(fit, top_k + extra)
    if row_top_k is not None:
        check_tensor(row_top_k, "row_top_k", dtypes=[torch.int32], ndim=1, device=dev)
        check(row_top_k.shape[0] == B, f"row_top_k has {row_top_k.shape[0]} entries for a batch of {B}")
    if out is None:
        out = (torch.empty((B, HK, W), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
    sel, cnt = out
    check_tensor(sel, "selected_pages", dtypes=[torch.int32], ndim=3, device=dev)
    check_tensor(cnt, "num_selected", dtypes=[torch.int32], ndim=2, device=dev)
    check(tuple(sel.shape) == (B, HK, W) and tuple(cnt.shape) == (B, HK),
          f"out buffers must be {(B, HK, W)} and {(B, HK)}")
    rows = (u64(0),) * 5 + (i32(0),)              # req_to_token, indptr, page_indices, last, num_tokens, stride
    if page_rows_out is not None:
        r2t, rows_rpi, indptr, indices, last, ntok = page_rows_out
        check(reuse is None or rows_rpi is reuse[0], "page_rows_out and reuse must share req_pool_indices")
        r2t, rows_rpi, _ = check_batch(r2t, rows_rpi, seq_lens, dev)
        R = B * HK
        for name, t in (("indptr", indptr), ("page_indices", indices), ("last_page_len", last)):
            check_tensor(t, name, dtypes=[torch.int32], ndim=1, device=dev)
        check_tensor(ntok, "num_tokens", dtypes=[torch.int32], device=dev)
        check(indptr.numel() == R + 1 and indices.numel() >= R * W and last.numel() == R and ntok.numel() == R,
              f"page_rows_out buffers must hold {R + 1}, >= {R * W}, {R} and {R} entries")
        rpi = rows_rpi
        rows = (r2t, indptr, indices, last, ntok, i32(r2t.shape[1]))
    if B == 0:
        if page_rows_out is not None:
            page_rows_out[2].zero_()
        return sel, cnt
    per_row = row_top_k if row_top_k is not None else u64(0)
    args = (page_scores, as_int32(seq_lens), sel, cnt, rpi, reuse_from, kept, per_row, i32(HK), i32(M), i32(top_k),
            i32(n_sink), i32(n_local), i32(select_all_upto), i32(W))
    if baseline:
        fn = kernel("topk_pages_radix4.cu", "topk_pages_radix4", dev, PAGE_SIZE=page_size)
    else:
        fn = kernel("topk_pages.cu", "topk_pages", dev, PAGE_SIZE=page_size, KEYS_PER_THREAD=keys_per_thread(M))
        args += rows
    launch(fn, (HK, B), (THREADS,), args, dev)
    return sel, cnt
