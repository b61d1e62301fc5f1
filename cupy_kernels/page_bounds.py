"""Page metadata update: per physical page and KV head, the channel-wise min/max of K (Quest's metadata).

Spec: :func:`cupy_kernels.reference.page_bounds_update`. Kernel: ``page_bounds.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_tensor, i32, kernel, launch
from .reference import int8_bounds_row_bytes


def bounds_shape(num_pages: int, num_kv_heads: int, head_dim: int, int8: bool) -> tuple[int, ...]:
    """Shape of a page bounds table: ``[pages, HK, 2, D]`` (KV dtype) or int8 rows ``[pages, HK, 2D + 8]``."""
    return ((num_pages, num_kv_heads, int8_bounds_row_bytes(head_dim)) if int8
            else (num_pages, num_kv_heads, 2, head_dim))


def check_bounds(bounds: torch.Tensor, name: str, kv_dtype: torch.dtype, num_pages: int | None,
                 num_kv_heads: int | None, head_dim: int, device) -> bool:
    """Validate a bounds table of ``num_pages`` pages and ``num_kv_heads`` heads (None: the table's own) for keys
    of ``kv_dtype`` and ``head_dim`` (or int8 rows); True for int8 rows."""
    D = head_dim
    int8 = isinstance(bounds, torch.Tensor) and bounds.dtype == torch.uint8
    check_tensor(bounds, name, dtypes=[kv_dtype, torch.uint8], ndim=3 if int8 else 4, device=device)
    want = bounds_shape(bounds.shape[0] if num_pages is None else num_pages,
                        bounds.shape[1] if num_kv_heads is None else num_kv_heads, D, int8)
    check(tuple(bounds.shape) == want,
          f"{name} must be {'int8 rows [pages, HK, 2D + 8]' if int8 else '[pages, HK, 2, D]'} = {want}, got "
          f"{tuple(bounds.shape)}")
    if int8:
        check(D in (8, 16, 32, 64, 128, 256), f"int8 bounds need head_dim in 8..256, a power of two; got {D}")
    return int8


def _threads(HK: int, D: int) -> int:
    """Whole warps (the int8 path reduces each head by shuffles), up to 256."""
    return min(256, max(32, -(-(HK * D // 8) // 32) * 32))


def page_bounds_update(k_cache: torch.Tensor, written_slots: torch.Tensor, page_key_bounds: torch.Tensor,
                       page_size: int) -> None:
    """Update ``page_key_bounds`` in place for the pages touched by ``written_slots``.

    Args:
        k_cache: ``[num_slots, HK, D]`` fp16/bf16, the layer's K pool after the new tokens were written.
        written_slots: ``[N]`` int32/int64 (SGLang's ``out_cache_loc``); slots of one page contiguous, in
            increasing offset.
        page_key_bounds: ``[num_slots // P, HK, 2, D]``, dtype of ``k_cache`` (``[..., 0, :]`` min, ``[..., 1, :]``
            max), or int8 rows ``[num_slots // P, HK, 2D + 8]`` uint8 (``bounds_dtype: int8``; the kernel variant
            is chosen by the dtype: see :func:`cupy_kernels.reference.page_bounds_update_int8`).
        page_size: P.

    Runs on the current stream, no host synchronisation; capturable in a CUDA graph.
    """
    check_tensor(k_cache, "k_cache", dtypes=list(KV_DTYPES), ndim=3)
    S, HK, D = k_cache.shape
    dev = k_cache.device
    check_tensor(written_slots, "written_slots", dtypes=[torch.int32, torch.int64], ndim=1, device=dev)
    check(S % page_size == 0, f"num_slots ({S}) must be a multiple of page_size ({page_size})")
    check(D % 8 == 0, f"head_dim must be a multiple of 8, got {D}")
    int8 = check_bounds(page_key_bounds, "page_key_bounds", k_cache.dtype, S // page_size, HK, D, dev)
    n = written_slots.numel()
    if n == 0:
        return
    fn = kernel("page_bounds.cu", "page_bounds_update", dev, KV_BF16=KV_DTYPES[k_cache.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, PAGE_SIZE=page_size, SLOTS_I64=int(written_slots.dtype == torch.int64),
                BOUNDS_INT8=int(int8))
    launch(fn, (n,), (_threads(HK, D),), (k_cache, written_slots, page_key_bounds, i32(n)), dev)



class LayerTables:
    """Device tables of the addresses of every layer's K pool and page bounds, for
    :func:`page_bounds_update_layers` (built once: SGLang's per-layer pools never move).

    Args:
        k_caches: per layer ``[num_slots, HK, D]`` fp16/bf16 (all of one shape and dtype).
        page_key_bounds: per layer ``[num_slots // P, HK, 2, D]``, dtype of the K pools, or int8 rows
            ``[num_slots // P, HK, 2D + 8]`` uint8 (all layers alike).
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
            check_bounds(b, f"page_key_bounds[{i}]", k0.dtype, S // page_size, HK, D, k0.device)
            check(b.dtype == page_key_bounds[0].dtype, f"page_key_bounds[{i}] is {b.dtype}, layer 0's is "
                                                       f"{page_key_bounds[0].dtype}")
        self.k_caches, self.page_key_bounds = list(k_caches), list(page_key_bounds)
        self.page_size, self.shape, self.dtype, self.device = page_size, (S, HK, D), k0.dtype, k0.device
        self.int8 = page_key_bounds[0].dtype == torch.uint8
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
                NUM_KV_HEADS=HK, PAGE_SIZE=tables.page_size, SLOTS_I64=int(written_slots.dtype == torch.int64),
                BOUNDS_INT8=int(tables.int8))
    launch(fn, (n, len(tables.k_caches)), (_threads(HK, D),), (tables.k_addresses, written_slots, tables.bounds_addresses,
                                                       i32(n)), dev)
