"""Selected pages -> FlashInfer kv indices (``slot * HK + h``) of their tokens.

Spec: :func:`cupy_kernels.reference.pages_to_kv_indices`. Kernel: ``pages_to_kv.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import check, check_batch, check_tensor, i32, kernel, launch


def pages_to_kv_indices(selected_pages: torch.Tensor, num_selected: torch.Tensor, req_to_token: torch.Tensor,
                        req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, page_size: int, capacity: int,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ascending selected pages into the kv indices of their tokens.

    Args:
        selected_pages: ``[B, HK, K]`` int32, ascending; num_selected: ``[B, HK]`` int32.
        req_to_token ``[max_reqs, max_ctx]`` int32, req_pool_indices / seq_lens ``[B]``.
        capacity: output columns, ``>= K * P``.
        out: optional (kv_indices ``[B, HK, capacity]`` int32, num_kv ``[B, HK]`` int32) buffers.

    Returns:
        kv_indices (entries past the count not written) and num_kv.
    """
    check_tensor(selected_pages, "selected_pages", dtypes=[torch.int32], ndim=3)
    dev = selected_pages.device
    B, HK, K = selected_pages.shape
    check_tensor(num_selected, "num_selected", dtypes=[torch.int32], ndim=2, device=dev)
    r2t, rpi, sl = check_batch(req_to_token, req_pool_indices, seq_lens, dev)
    check(capacity >= K * page_size, f"capacity ({capacity}) must be >= top_k * page_size ({K * page_size})")
    if out is None:
        out = (torch.empty((B, HK, capacity), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
    kv, cnt = out
    check_tensor(kv, "kv_indices", dtypes=[torch.int32], ndim=3, device=dev)
    check(tuple(kv.shape) == (B, HK, capacity) and tuple(cnt.shape) == (B, HK),
          f"out buffers must be {(B, HK, capacity)} and {(B, HK)}")
    if B == 0:
        return kv, cnt
    fn = kernel("pages_to_kv.cu", "pages_to_kv_indices", dev, PAGE_SIZE=page_size)
    chunks = max(1, -(-K * page_size // 256))
    launch(fn, (HK, B, chunks), (256,), (selected_pages, num_selected, r2t, rpi, sl, kv, cnt, i32(HK), i32(K),
                                 i32(r2t.shape[1]), i32(capacity)), dev)
    return kv, cnt
