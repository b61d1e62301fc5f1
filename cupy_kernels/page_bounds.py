"""Page metadata update: per physical page and KV head, the channel-wise min/max of K (Quest's metadata).

Spec: :func:`cupy_kernels.reference.page_bounds_update`. Kernel: ``page_bounds.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_tensor, i32, kernel, launch



def page_bounds_update(k_cache: torch.Tensor, written_slots: torch.Tensor, page_key_bounds: torch.Tensor,
                       page_size: int) -> None:
    """Update ``page_key_bounds`` in place for the pages touched by ``written_slots``.

    Args:
        k_cache: ``[num_slots, HK, D]`` fp16/bf16, the layer's K pool after the new tokens were written.
        written_slots: ``[N]`` int32/int64 (SGLang's ``out_cache_loc``); slots of one page contiguous, in
            increasing offset.
        page_key_bounds: ``[num_slots // P, HK, 2, D]``, dtype of ``k_cache`` (``[..., 0, :]`` min, ``[..., 1, :]``
            max).
        page_size: P.

    Runs on the current stream, no host synchronisation; capturable in a CUDA graph.
    """
    check_tensor(k_cache, "k_cache", dtypes=list(KV_DTYPES), ndim=3)
    S, HK, D = k_cache.shape
    dev = k_cache.device
    check_tensor(written_slots, "written_slots", dtypes=[torch.int32, torch.int64], ndim=1, device=dev)
    check_tensor(page_key_bounds, "page_key_bounds", dtypes=[k_cache.dtype], ndim=4, device=dev)
    check(tuple(page_key_bounds.shape) == (S // page_size, HK, 2, D),
          f"page_key_bounds must be [num_slots // page_size, HK, 2, D] = {(S // page_size, HK, 2, D)}, "
          f"got {tuple(page_key_bounds.shape)}")
    check(S % page_size == 0, f"num_slots ({S}) must be a multiple of page_size ({page_size})")
    check(D % 8 == 0, f"head_dim must be a multiple of 8, got {D}")
    n = written_slots.numel()
    if n == 0:
        return
    fn = kernel("page_bounds.cu", "page_bounds_update", dev, KV_BF16=KV_DTYPES[k_cache.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, PAGE_SIZE=page_size, SLOTS_I64=int(written_slots.dtype == torch.int64))
    threads = min(256, max(32, HK * D // 8))
    launch(fn, (n,), (threads,), (k_cache, written_slots, page_key_bounds, i32(n)), dev)

