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



class LayerTables:
    """Device tables of the addresses of every layer's K pool and page bounds, for
    :func:`page_bounds_update_layers` (built once: SGLang's per-layer pools never move).

    Args:
        k_caches: per layer ``[num_slots, HK, D]`` fp16/bf16 (all of one shape and dtype).
        page_key_bounds: per layer ``[num_slots // P, HK, 2, D]``, dtype of the K pools.
        page_size: P.
    """

    def __init__(self, k_caches: list[torch.Tensor], page_key_bounds: list[torch.Tensor], page_size: int):
        check(len(k_caches) == len(page_key_bounds) and len(k_caches) > 0,
              f"one bounds table per K pool: {len(k_caches)} pools, {len(page_key_bounds)} tables")
        k0 = k_caches[0]
        check_tensor(k0, "k_caches[0]", dtypes=list(KV_DTYPES), ndim=3)
        S, HK, D = k0.shape
        check(S % page_size == 0, f"num_slots ({S}) must be a multiple of page_size ({page_size})")
        check(D % 8 == 0, f"head_dim must be a multiple of 8, got {D}")
        for i, (k, b) in enumerate(zip(k_caches, page_key_bounds)):
            check_tensor(k, f"k_caches[{i}]", dtypes=[k0.dtype], ndim=3, device=k0.device)
            check(tuple(k.shape) == (S, HK, D), f"k_caches[{i}] is {tuple(k.shape)}, layer 0 is {(S, HK, D)}")
            check_tensor(b, f"page_key_bounds[{i}]", dtypes=[k0.dtype], ndim=4, device=k0.device)
            check(tuple(b.shape) == (S // page_size, HK, 2, D),
                  f"page_key_bounds[{i}] must be {(S // page_size, HK, 2, D)}, got {tuple(b.shape)}")
        self.k_caches, self.page_key_bounds = list(k_caches), list(page_key_bounds)
        self.page_size, self.shape, self.dtype, self.device = page_size, (S, HK, D), k0.dtype, k0.device
        self.k_addresses = torch.tensor([k.data_ptr() for k in k_caches], dtype=torch.int64, device=k0.device)
        self.bounds_addresses = torch.tensor([b.data_ptr() for b in page_key_bounds], dtype=torch.int64,
                                             device=k0.device)


def page_bounds_update_layers(tables: LayerTables, written_slots: torch.Tensor) -> None:
    """:func:`page_bounds_update` of every layer of ``tables`` for the same ``written_slots``, in one launch.

    Args:
        tables: the layers' K pools and bounds (:class:`LayerTables`).
        written_slots: ``[N]`` int32/int64, as for :func:`page_bounds_update`.

    Runs on the current stream, no host synchronisation; capturable in a CUDA graph.
    """
    dev = tables.device
    check_tensor(written_slots, "written_slots", dtypes=[torch.int32, torch.int64], ndim=1, device=dev)
    n = written_slots.numel()
    if n == 0:
        return
    S, HK, D = tables.shape
    fn = kernel("page_bounds.cu", "page_bounds_update_layers", dev, KV_BF16=KV_DTYPES[tables.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, PAGE_SIZE=tables.page_size, SLOTS_I64=int(written_slots.dtype == torch.int64))
    threads = min(256, max(32, HK * D // 8))
    launch(fn, (n, len(tables.k_caches)), (threads,), (tables.k_addresses, written_slots, tables.bounds_addresses,
                                                       i32(n)), dev)
