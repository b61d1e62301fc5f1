"""Side tables under SGLang's real paged allocator and radix cache (CPU tensors, reference kernels).

A request's prefix shared through the radix cache shares its page metadata; a page freed by eviction and
handed to another request is reset by that request's first write.
"""

from __future__ import annotations

from array import array

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.metadata import SparseKVMetadata  # noqa: E402

P, HK, D, PAGES = 16, 2, 64, 12


@pytest.fixture()
def pool():
    gen = torch.Generator().manual_seed(0)
    alloc = PagedTokenToKVPoolAllocator(size=PAGES * P, page_size=P, dtype=torch.bfloat16, device="cpu",
                                        kvcache=None, need_sort=False)
    cache = RadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=alloc,
                                       page_size=P))
    slots = (PAGES + 1) * P                                  # SGLang's pool holds size + page_size slots
    k_cache = torch.zeros((slots, HK, D), dtype=torch.bfloat16)
    meta = SparseKVMetadata(SparseConfig.load("twilight"), num_layers=1, num_slots=slots, num_kv_heads=HK,
                            head_dim=D, dtype=torch.bfloat16, device="cpu")

    def write(new_slots: torch.Tensor, scale: float):
        k_cache[new_slots] = (torch.randn((new_slots.numel(), HK, D), generator=gen) * scale).to(torch.bfloat16)
        meta.update_reference(0, k_cache, new_slots)

    return alloc, cache, k_cache, meta, write


def _bounds_ok(meta, k_cache, slots_in_order: torch.Tensor):
    """Every page touched by this request holds the min/max of exactly its tokens so far."""
    for page in torch.unique(slots_in_order // P).tolist():
        mine = slots_in_order[slots_in_order // P == page]
        k = k_cache[mine].float()
        assert torch.equal(meta.page_key_bounds[0][page, :, 0].float(), k.amin(0)), page
        assert torch.equal(meta.page_key_bounds[0][page, :, 1].float(), k.amax(0)), page


def test_prefix_sharing_decode_eviction_and_page_reuse(pool):
    alloc, cache, k_cache, meta, write = pool
    # Request A: a 100-token prefill, then cached (page-aligned: 96 tokens) and its partial page freed.
    a_full = alloc.alloc(7 * P)
    a = a_full[:100]
    write(a, 1.0)
    _bounds_ok(meta, k_cache, a)
    tokens_a = array("l", range(1000, 1100))
    cache.insert(InsertParams(key=RadixKey(tokens_a), value=a.clone()))
    alloc.free(a_full[96:])
    shared_before = meta.page_key_bounds[0][torch.unique(a[:80] // P)].clone()

    # Request B shares A's first 80 tokens (5 full pages) and adds 70 of its own, then decodes one token.
    tokens_b = array("l", list(range(1000, 1080)) + list(range(5000, 5070)))
    match = cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens_b)))
    assert torch.equal(match.device_indices, a[:80])
    b_new = alloc.alloc(5 * P)
    write(b_new[:70], 2.0)
    b = torch.cat([match.device_indices, b_new[:70]])
    _bounds_ok(meta, k_cache, b)
    assert torch.equal(meta.page_key_bounds[0][torch.unique(a[:80] // P)], shared_before)  # shared, untouched
    write(b_new[70:71], 3.0)                                  # decode: one slot, mid-page
    _bounds_ok(meta, k_cache, torch.cat([b, b_new[70:71]]))
    codes = meta.key_int4[0][b_new[70]]
    assert codes.any()                                        # the int4 copy follows the same writes

    # Evict A from the radix cache and free B: every page goes back to the allocator.
    assert cache.evict(EvictParams(num_tokens=10**6)).num_tokens_evicted == 96
    alloc.free(b_new)
    assert alloc.available_size() == PAGES * P

    # Request C takes every page, A's old ones included, and writes tiny keys: no page keeps A's or B's values.
    c = alloc.alloc(PAGES * P)
    assert set(torch.unique(c // P).tolist()) >= set(torch.unique(a // P).tolist())
    write(c, 0.01)
    _bounds_ok(meta, k_cache, c)
    assert meta.page_key_bounds[0][torch.unique(c // P)].float().abs().max() < 0.1
