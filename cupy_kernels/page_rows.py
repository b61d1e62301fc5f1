"""Selected pages -> FlashInfer's per-head paged rows (indptr, page indices, last page lengths).

Spec: :func:`cupy_kernels.reference.page_rows`. Kernel: ``page_rows.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import check, check_batch, check_tensor, i32, kernel, launch


def page_rows(selected_pages: torch.Tensor, num_selected: torch.Tensor, req_to_token: torch.Tensor,
              req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write each (request, KV head)'s selected pages as one FlashInfer row of the per-head paged view.

    Args:
        selected_pages: ``[B, HK, W]`` int32, ascending logical pages; num_selected: ``[B, HK]`` int32.
        req_to_token ``[max_reqs, max_ctx]`` int32, req_pool_indices / seq_lens ``[B]``.
        out: optional (indptr ``[R + 1]``, page_indices ``[>= R * W]``, last_page_len ``[R]``, num_tokens
            ``[B, HK]``) int32 buffers, R = B * HK, e.g. a FlashInfer wrapper's ``paged_kv_indptr_buffer``,
            ``paged_kv_indices_buffer`` and ``paged_kv_last_page_len_buffer``.

    Returns:
        indptr, page_indices (valid up to ``indptr[R]``), last_page_len and num_tokens (tokens per row).
    """
    check_tensor(selected_pages, "selected_pages", dtypes=[torch.int32], ndim=3)
    dev = selected_pages.device
    B, HK, W = selected_pages.shape
    check_tensor(num_selected, "num_selected", dtypes=[torch.int32], ndim=2, device=dev)
    check(tuple(num_selected.shape) == (B, HK), f"num_selected must be {(B, HK)}, got {tuple(num_selected.shape)}")
    r2t, rpi, sl = check_batch(req_to_token, req_pool_indices, seq_lens, dev)
    R = B * HK
    if out is None:
        out = (torch.empty(R + 1, dtype=torch.int32, device=dev), torch.empty(max(R * W, 1), dtype=torch.int32,
                                                                            device=dev),
               torch.empty(R, dtype=torch.int32, device=dev), torch.empty((B, HK), dtype=torch.int32, device=dev))
    indptr, indices, last, ntok = out
    for name, t in (("indptr", indptr), ("page_indices", indices), ("last_page_len", last)):
        check_tensor(t, name, dtypes=[torch.int32], ndim=1, device=dev)
    check_tensor(ntok, "num_tokens", dtypes=[torch.int32], device=dev)
    check(indptr.numel() == R + 1 and indices.numel() >= R * W and last.numel() == R and ntok.numel() == R,
          f"out buffers must hold {R + 1}, >= {R * W}, {R} and {R} entries")
    if R == 0:
        indptr.zero_()
        return out
    fn = kernel("page_rows.cu", "page_rows", dev, PAGE_SIZE=page_size)
    launch(fn, (R,), (128,), (selected_pages, num_selected, r2t, rpi, sl, indptr, indices, last, ntok, i32(HK),
                              i32(W), i32(r2t.shape[1])), dev)
    return out
