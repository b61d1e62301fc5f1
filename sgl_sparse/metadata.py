"""Side tables of the KV pool that the sparse methods read: per-page key bounds and the int4 key copy.

They are indexed like the pool itself, by **physical** page / slot, one set per layer: a prefix shared by the
radix cache shares its metadata, and a page freed and reused is reset by its first write (offset 0).
"""

from __future__ import annotations

import torch

import cupy_kernels as ck

from .config import SparseConfig


class SparseKVMetadata:
    """Per-layer metadata of one KV pool.

    Tensors (layer ``l``):
        page_key_bounds[l]  ``[num_slots // P, HK, 2, D]``, dtype of K: channel-wise min (``[..., 0, :]``) and max
                            of the keys of each physical page (Quest, Twilight's candidates, vAttention's top-k).
                            With ``bounds_dtype: int8``: ``[num_slots // P, HK, 2 * D + 8]`` uint8, one row of
                            264 bytes (D = 128) per (page, KV head), read whole by one row of D / 8 lanes of the
                            score kernel (8-byte aligned: 8 min codes + 8 max codes + the shared (lo, scale)
                            per lane): bytes ``[0, D)`` the min codes, ``[D, 2D)`` the max codes, then fp32
                            ``lo`` and ``scale``; bound = fl(fl(code * scale) + lo), codes rounded outward (see
                            ``cupy_kernels.reference.quantize_bounds_int8``). Every writer (``update``,
                            ``update_bounds_all_layers``, the references) picks the int8 path from the table's
                            dtype.
        key_int4[l]         ``[num_slots, HK, D // 2]`` uint8, Twilight only: packed int4 keys.
        key_scale_zero[l]   ``[num_slots, HK, D // group, 2]`` float32, Twilight only: (scale, zero) per group.
        coarse_key_bounds[l] ``[num_slots // C, HK, 2, D]``, with coarse-to-fine scoring (``coarse_page_tokens``
                            C): the same bounds per C-token physical page.

    Prefill/extend: call :meth:`update` after each layer's new keys are in the pool. Decode: call
    :meth:`update_keys_int4` per layer (Twilight scores the new token with the rest of the layer's candidates) and
    :meth:`update_bounds_all_layers` once per step, after the last layer: the page that holds the new token is
    always inside the local window, which every method attends without reading its bounds, so the step's
    selection never reads the bounds it is about to change, and one launch serves every layer.
    """

    def __init__(self, config: SparseConfig, *, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        P = config.page_size
        C = config.coarse_page_tokens
        if num_slots % max(P, C):
            raise ValueError(f"KV pool size ({num_slots} slots) must be a multiple of page_size ({P}) and "
                             f"coarse_page_tokens ({C})")
        self.config = config
        self.page_size = P
        self.coarse_page_size = C
        self.num_layers = num_layers
        self.int4_group = config.int4_group or head_dim
        if config.method == "twilight":
            ck.int4_keys.check_group_size(self.int4_group, head_dim)
        # cupy_kernels.LayerTables per bounds table (by page size), built on the first all-layer update
        self._layer_tables: dict[int, ck.LayerTables] = {}
        int8 = config.bounds_dtype == "int8"
        shape = ck.page_bounds.bounds_shape(num_slots // P, num_kv_heads, head_dim, int8)
        bounds_dtype = torch.uint8 if int8 else dtype
        self.page_key_bounds = [torch.zeros(shape, dtype=bounds_dtype, device=device) for _ in range(num_layers)]
        self.coarse_key_bounds: list[torch.Tensor] = []
        if C:
            coarse = (num_slots // C, num_kv_heads, 2, head_dim)
            self.coarse_key_bounds = [torch.zeros(coarse, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_int4: list[torch.Tensor] = []
        self.key_scale_zero: list[torch.Tensor] = []
        if config.method == "twilight":
            for _ in range(num_layers):
                self.key_int4.append(torch.zeros((num_slots, num_kv_heads, head_dim // 2), dtype=torch.uint8,
                                                 device=device))
                self.key_scale_zero.append(torch.zeros((num_slots, num_kv_heads, head_dim // self.int4_group, 2),
                                                       dtype=torch.float32, device=device))

    @staticmethod
    def bounds_bytes_per_page_head(config: SparseConfig, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one (page, KV head) of ``page_key_bounds``: 2 * D elements of K's dtype, or int8 rows of
        2 * D + 8 bytes (``bounds_dtype: int8``)."""
        if config.bounds_dtype == "int8":
            return ck.reference.int8_bounds_row_bytes(head_dim)
        return 2 * head_dim * dtype.itemsize

    @staticmethod
    def bytes_per_token(config: SparseConfig, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Metadata bytes per token slot per layer (for sizing the KV pool together with its side tables)."""
        if not config.is_sparse:
            return 0
        elt = torch.empty((), dtype=dtype).element_size()
        n = num_kv_heads * SparseKVMetadata.bounds_bytes_per_page_head(config, head_dim, dtype) / config.page_size
        if config.coarse:
            n += 2 * num_kv_heads * head_dim * elt / config.coarse_page_tokens
        if config.method == "twilight":
            group = config.int4_group or head_dim
            n += num_kv_heads * (head_dim // 2 + (head_dim // group) * 8)
        return int(-(-n // 1))

    def _bounds_tables(self):
        """``(bounds per layer, page size)`` of each bounds table: the pages', and with coarse-to-fine scoring the
        coarse pages'."""
        yield self.page_key_bounds, self.page_size
        if self.coarse_key_bounds:
            yield self.coarse_key_bounds, self.coarse_page_size

    def update(self, layer: int, k_cache: torch.Tensor, written_slots: torch.Tensor) -> None:
        """Refresh the side tables of ``layer`` for ``written_slots`` (read back from ``k_cache``)."""
        for bounds, page_size in self._bounds_tables():
            ck.page_bounds_update(k_cache, written_slots, bounds[layer], page_size)
        if self.key_int4:
            ck.quantize_keys_int4(k_cache, written_slots, self.key_int4[layer], self.key_scale_zero[layer],
                                  self.int4_group)

    def update_keys_int4(self, layer: int, k_cache: torch.Tensor, written_slots: torch.Tensor) -> None:
        """Refresh Twilight's int4 key copy of ``layer`` for ``written_slots`` (nothing for other methods)."""
        if self.key_int4:
            ck.quantize_keys_int4(k_cache, written_slots, self.key_int4[layer], self.key_scale_zero[layer],
                                  self.int4_group)

    def update_bounds_all_layers(self, k_caches: list[torch.Tensor], written_slots: torch.Tensor) -> None:
        """Refresh the page bounds of every layer for ``written_slots`` in one launch (``k_caches[l]`` is layer
        l's K pool; the same tensors at every call)."""
        for bounds, page_size in self._bounds_tables():
            tables = self._layer_tables.get(page_size)
            if tables is None or any(a is not b for a, b in zip(tables.k_caches, k_caches)):
                tables = self._layer_tables[page_size] = ck.LayerTables(k_caches, bounds, page_size)
            ck.page_bounds_update_layers(tables, written_slots)

    def update_reference(self, layer: int, k_cache: torch.Tensor, written_slots: torch.Tensor) -> None:
        """Same as :meth:`update` through the torch references (CPU or GPU)."""
        for bounds, page_size in self._bounds_tables():
            ck.reference.page_bounds_update(k_cache, written_slots, bounds[layer], page_size)
        if self.key_int4:
            ck.reference.quantize_keys_int4(k_cache, written_slots, self.key_int4[layer],
                                            self.key_scale_zero[layer], self.int4_group)
