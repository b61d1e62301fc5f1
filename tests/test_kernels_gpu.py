"""GPU tests: every CuPy kernel against its torch reference (cupy_kernels.reference), and under CUDA graphs.

Shapes are drawn from seeded generators over fp16/bf16, head_dim 64/128, GQA groups 1/3/4/8, batch 1..64 and
contexts up to 128K. Run on the GPU host with ``python -m pytest -m gpu``; skipped without CUDA/CuPy.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from cupy_kernels import reference as ref
from sgl_sparse.synthetic import make_pool

pytestmark = pytest.mark.gpu

DEV = "cuda"
GROUPS = (1, 2, 3, 4, 5, 6, 7, 8)   # 7: Qwen2.5-0.5B; 3 KV heads (HK below): SmolLM2


def _cases(seed: int, n: int, max_tokens: int = 1 << 20):
    """Random (dtype, D, HK, G, P, seq_lens) draws; total tokens bounded so references stay fast."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        dtype = rnd.choice([torch.float16, torch.bfloat16])
        D = rnd.choice([64, 128])
        G = GROUPS[i % len(GROUPS)]
        HK = rnd.choice([1, 2, 3, 8])
        P = rnd.choice([1, 8, 16, 32]) if i % 3 else 16
        B = rnd.choice([1, 2, 5, 16, 33, 64])
        cap = max(1, min(32768, max_tokens // B))
        lens = [rnd.randint(1, cap) for _ in range(B)]
        if B > 2:                      # a CUDA-graph padding row (1 token) and a request shorter than a page
            lens[0], lens[1] = 1, max(1, P - 1)
        out.append((dtype, D, HK, G, P, lens))
    return out


CASES = _cases(1, 16)
LONG = [(torch.bfloat16, 128, 8, 4, 16, [131072, 77777]), (torch.float16, 64, 2, 3, 16, [131072 - 5])]


def _id(case):
    dtype, D, HK, G, P, lens = case
    return f"{str(dtype)[6:]}-D{D}-HK{HK}-G{G}-P{P}-B{len(lens)}-max{max(lens)}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bounds(pool):
    S, HK, D = pool.k_cache.shape
    return torch.zeros((S // pool.page_size, HK, 2, D), dtype=pool.k_cache.dtype, device=DEV)


# ----------------------------------------------------------------------------- 1. page metadata

def _decode_token(pool, slot_dtype):
    """Decode: one new token per request on its next slot (a fresh page at offset 0 when the page is full), its
    key spread 3x wider than the prompt's; returns the new slots ``[B]`` of ``slot_dtype``."""
    new_slots = torch.empty(pool.seq_lens.shape[0], dtype=torch.int64, device=DEV)
    pool.append_token(new_slots)
    pool.k_cache[new_slots] = (pool.k_cache[new_slots].float() * 3).to(pool.k_cache.dtype)
    return new_slots.to(slot_dtype)


def _rewrite_page(pool, page, slot_dtype):
    """Reuse: ``page`` written again from offset 0 (half a page of small keys), so its old tokens must be
    forgotten; returns the rewritten slots."""
    P = pool.page_size
    reuse = torch.arange(page * P, page * P + max(1, P // 2), device=DEV, dtype=slot_dtype)
    _, HK, D = pool.k_cache.shape
    pool.k_cache[reuse] = torch.randn((reuse.numel(), HK, D), device=DEV).mul(0.01).to(pool.k_cache.dtype)
    return reuse


def _prefill_decode_rewrite(pool, got, want, slot_dtype, after_prefill=None):
    """page_bounds_update by the kernel (into ``got``, poisoned first) and by the reference (into ``want``) through
    a prefill of every request, a decode token per request and a page rewritten from offset 0: the pages each
    touched are equal after each (``after_prefill(slots, touched)`` checks more after the first). Returns the
    rewritten page and its slots."""
    import cupy_kernels as ck
    P = pool.page_size
    got.fill_(0xA5 if got.dtype == torch.uint8 else 7.0)                            # poison
    slots = pool.written_slots.to(slot_dtype)
    ck.page_bounds_update(pool.k_cache, slots, got, P)
    ref.page_bounds_update(pool.k_cache, slots, want, P)
    touched = torch.unique(slots // P)
    assert torch.equal(got[touched], want[touched])
    if after_prefill is not None:
        after_prefill(slots, touched)

    new_slots = _decode_token(pool, slot_dtype)
    ck.page_bounds_update(pool.k_cache, new_slots, got, P)
    ref.page_bounds_update(pool.k_cache, new_slots, want, P)
    assert torch.equal(got[touched], want[touched])
    assert torch.equal(got[new_slots.long() // P], want[new_slots.long() // P])

    page = int(slots[0] // P)
    reuse = _rewrite_page(pool, page, slot_dtype)
    ck.page_bounds_update(pool.k_cache, reuse, got, P)
    ref.page_bounds_update(pool.k_cache, reuse, want, P)
    assert torch.equal(got[page], want[page])
    return page, reuse


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", CASES + LONG, ids=_id)
def test_page_bounds_prefill_decode_and_reuse(case, slot_dtype):
    """Slots as SGLang passes them (int64 out_cache_loc, read as is) and as int32; a rewritten page holds exactly
    the min/max of its new keys."""
    dtype, D, HK, G, P, lens = case
    pool = make_pool(lens, HK, D, P, dtype, DEV, _gen(11))
    got = _bounds(pool)
    page, reuse = _prefill_decode_rewrite(pool, got, _bounds(pool), slot_dtype)
    kv = pool.k_cache[reuse].float()
    assert torch.equal(got[page, :, 0].float(), kv.amin(0))
    assert torch.equal(got[page, :, 1].float(), kv.amax(0))


# ----------------------------------------------------------------------------- 2-3. Quest scores and top-k

def _query(B, HK, G, D, dtype, gen):
    return torch.randn((B, HK * G, D), generator=gen).to(dtype).to(DEV)


POISON = 12345.0


def _scored_case(case, seed, table_of, **kw):
    """A pool of ``case`` with its page-bounds table (``table_of(pool)``: bf16 or int8 rows, filled by the
    reference) and a query; quest_page_scores of every page into a poisoned buffer (max_pages + 3
    columns) and the reference's, then the kernel again with the requests of at most the median page count skipped:
    ``(pool, q, table, got, want, got_skip, skip, npg)``, npg the page count per request."""
    import cupy_kernels as ck
    dtype, D, HK, G, P, lens = case
    gen = _gen(seed)
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen)
    bounds = table_of(pool)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, bounds, P)
    q = _query(len(lens), HK, G, D, dtype, gen)
    max_pages = pool.max_pages() + 3
    args = (pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P, max_pages)
    got = torch.full((q.shape[0], bounds.shape[1], max_pages), POISON, device=DEV)
    ck.quest_page_scores(q, bounds, *args, out=got, **kw)
    want = ref.quest_page_scores(q, bounds, *args, **kw)
    npg = (pool.seq_lens.long() + P - 1) // P
    skip = int(npg.float().median().item())
    got_skip = torch.full_like(got, POISON)
    ck.quest_page_scores(q, bounds, *args, out=got_skip, skip_pages_upto=skip, **kw)
    return pool, q, bounds, got, want, got_skip, skip, npg


@pytest.mark.parametrize("case", CASES + LONG, ids=_id)
def test_quest_scores_and_topk(case):
    import cupy_kernels as ck
    P = case[4]
    pool, q, bounds, got, want, got_skip, skip, npg = _scored_case(case, 12, _bounds)
    max_pages = pool.max_pages() + 3
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all()
    assert (got[~finite] == POISON).all()            # nothing written past a request's pages
    # float32 sums of 2*D products in another order: error bounded relative to sum |q| * |bound|.
    scale = (q.float().abs().sum(-1).amax(-1).max() * bounds.float().abs().amax()).item()
    assert (got[finite] - want[finite]).abs().max().item() <= 1e-5 * scale + 1e-6

    # Requests with at most `skip` pages are not scored; the others exactly as above.
    want_skip = ref.quest_page_scores(q, bounds, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P,
                                      max_pages, skip_pages_upto=skip)
    scored = torch.isfinite(want_skip)
    assert torch.equal(scored, finite & (npg > skip)[:, None, None])
    assert torch.equal(got_skip[scored], got[scored])
    assert (got_skip[~scored] == POISON).all()

    for top_k, n_sink, n_local in [(8, 1, 2), (64, 4, 4), (512, 1, 2), (3, 0, 3)]:
        sel, cnt = ck.topk_pages(got, pool.seq_lens, P, top_k, n_sink, n_local)
        rsel, rcnt = ref.topk_pages(got, pool.seq_lens, P, top_k, n_sink, n_local)
        assert torch.equal(cnt, rcnt)
        mask = torch.arange(top_k, device=DEV)[None, None] < rcnt[..., None]
        assert torch.equal(sel[mask], rsel[mask])


@pytest.mark.parametrize("n_pages,top_k", [(9000, 512), (8192, 128), (700, 699), (513, 512), (40, 512)])
def test_topk_ties_and_sizes(n_pages, top_k):
    """Heavy ties (scores from a handful of values, negative ones too) and long rows."""
    gen = _gen(13)
    B, HK, P = 3, 4, 16
    seq = torch.tensor([n_pages * P, n_pages * P - 7, max(1, (n_pages // 2) * P)], device=DEV)
    scores = torch.randint(-3, 3, (B, HK, n_pages), generator=gen).float().to(DEV) * 0.5
    scores[1, 2] = 0.0  # all equal
    _topk_all(scores, seq, P, top_k, 2, 3)


# topk_pages holds KEYS_PER_THREAD * 512 keys of a row in registers (KEYS_PER_THREAD from max_pages, at most 16);
# longer rows run in chunks. The tests below check the kernel, its benchmark baseline (topk_pages_radix4, the
# previous kernel) and the reference on the same inputs: score distributions that take every branch of the radix
# select (start bit from the min/max of the free keys, early stop when the chosen bin holds exactly the keys still
# needed, ties at the threshold, the k-th largest key among the forced pages), resident and chunked rows in one
# launch.

TOPK_SCORE_KINDS = ("randn", "quest_like", "one_exponent", "low_bits", "ties", "ties_at_threshold", "mixed_sign",
                    "neg_inf", "all_equal")


def _topk_scores(kind: str, shape: tuple[int, int, int], gen) -> torch.Tensor:
    """[B, HK, M] float32 scores on DEV (never -0.0: the kernels order it below +0.0, the reference equal)."""
    if kind == "randn":
        x = torch.randn(shape, generator=gen)
    elif kind == "quest_like":                 # positive bounds spread over two or three exponents
        x = 80 + 10 * torch.randn(shape, generator=gen)
    elif kind == "one_exponent":               # all in [1, 2): the keys differ in the mantissa only
        x = 1 + 0.999 * torch.rand(shape, generator=gen)
    elif kind == "low_bits":                   # keys that differ in their 3 lowest bits only
        x = (torch.full(shape, 3.0).view(torch.int32) + torch.randint(0, 5, shape, generator=gen,
                                                                      dtype=torch.int32)).view(torch.float32)
    elif kind == "ties":                       # a handful of values, negative, zero and positive
        x = torch.randint(-3, 3, shape, generator=gen).float() * 0.5
    elif kind == "ties_at_threshold":          # the k-th largest has many equal pages before and after it
        x = torch.ones(shape)
        x[..., ::97] = 2.0
        x[..., 1::5] = 0.0
    elif kind == "mixed_sign":
        x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-1])
    elif kind == "neg_inf":                    # 70% -inf; one row all -inf (the threshold among them)
        x = torch.randn(shape, generator=gen)
        x[torch.rand(shape, generator=gen) < 0.7] = float("-inf")
        x[0, 0] = float("-inf")
    elif kind == "all_equal":
        x = torch.full(shape, 0.25)
    else:
        raise ValueError(kind)
    return x.float().to(DEV)


def _topk_all(scores, seq, P, top_k, n_sink, n_local, select_all_upto=0, *, reuse=None, row_top_k=None,
              reference=True):
    """topk_pages, topk_pages_radix4 and (reference=True) the reference on the same inputs (each its own copy of the
    kept rows); asserts that they agree on the counts, the selections (up to the count) and the kept rows. Returns
    topk_pages's (selected, count, kept)."""
    import cupy_kernels as ck
    from cupy_kernels.topk_pages import topk_pages_radix4
    results = []
    impls = [("topk_pages", ck.topk_pages), ("topk_pages_radix4", topk_pages_radix4)]
    for name, fn in impls + ([("reference", ref.topk_pages)] if reference else []):
        r = None if reuse is None else (reuse[0], reuse[1], reuse[2].clone(), reuse[3])
        sel, cnt = fn(scores, seq, P, top_k, n_sink, n_local, select_all_upto, reuse=r, row_top_k=row_top_k)
        results.append((name, sel, cnt, None if r is None else r[2]))
    _, sel, cnt, kept = results[0]
    for name, sel2, cnt2, kept2 in results[1:]:
        assert torch.equal(cnt, cnt2), f"counts: topk_pages vs {name}"
        mask = torch.arange(sel.shape[-1], device=DEV)[None, None] < cnt2[..., None]
        assert torch.equal(sel[mask], sel2[mask]), f"selection: topk_pages vs {name}"
        if kept is not None:
            assert torch.equal(kept, kept2), f"kept rows: topk_pages vs {name}"
    return sel, cnt, kept


@pytest.mark.parametrize("max_pages", [700, 2048, 8192, 20000])
@pytest.mark.parametrize("kind", TOPK_SCORE_KINDS)
def test_topk_pages_register_capacity_and_score_kinds(kind, max_pages):
    """Rows of every length up to max_pages in one launch: at 20000 (KEYS_PER_THREAD 16, 8192 pages in registers)
    rows of 8192 pages and less stay resident, longer ones (8193, 16384, 16385, 20000 pages) run in chunks. Budgets
    with free pages to select, with none (k = n_sink + n_local: the k-th largest key is a forced page's) and
    k = n - 1 for the longest row."""
    from cupy_kernels.topk_pages import THREADS, keys_per_thread
    gen = _gen(41)
    P, HK = 16, 3
    pages = sorted({min(max_pages, n) for n in (max_pages, max_pages - 1, 20000, 16385, 16384, 8193, 8192, 2049,
                                               2048, 700, 513, 130, 9, 3)}, reverse=True)
    offsets = torch.randint(0, P, (len(pages),), generator=gen)
    seq = torch.tensor([n * P - int(o) for n, o in zip(pages, offsets)], device=DEV)
    scores = _topk_scores(kind, (len(pages), HK, max_pages), gen)
    capacity = keys_per_thread(max_pages) * THREADS
    assert capacity >= min(max_pages, 8192) and (max_pages <= 8192 or max(pages) > capacity)   # both paths
    for top_k, n_sink, n_local in [(128, 1, 2), (512, 4, 4), (3, 1, 2), (8, 4, 4), (max_pages - 1, 1, 2)]:
        _, cnt, _ = _topk_all(scores, seq, P, top_k, n_sink, n_local)
        assert cnt[0].tolist() == [min(top_k, pages[0])] * HK


@pytest.mark.parametrize("max_pages", [2048, 20000])
def test_topk_pages_nan_and_inf_as_the_baseline(max_pages):
    """Non-finite scores, byte for byte as the previous kernel (the reference orders NaN otherwise): +inf, the NaN
    whose key is the forced pages' (0x7fffffff: when the k-th largest key is that one, the forced pages compete
    with those NaN pages in page order, in both kernels) and the canonical NaN."""
    gen = _gen(47)
    P, HK = 16, 4
    pages = [max_pages, max_pages - 5, 2048, 700]
    seq = torch.tensor([n * P for n in pages], device=DEV)
    scores = torch.randn((len(pages), HK, max_pages), generator=gen)
    u = torch.rand(scores.shape, generator=gen)
    bits = scores.view(torch.int32)
    bits[u < 0.3] = 0x7fffffff
    bits[(u >= 0.3) & (u < 0.35)] = 0x7fc00000
    scores[(u >= 0.35) & (u < 0.4)] = float("inf")
    scores[:, 1, :] = torch.where(u[:, 1] < 0.02, scores[:, 1], float("-inf"))   # few finite
    scores = scores.to(DEV)
    for top_k, n_sink, n_local in [(128, 1, 2), (600, 2, 3), (3, 1, 2)]:
        _topk_all(scores, seq, P, top_k, n_sink, n_local, reference=False)


@pytest.mark.parametrize("long_pages", [3000, 20000])
def test_topk_pages_row_budgets_and_reuse_past_register_capacity(long_pages):
    """row_top_k (k = n - 1, k = n_sink + n_local, k = n_sink + n_local + 1, a budget within the row's pages) on
    resident and chunked rows, writing the kept rows; then a reusing step reading them back and appending the new
    pages; the three implementations agree on both steps."""
    gen = _gen(43)
    P, HK, top_k, extra = 16, 4, 1000, 3
    pages = [long_pages, 1001, 9000, 8193, 2048, 40]
    seq = torch.tensor([n * P for n in pages], device=DEV)
    B = len(pages)
    scores = _topk_scores("ties", (B, HK, max(pages)), gen)
    scores[2] = _topk_scores("one_exponent", (1, HK, max(pages)), gen)[0]
    row_k = torch.tensor([top_k, 1000, 3, 4, 517, 64], dtype=torch.int32, device=DEV)   # row 1: k = n - 1
    rpi = torch.tensor([5, 0, 2, 7, 1, 3], dtype=torch.int32, device=DEV)
    kept = torch.full((8, HK, top_k), -1, dtype=torch.int32, device=DEV)
    zero = torch.zeros(B, dtype=torch.int32, device=DEV)
    _, cnt, kept = _topk_all(scores, seq, P, top_k, 1, 2, reuse=(rpi, zero, kept, extra), row_top_k=row_k)
    assert cnt[:, 0].tolist() == [top_k, 1000, 3, 4, 517, 40]
    grown = seq + 2 * P
    reuse_from = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.int32, device=DEV) * seq.to(torch.int32)
    _, cnt2, _ = _topk_all(scores, grown, P, top_k, 1, 2, reuse=(rpi, reuse_from, kept, extra), row_top_k=row_k)
    assert cnt2[:4, 0].tolist() == [top_k + 2, 1000 + 2, 3 + 2, 4 + 2]


@pytest.mark.parametrize("select_all_upto", [0, 100, 300])
def test_topk_dense_fallback_for_short_requests(select_all_upto):
    import cupy_kernels as ck
    gen = _gen(19)
    P, top_k = 16, 64
    seq = torch.tensor([64 * P, 65 * P, 99 * P + 3, 100 * P, 100 * P + 1, 5000 * P], device=DEV)
    scores = torch.randn((6, 2, 5000), generator=gen).to(DEV)
    sel, cnt = ck.topk_pages(scores, seq, P, top_k, 1, 2, select_all_upto=select_all_upto)
    rsel, rcnt = ref.topk_pages(scores, seq, P, top_k, 1, 2, select_all_upto=select_all_upto)
    W = max(top_k, select_all_upto)
    assert sel.shape[-1] == W
    assert torch.equal(cnt, rcnt)
    mask = torch.arange(W, device=DEV)[None, None] < rcnt[..., None]
    assert torch.equal(sel[mask], rsel[mask])
    n_pages = (seq + P - 1) // P
    assert torch.equal(cnt[:, 0].long(), torch.where(n_pages <= W, n_pages, top_k))


@pytest.mark.parametrize("select_all_upto", [0, 100])
def test_topk_pages_per_request_budgets(select_all_upto):
    """row_top_k: every request its own k (ties, long and short rows, one within its own k), then a reusing step
    reading back k kept pages per row, all as the reference."""
    import cupy_kernels as ck
    gen = _gen(23)
    P, top_k, HK = 16, 64, 3
    seq = torch.tensor([3000 * P, 40 * P + 3, 900 * P, 120 * P, 5 * P], device=DEV)
    scores = (torch.randint(-4, 4, (5, HK, 3000), generator=gen).float() * 0.25).to(DEV)
    row_k = torch.tensor([64, 48, 5, 17, 5], dtype=torch.int32, device=DEV)
    kept = torch.full((8, HK, top_k), -1, dtype=torch.int32, device=DEV)
    rkept = kept.clone()
    rpi = torch.tensor([7, 0, 3, 5, 1], dtype=torch.int32, device=DEV)
    zero = torch.zeros(5, dtype=torch.int32, device=DEV)
    sel, cnt = ck.topk_pages(scores, seq, P, top_k, 2, 3, select_all_upto, row_top_k=row_k,
                             reuse=(rpi, zero, kept, 2))
    rsel, rcnt = ref.topk_pages(scores, seq, P, top_k, 2, 3, select_all_upto, row_top_k=row_k,
                                reuse=(rpi, zero, rkept, 2))
    assert torch.equal(cnt, rcnt) and torch.equal(kept, rkept)
    mask = torch.arange(sel.shape[-1], device=DEV)[None, None] < rcnt[..., None]
    assert torch.equal(sel[mask], rsel[mask])
    assert cnt[0].tolist() == [64] * HK and cnt[2].tolist() == [5] * HK and cnt[4].tolist() == [5] * HK
    grown = seq + P
    # the rows that selected (not row 4: 5 pages, it kept them all), planned two pages before their kept pages
    # end (a drift re-selection since), with stale entries past each row's k: only the own k-th page counts
    reuse_from = torch.where(cnt[:, 0] == row_k, seq - 2 * P, 0).to(torch.int32)
    reuse_from[4] = 0
    for b in (2, 3):
        slot, k = int(rpi[b]), int(row_k[b])
        kept[slot, :, k:] = 10
        rkept[slot, :, k:] = 10
    sel2, cnt2 = ck.topk_pages(scores, grown, P, top_k, 2, 3, select_all_upto, row_top_k=row_k,
                               reuse=(rpi, reuse_from, kept, 2))
    rsel2, rcnt2 = ref.topk_pages(scores, grown, P, top_k, 2, 3, select_all_upto, row_top_k=row_k,
                                  reuse=(rpi, reuse_from, rkept, 2))
    assert torch.equal(cnt2, rcnt2)
    mask = torch.arange(sel2.shape[-1], device=DEV)[None, None] < rcnt2[..., None]
    assert torch.equal(sel2[mask], rsel2[mask])


def _page_table(seq_lens, max_reqs, P, gen):
    """req_to_token [max_reqs, max_len] int32 whose slot rows map each request's pages to shuffled physical pages."""
    max_len = int(seq_lens.max()) + P
    pages = -(-max_len // P)
    phys = torch.randperm(max_reqs * pages, generator=gen).view(max_reqs, pages)
    t = torch.arange(max_len)
    return (phys[:, t // P] * P + t % P).int().to(DEV)


def _fused_rows_match(scores, seq, P, top_k, n_sink, n_local, fit, r2t, rpi, **kw):
    """topk_pages writing FlashInfer's rows itself gives the selection and the rows that page_rows writes from the
    unfused selection (indptr, page indices up to indptr[R], last page lengths, token counts)."""
    import cupy_kernels as ck
    reuse = kw.pop("reuse", None)
    fused_reuse = unfused_reuse = None
    if reuse is not None:                        # each call updates its own kept table
        fused_reuse = (rpi, reuse[1], reuse[2].clone(), reuse[3])
        unfused_reuse = (rpi, reuse[1], reuse[2].clone(), reuse[3])
    sel, cnt = ck.topk_pages(scores, seq, P, top_k, n_sink, n_local, fit, reuse=unfused_reuse, **kw)
    want = ck.page_rows(sel, cnt, r2t, rpi, seq, P)
    B, HK, W = sel.shape
    R = B * HK
    got = (torch.full((R + 1,), -7, dtype=torch.int32, device=DEV), torch.full((R * W,), -7, dtype=torch.int32,
                                                                              device=DEV),
           torch.full((R,), -7, dtype=torch.int32, device=DEV), torch.full((B, HK), -7, dtype=torch.int32, device=DEV))
    fsel, fcnt = ck.topk_pages(scores, seq, P, top_k, n_sink, n_local, fit, reuse=fused_reuse,
                               page_rows_out=(r2t, rpi, *got), **kw)
    assert torch.equal(fcnt, cnt)
    mask = torch.arange(W, device=DEV)[None, None] < cnt[..., None]
    assert torch.equal(fsel[mask], sel[mask])
    if reuse is not None:
        assert torch.equal(fused_reuse[2], unfused_reuse[2])
    total = int(want[0][-1])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][:total], want[1][:total])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    return cnt


@pytest.mark.parametrize("select_all_upto", [0, 100])
def test_topk_pages_writes_flashinfer_rows(select_all_upto):
    """page_rows_out: the same rows as page_rows of the same selection, for short rows (every page), selecting
    rows with their own budgets, reusing rows (kept pages + pages since, a drift re-selection's later last page),
    a row longer than the registers hold (chunks) and a one-row batch."""
    gen = _gen(41)
    P, top_k, HK = 16, 64, 3
    seq = torch.tensor([3000 * P, 40 * P + 3, 900 * P, 120 * P, 5 * P], device=DEV)
    scores = (torch.randint(-4, 4, (5, HK, 3000), generator=gen).float() * 0.25).to(DEV)
    row_k = torch.tensor([64, 48, 5, 17, 5], dtype=torch.int32, device=DEV)
    rpi = torch.tensor([7, 0, 3, 5, 1], dtype=torch.int32, device=DEV)
    r2t = _page_table(seq + 4 * P, 8, P, gen)
    kept = torch.full((8, HK, top_k), -1, dtype=torch.int32, device=DEV)
    zero = torch.zeros(5, dtype=torch.int32, device=DEV)
    cnt = _fused_rows_match(scores, seq, P, top_k, 2, 3, select_all_upto, r2t, rpi, row_top_k=row_k)
    _fused_rows_match(scores, seq, P, top_k, 2, 3, select_all_upto, r2t, rpi, row_top_k=row_k,
                      reuse=(rpi, zero, kept, 2))
    # reusing rows: kept pages from a selection (ascending), the planned selection two pages before its end, one
    # head of row 2 (900 pages then, 904 now) selected again since, its last kept page a later one (901)
    import cupy_kernels as ck
    ck.topk_pages(scores, seq, P, top_k, 2, 3, select_all_upto, row_top_k=row_k, reuse=(rpi, zero, kept, 2))
    kept[3, 1, int(row_k[2]) - 1] = 901
    reuse_from = torch.where(cnt[:, 0] == row_k, seq - 2 * P, 0).to(torch.int32)
    reuse_from[4] = 0
    _fused_rows_match(scores, seq + 3 * P + 5, P, top_k, 2, 3, select_all_upto, r2t, rpi, row_top_k=row_k,
                      reuse=(rpi, reuse_from, kept, 4))
    # chunks: 9000 pages a row (the registers hold 8192), no per-request budgets
    long_seq = torch.tensor([9000 * P - 5, 7000 * P], device=DEV)
    long_scores = torch.randn((2, 2, 9000), generator=gen).to(DEV)
    long_r2t = _page_table(long_seq, 2, P, gen)
    _fused_rows_match(long_scores, long_seq, P, 512, 1, 4, 0, long_r2t,
                      torch.tensor([1, 0], dtype=torch.int32, device=DEV))
    one = torch.tensor([300 * P], device=DEV)
    _fused_rows_match(torch.randn((1, 1, 300), generator=gen).to(DEV), one, P, 32, 1, 2, 0,
                      _page_table(one, 1, P, gen), torch.zeros(1, dtype=torch.int32, device=DEV))


def test_topk_pages_rows_need_the_reuse_request_slots():
    """page_rows_out and reuse read one req_pool_indices: two different tensors are refused."""
    import cupy_kernels as ck
    seq = torch.tensor([64 * 16], device=DEV)
    rpi = torch.zeros(1, dtype=torch.int32, device=DEV)
    bufs = (torch.zeros(2, dtype=torch.int32, device=DEV), torch.zeros(64, dtype=torch.int32, device=DEV),
            torch.zeros(1, dtype=torch.int32, device=DEV), torch.zeros((1, 1), dtype=torch.int32, device=DEV))
    reuse = (rpi, torch.zeros(1, dtype=torch.int32, device=DEV), torch.zeros((1, 1, 8), dtype=torch.int32,
                                                                           device=DEV), 0)
    with pytest.raises(ValueError, match="share req_pool_indices"):
        ck.topk_pages(torch.zeros((1, 1, 64), device=DEV), seq, 16, 8, 1, 1, reuse=reuse,
                      page_rows_out=(_page_table(seq, 1, 16, _gen(1)), rpi.clone(), *bufs))


@pytest.mark.parametrize("int8", [False, True], ids=["bf16_bounds", "int8_bounds"])
def test_topk_pages_reuse_and_scores_skip_rows(int8):
    """Rows reusing a kept selection: not scored (bf16 bounds, and int8 rows as quest-fast stores them), their kept
    pages plus every page written since; selecting rows keep their selection in their request slot (as the
    reference)."""
    import cupy_kernels as ck
    gen = _gen(21)
    dtype, D, HK, G, P = torch.bfloat16, 128, 8, 4, 16
    lens = [40000, 3000, 20017, 33333, 5000, 100]
    B = len(lens)
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen)
    bounds = _bounds_int8(pool) if int8 else _bounds(pool)
    ck.page_bounds_update(pool.k_cache, pool.written_slots, bounds, P)
    q = torch.randn((B, HK * G, D), generator=gen).to(dtype).to(DEV)
    top_k, extra, fit = 64, 2, 200
    max_reqs = int(pool.req_to_token.shape[0])
    kept = torch.sort(torch.randint(0, 1200, (max_reqs, HK, top_k), generator=gen), -1).values.int().to(DEV)
    # heads 0-3 of row 2's slot selected again (drift test) at page 1251: they append only what follows it
    kept[int(pool.req_pool_indices[2]), :4, -1] = 1250
    reuse_from = torch.tensor([0, 0, 20000, 33330, 0, 0], dtype=torch.int32, device=DEV)
    rpi = pool.req_pool_indices.to(torch.int32)
    args = (q, bounds, pool.req_to_token, rpi, pool.seq_lens, P, pool.max_pages())
    scores = ck.quest_page_scores(*args, out=torch.full((B, HK, pool.max_pages()), 7.0, device=DEV),
                                  skip_pages_upto=fit, skip_rows=reuse_from)
    rscores = ref.quest_page_scores(*args, skip_pages_upto=fit, skip_rows=reuse_from)
    assert (scores[[1, 2, 3, 5]] == 7.0).all()                         # fits, reused, reused, fits: not written
    # int8 rows: lo * sum(q) + scale * (codes . q) sums larger terms; the int8 score tests' bound
    slack = 1e-5 * (q.float().abs().sum(-1).amax() * ref.dequantize_bounds_int8(bounds).abs().amax()).item() + 1e-6 \
        if int8 else None
    for b in (0, 4):
        n = -(-lens[b] // P)
        if int8:
            assert (scores[b, :, :n] - rscores[b, :, :n]).abs().max().item() <= slack
        else:
            assert torch.allclose(scores[b, :, :n], rscores[b, :, :n], rtol=1e-5, atol=1e-3)
    rkept = kept.clone()
    sel, cnt = ck.topk_pages(rscores, pool.seq_lens, P, top_k, 1, 4, select_all_upto=fit,
                             reuse=(rpi, reuse_from, kept, extra))
    rsel, rcnt = ref.topk_pages(rscores, pool.seq_lens, P, top_k, 1, 4, select_all_upto=fit,
                                reuse=(rpi, reuse_from, rkept, extra))
    assert torch.equal(cnt, rcnt) and torch.equal(kept, rkept)
    mask = torch.arange(sel.shape[-1], device=DEV)[None, None] < rcnt[..., None]
    assert torch.equal(sel[mask], rsel[mask])
    assert cnt[2].tolist() == [top_k + 1] * 4 + [top_k + 2] * (HK - 4) and cnt[3].tolist() == [top_k] * HK


@pytest.mark.parametrize("dtype,D,HK,G", [(torch.bfloat16, 128, 8, 4), (torch.float16, 64, 2, 7),
                                          (torch.bfloat16, 128, 3, 1), (torch.bfloat16, 256, 1, 8)])
def test_reuse_drift(dtype, D, HK, G):
    """The drift test per row as the reference: the same reuse decisions (cosines spread around the threshold,
    none within 1e-3 of it), the same queries stored for the selecting rows, rows within the budget (a padding row
    on slot 0, another request's) untouched."""
    import cupy_kernels as ck
    gen = _gen(31)
    B, max_reqs = 9, 12
    q = torch.randn((B, HK * G, D), generator=gen).to(dtype)
    mean = q.float().view(B, HK, G, D).mean(2)
    noise = torch.randn((B, HK, D), generator=gen)
    noise -= (noise * mean).sum(-1, keepdim=True) / (mean * mean).sum(-1, keepdim=True) * mean   # orthogonal
    # stored = cos * mean/|mean| + sin * noise/|noise|: cosine `cos` per (row, head)
    cos = torch.tensor([0.9, 0.2, 0.55, 0.45, 0.99, -0.3, 0.8, 0.7, 0.1]).view(B, 1).expand(B, HK).clone()
    cos[2, -1] = 0.3                                           # one head below: the row selects
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)         # noqa: E731
    stored = cos[..., None] * unit(mean) + (1 - cos[..., None] ** 2).sqrt() * unit(noise)
    rpi = torch.tensor([3, 0, 5, 7, 1, 2, 11, 4, 3], dtype=torch.int32)
    kept = torch.randn((max_reqs, HK, D), generator=gen).to(dtype)
    kept[rpi[:-1].long()] = (stored[:-1] * 3).to(dtype)
    # row 8 fits its budget, on the slot of row 0 (which reuses): it must neither reuse nor store there
    fits = torch.tensor([False] * 8 + [True])
    reuse_from = torch.tensor([40, 41, 42, 43, 0, 45, 46, 47, 48], dtype=torch.int32)
    rkept = kept.clone()
    want = ref.reuse_drift(q, rpi, fits, reuse_from, rkept, 0.5)
    assert want.tolist() == [40, 0, 0, 0, 0, 0, 46, 47, 0]
    dkept = kept.to(DEV)
    got = ck.reuse_drift(q.to(DEV), rpi.to(DEV), fits.to(DEV), reuse_from.to(DEV), dkept, 0.5)
    assert got.tolist() == want.tolist()
    torch.testing.assert_close(dkept.cpu().float(), rkept.float(), rtol=1e-2, atol=1e-3)
    assert torch.equal(dkept.cpu()[[3, 11, 4]], kept[[3, 11, 4]])          # reused (slot 3 also row 8's): unchanged
    assert not torch.equal(dkept.cpu()[0], kept[0])                        # row 1 (slot 0) selected: stored


@pytest.mark.parametrize("R,cap", [(1, 1), (7, 33), (512, 4096), (4096, 64)])
def test_compact_kv_rows(R, cap):
    import cupy_kernels as ck
    gen = _gen(20)
    rows = torch.randint(0, 2**30, (R, cap), generator=gen, dtype=torch.int32).to(DEV)
    counts = torch.randint(0, cap + 1, (R,), generator=gen, dtype=torch.int32).to(DEV)
    counts[0] = 0
    counts[-1] = cap
    indptr, flat = ck.compact_kv_rows(rows, counts)
    rindptr, rflat = ref.compact_kv_rows(rows, counts)
    assert torch.equal(indptr, rindptr)
    total = int(rindptr[-1])
    assert torch.equal(flat[:total], rflat[:total])


@pytest.mark.parametrize("case", CASES[:6] + LONG[:1], ids=_id)
def test_pages_to_kv_indices(case):
    import cupy_kernels as ck
    dtype, D, HK, G, P, lens = case
    gen = _gen(14)
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen)
    scores = torch.randn((len(lens), HK, pool.max_pages()), generator=gen).to(DEV)
    top_k = 37
    sel, cnt = ck.topk_pages(scores, pool.seq_lens, P, top_k, 1, 2)
    kv, nkv = ck.pages_to_kv_indices(sel, cnt, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P,
                                     top_k * P + 5)
    rkv, rnkv = ref.pages_to_kv_indices(sel, cnt, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P,
                                        top_k * P + 5)
    assert torch.equal(nkv, rnkv)
    mask = torch.arange(kv.shape[-1], device=DEV)[None, None] < rnkv[..., None]
    assert torch.equal(kv[mask], rkv[mask])


@pytest.mark.parametrize("case", CASES[:6] + LONG[:1], ids=_id)
def test_page_rows(case):
    import cupy_kernels as ck
    dtype, D, HK, G, P, lens = case
    gen = _gen(15)
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen)
    scores = torch.randn((len(lens), HK, pool.max_pages()), generator=gen).to(DEV)
    sel, cnt = ck.topk_pages(scores, pool.seq_lens, P, 37, 1, 2, select_all_upto=40)
    args = (pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P)
    R = len(lens) * HK
    poisoned = (torch.full((R + 1,), -7, dtype=torch.int32, device=DEV),
                torch.full((R * 40,), -7, dtype=torch.int32, device=DEV),
                torch.full((R,), -7, dtype=torch.int32, device=DEV),
                torch.full((len(lens), HK), -7, dtype=torch.int32, device=DEV))
    indptr, indices, last, ntok = ck.page_rows(sel, cnt, *args, out=poisoned)
    rindptr, rindices, rlast, rntok = ref.page_rows(sel, cnt, *args)
    assert torch.equal(indptr, rindptr) and torch.equal(last, rlast) and torch.equal(ntok, rntok)
    total = int(rindptr[-1])
    assert torch.equal(indices[:total], rindices[:total])


@pytest.mark.parametrize("case", CASES + LONG, ids=_id)
def test_token_rows(case):
    """token_rows == the reference (every request's slots back to back), int32 and int64 batch indices; the
    buffer past the batch's tokens untouched; requests longer than one block's chunk, of one token and shorter
    than a page (CASES) included."""
    import cupy_kernels as ck
    dtype, D, HK, G, P, lens = case
    pool = make_pool(lens, HK, D, P, dtype, DEV, _gen(16))
    total = sum(lens)
    for rpi, sl in ((pool.req_pool_indices, pool.seq_lens),
                    (pool.req_pool_indices.to(torch.int32), pool.seq_lens.to(torch.int32))):
        out = torch.full((total + 5,), -7, dtype=torch.int32, device=DEV)
        ck.token_rows(pool.req_to_token, rpi, sl, max(lens), out=out)
        assert torch.equal(out[:total], ref.token_rows(pool.req_to_token, rpi, sl))
        assert (out[total:] == -7).all()
    guarded = torch.full((total + 5,), -7, dtype=torch.int32, device=DEV)
    cut = max(0, total - 3)                                  # a buffer shorter than the batch: its head only
    ck.token_rows(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, max(lens), out=guarded[:cut])
    assert torch.equal(guarded[:cut], ref.token_rows(pool.req_to_token, pool.req_pool_indices, pool.seq_lens)[:cut])
    assert (guarded[cut:] == -7).all()


# ----------------------------------------------------------------------------- 4-6. Twilight kernels

def _int4_tables(pool, group):
    S, HK, D = pool.k_cache.shape
    return (torch.full((S, HK, D // 2), 0xAB, dtype=torch.uint8, device=DEV),
            torch.full((S, HK, D // group, 2), float("nan"), dtype=torch.float32, device=DEV))


@pytest.mark.parametrize("case", CASES + LONG[:1], ids=_id)
@pytest.mark.parametrize("group_choice", [0, 1])
def test_int4_quantize_scores_top_p(case, group_choice):
    import cupy_kernels as ck
    dtype, D, HK, G, P, lens = case
    group = [D, 32][group_choice]
    gen = _gen(15 + group_choice)
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen, kv_scale=2.5)
    slots = pool.written_slots
    codes, sz = _int4_tables(pool, group)
    rcodes, rsz = _int4_tables(pool, group)
    ck.quantize_keys_int4(pool.k_cache, slots, codes, sz, group)
    ref.quantize_keys_int4(pool.k_cache, slots, rcodes, rsz, group)
    assert torch.equal(codes[slots], rcodes[slots])
    assert torch.equal(sz[slots], rsz[slots])
    codes32, sz32 = _int4_tables(pool, group)
    ck.quantize_keys_int4(pool.k_cache, slots.to(torch.int32 if slots.dtype == torch.int64 else torch.int64),
                          codes32, sz32, group)                              # the other slot dtype
    assert torch.equal(codes32, codes)
    torch.testing.assert_close(sz32, sz, rtol=0, atol=0, equal_nan=True)   # unwritten rows keep their NaN poison

    # Candidates: tokens of random pages per (request, head), variable counts (some empty).
    B = len(lens)
    scores = torch.randn((B, HK, pool.max_pages()), generator=gen).to(DEV)
    top_k = 24
    sel, cnt = ck.topk_pages(scores, pool.seq_lens, P, top_k, 1, 1)
    cap = top_k * P
    cand, ncand = ck.pages_to_kv_indices(sel, cnt, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P, cap)
    ncand[0, 0] = 0
    q = _query(B, HK, G, D, dtype, gen)
    sm = 1 / math.sqrt(D)
    logits, probs = ck.int4_candidate_scores(q, codes, sz, cand, ncand, sm)
    rlogits, rprobs = ref.int4_candidate_scores(q, codes, sz, cand, ncand, sm)
    valid = torch.arange(cap, device=DEV)[None, None] < ncand[..., None]
    q_int, q_scale = ref.quantize_query_int8(q)
    # float32 reassociation of exact integer sums: bounded by sm * q_scale * sum|q_int| * max|k_hat| * 1e-6.
    kmax = ref.dequantize_keys_int4(codes[slots], sz[slots]).abs().max().item()
    lscale = sm * (q_scale[..., None] * q_int.abs().sum(-1, keepdim=True)).max().item() * kmax
    lg_err = (logits - rlogits).abs().masked_fill(~valid[:, :, None], 0).max().item()
    assert lg_err <= 2e-6 * lscale + 1e-6
    pr_err = ((probs - rprobs).abs() / (rprobs + 1e-30)).masked_fill(~valid, 0).max().item()
    assert pr_err <= 1e-4
    assert torch.allclose(probs.masked_fill(~valid, 0).sum(-1)[ncand > 0], torch.ones((), device=DEV), atol=1e-4)

    for top_p in (0.5, 0.9, 0.99, 1.0, 1e-6):
        kept, nkept = ck.top_p_select(probs, ncand, top_p, candidate_ids=cand)
        pos, npos = ck.top_p_select(probs, ncand, top_p)
        assert torch.equal(nkept, npos)
        _check_top_p(probs, ncand, top_p, pos, npos)
        kmask = torch.arange(cap, device=DEV)[None, None] < npos[..., None]
        safe_pos = torch.where(kmask, pos, torch.zeros_like(pos)).long()
        assert torch.equal(kept[kmask], torch.gather(cand, 2, safe_pos)[kmask])
        rkept, rn = ref.top_p_select(probs, ncand, top_p, candidate_ids=cand)
        # Exact agreement, except on rows where the float32 (kernel) and float64 (reference) mass sums
        # straddle the target: there the kernel's set minus its threshold tie group holds the target mass
        # up to float32 summation error.
        for b, h in torch.nonzero(nkept != rn).tolist():
            p = probs[b, h, : int(ncand[b, h])].double()
            kept_p = p[pos[b, h, : int(npos[b, h])].long()]
            target = top_p * p.sum()
            without_ties = kept_p[kept_p > kept_p.min()].sum()
            assert abs(without_ties - target) <= 1e-5 * p.sum() or abs(kept_p.sum() - target) <= 1e-5 * p.sum(), \
                (top_p, b, h, int(nkept[b, h]), int(rn[b, h]))


def _check_top_p(probs, ncand, top_p, pos, npos):
    B, HK, C = probs.shape
    for b in range(B):
        for h in range(HK):
            n = int(ncand[b, h])
            k = int(npos[b, h])
            p = probs[b, h, :n].double()
            if n == 0:
                assert k == 0
                continue
            kept = pos[b, h, :k].long()
            assert torch.all(kept[1:] > kept[:-1]), "kept positions must ascend"
            if top_p >= 1:
                assert k == n
                continue
            total = p.sum()
            mass = p[kept].sum()
            assert mass >= top_p * total * (1 - 1e-5)
            tau = p[kept].min()
            assert torch.equal(torch.nonzero(p >= tau).flatten(), kept), "kept set must be {p >= tau}"
            assert p[p > tau].sum() < top_p * total * (1 + 1e-5), "set must be minimal (tie group at tau)"


@pytest.mark.parametrize("n,top_p", [(1, 0.5), (7, 0.9), (4096, 0.95), (49000, 0.9)])
def test_top_p_shapes(n, top_p):
    import cupy_kernels as ck
    gen = _gen(16)
    logits = torch.randn((2, 3, n), generator=gen) * 3
    probs = torch.softmax(logits, -1).to(DEV)
    probs[1, 1] = 1.0 / n  # all equal
    ncand = torch.full((2, 3), n, dtype=torch.int32, device=DEV)
    pos, npos = ck.top_p_select(probs, ncand, top_p)
    _check_top_p(probs, ncand, top_p, pos, npos)
    # keep_all (Twilight's dense fallback): request 1's rows keep every candidate, request 0's are pruned as before
    keep_all = torch.tensor([False, True], device=DEV)
    pos2, npos2 = ck.top_p_select(probs, ncand, top_p, keep_all=keep_all)
    for h in range(3):
        k = int(npos[0, h])
        assert int(npos2[0, h]) == k and torch.equal(pos2[0, h, :k], pos[0, h, :k])
    assert (npos2[1] == n).all()
    assert torch.equal(pos2[1, :, :n].cpu(), torch.arange(n, dtype=torch.int32).expand(3, n))


# ----------------------------------------------------------------------------- 7. vAttention sampling

def _deterministic_attention(q, pool, sel, cnt, sm):
    """float64 o_det / lse_det (base 2) over the selected pages, per query head."""
    B, HQ, D = q.shape
    HK = pool.k_cache.shape[1]
    G = HQ // HK
    P = pool.page_size
    o = torch.zeros((B, HQ, D), dtype=torch.float64, device=DEV)
    lse = torch.zeros((B, HQ), dtype=torch.float64, device=DEV)
    for b in range(B):
        row = pool.req_to_token[int(pool.req_pool_indices[b])].long()
        L = int(pool.seq_lens[b])
        for h in range(HK):
            pages = sel[b, h, : int(cnt[b, h])].long()
            pos = (pages[:, None] * P + torch.arange(P, device=DEV)).flatten()
            slots = row[pos[pos < L]]
            k = pool.k_cache[slots, h].double()
            v = pool.v_cache[slots, h].double()
            lg = sm * (q[b, h * G:(h + 1) * G].double() @ k.T)
            o[b, h * G:(h + 1) * G] = torch.softmax(lg, -1) @ v
            lse[b, h * G:(h + 1) * G] = torch.logsumexp(lg, -1) / math.log(2)
    return o.to(q.dtype), lse.float()


VATT_CASES = [c for c in CASES if max(c[5]) >= 64][:6] + [(torch.bfloat16, 128, 8, 4, 16, [131072, 40000])]


@pytest.mark.parametrize("case", VATT_CASES, ids=_id)
@pytest.mark.parametrize("epsilon,delta,base_rate", [(0.05, 0.05, 0.02), (0.5, 0.3, 0.05), (0.001, 0.01, 0.01)])
def test_vattention_sample(case, epsilon, delta, base_rate):
    import cupy_kernels as ck
    dtype, D, HK, G, P, lens = case
    gen = _gen(17)
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen)
    B = len(lens)
    q = _query(B, HK, G, D, dtype, gen)
    sm = 1 / math.sqrt(D)
    scores = torch.randn((B, HK, pool.max_pages()), generator=gen).to(DEV)
    top_k = max(3, min(64, pool.max_pages() // 4))
    sel, cnt = ck.topk_pages(scores, pool.seq_lens, P, top_k, 1, 2)
    o_det, lse_det = _deterministic_attention(q, pool, sel, cnt, sm)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen).to(DEV)
    capacity = 4096
    args = (q, pool.k_cache, pool.v_cache, sel, cnt, pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
            seeds, lse_det, o_det, P, sm, epsilon, delta, base_rate, capacity)
    kv, n, w, req = ck.vattention_sample(*args)
    rkv, rn, rw, rreq = ref.vattention_sample(*args)
    # The sample size comes from float32 sums on the GPU and float64 in the reference.
    assert ((req.double() - rreq.double()).abs() <= 1e-3 * rreq.double() + 2).all()
    for b in range(B):
        for h in range(HK):
            k_, r_ = int(n[b, h]), int(rn[b, h])
            if k_ == r_:
                assert torch.equal(kv[b, h, :k_], rkv[b, h, :r_])
                assert w[b, h].item() == pytest.approx(rw[b, h].item(), rel=1e-6)
            else:  # straddling a rounding edge: both draw the same stream
                m = min(k_, r_)
                assert abs(k_ - r_) <= 1e-3 * max(k_, r_) + 2
                if w[b, h] != 1 and rw[b, h] != 1:
                    assert torch.equal(kv[b, h, :m], rkv[b, h, :m])
    # Reproducible from the seed, different with another.
    kv2, n2, _, _ = ck.vattention_sample(*args)
    filled = torch.arange(capacity, device=DEV)[None, None] < n[..., None]
    assert torch.equal(n, n2) and torch.equal(kv[filled], kv2[filled])
    args3 = list(args)
    args3[8] = seeds + 1
    kv3, n3, w3, _ = ck.vattention_sample(*args3)
    sampled = (w != 1) & (n > 0) & (n3 == n)
    if sampled.any():
        differs = [not torch.equal(kv[b, h, : int(n[b, h])], kv3[b, h, : int(n[b, h])])
                   for b, h in torch.nonzero(sampled).tolist()]
        assert all(differs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,HK,G", [(128, 8, 4), (64, 2, 3), (128, 1, 8), (64, 4, 1)])
def test_vattention_merge(dtype, D, HK, G):
    """The fused merge equals the reference's masks + weight + merge_states, up to one rounding of the output;
    KV heads without a sample (garbage, even NaN, in their o_s / lse_s) keep o_det exactly."""
    import cupy_kernels as ck
    gen = _gen(21)
    B, HQ = 7, HK * G
    o_det = torch.randn((B, HQ, D), generator=gen).to(dtype).to(DEV)
    o_s = torch.randn((B, HQ, D), generator=gen).to(dtype).to(DEV)
    lse_det = (torch.randn((B, HQ), generator=gen) * 4 + 10).to(DEV)
    lse_s = (torch.randn((B, HQ), generator=gen) * 4 + 3).to(DEV)
    s_counts = torch.randint(0, 3, (B, HK), generator=gen).mul(50).int().to(DEV)     # a third of the heads: none
    weight = torch.exp(torch.randn((B, HK), generator=gen) * 3).to(DEV)              # from << 1 to >> 1
    weight[0, 0] = 0.0                                                                # clamped at 1e-30
    s_counts[0, 0] = 5
    empty = (s_counts == 0)[..., None].expand(B, HK, G).reshape(B, HQ)
    o_s[empty] = float("nan")
    lse_s[empty] = float("nan")
    got = ck.vattention_merge(o_det, lse_det, o_s, lse_s, s_counts, weight)
    want = ref.vattention_merge(o_det, lse_det, o_s, lse_s, s_counts, weight)
    assert got.dtype == dtype and got.shape == (B, HQ, D)
    assert torch.equal(got[empty], o_det[empty])
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10                      # one output rounding step
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-6)
    assert (got != want).float().mean().item() < 0.01                                 # and only rarely at all



# ----------------------------------------------------------------------------- CUDA graphs

def test_graph_capture_replay_on_new_data():
    """Capture the whole Quest + Twilight + vAttention selection chain once, replay it on new data."""
    import cupy_kernels as ck
    gen = _gen(18)
    dtype, D, HK, G, P = torch.bfloat16, 128, 8, 4, 16
    B, max_len = 6, 20000
    lens = [int(x) for x in torch.randint(1000, max_len, (B,), generator=gen)]
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen, spare_pages=64, max_ctx=max_len + 64)
    bounds = _bounds(pool)
    S = pool.k_cache.shape[0]
    codes = torch.zeros((S, HK, D // 2), dtype=torch.uint8, device=DEV)
    sz = torch.zeros((S, HK, 1, 2), dtype=torch.float32, device=DEV)
    ck.page_bounds_update(pool.k_cache, pool.written_slots, bounds, P)
    ck.quantize_keys_int4(pool.k_cache, pool.written_slots, codes, sz)
    max_pages = (max_len + 64) // P
    top_k, cap = 32, 32 * P
    sm = 1 / math.sqrt(D)

    q = torch.empty((B, HK * G, D), dtype=dtype, device=DEV)
    new_slots = torch.empty((B,), dtype=torch.int64, device=DEV)
    seeds = torch.empty((B,), dtype=torch.int64, device=DEV)
    o_det = torch.empty((B, HK * G, D), dtype=dtype, device=DEV)
    lse_det = torch.empty((B, HK * G), dtype=torch.float32, device=DEV)
    bufs = {}

    def step():
        ck.page_bounds_update(pool.k_cache, new_slots, bounds, P)
        ck.quantize_keys_int4(pool.k_cache, new_slots, codes, sz)
        bufs["scores"] = ck.quest_page_scores(q, bounds, pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
                                              P, max_pages)
        bufs["sel"] = ck.topk_pages(bufs["scores"], pool.seq_lens, P, top_k, 1, 2)
        bufs["kv"] = ck.pages_to_kv_indices(*bufs["sel"], pool.req_to_token, pool.req_pool_indices,
                                            pool.seq_lens, P, cap)
        bufs["rows"] = ck.page_rows(*bufs["sel"], pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P)
        bufs["probs"] = ck.int4_candidate_scores(q, codes, sz, *bufs["kv"], sm)
        bufs["kept"] = ck.top_p_select(bufs["probs"][1], bufs["kv"][1], 0.9, candidate_ids=bufs["kv"][0])
        bufs["vs"] = ck.vattention_sample(q, pool.k_cache, pool.v_cache, *bufs["sel"], pool.req_to_token,
                                          pool.req_pool_indices, pool.seq_lens, seeds, lse_det, o_det, P, sm,
                                          0.05, 0.05, 0.02, 2048)

    def new_data():
        """Append one token to every request, new query, new seeds (host-side set-up, outside the graph)."""
        pool.append_token(new_slots)
        q.copy_(torch.randn((B, HK * G, D), device=DEV).to(dtype))
        seeds.copy_(torch.randint(0, 2**62, (B,), device=DEV))
        o_det.copy_(torch.randn((B, HK * G, D), device=DEV).to(dtype) * 0.1)
        lse_det.copy_(torch.full((B, HK * G), 3.0, device=DEV) + torch.rand((B, HK * G), device=DEV))

    new_data()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compiles every kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for _ in range(3):
        new_data()
        graph.replay()
        torch.cuda.synchronize()
        want_bounds = bounds.clone()
        ref.page_bounds_update(pool.k_cache, new_slots, want_bounds, P)
        assert torch.equal(bounds, want_bounds)
        rscores = ref.quest_page_scores(q, bounds, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P,
                                        max_pages)
        fin = torch.isfinite(rscores)
        assert torch.isfinite(bufs["scores"][fin]).all()
        assert torch.allclose(bufs["scores"][fin], rscores[fin], rtol=1e-5, atol=1e-3)
        rsel, rcnt = ref.topk_pages(bufs["scores"], pool.seq_lens, P, top_k, 1, 2)
        sel, cnt = bufs["sel"]
        assert torch.equal(cnt, rcnt) and torch.equal(sel, rsel)
        rkv, rnkv = ref.pages_to_kv_indices(sel, cnt, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P,
                                            cap)
        kv, nkv = bufs["kv"]
        assert torch.equal(nkv, rnkv)
        m = torch.arange(cap, device=DEV)[None, None] < nkv[..., None]
        assert torch.equal(kv[m], rkv[m])
        rrows = ref.page_rows(sel, cnt, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P)
        total = int(rrows[0][-1])
        assert all(torch.equal(a, b) for a, b in zip(bufs["rows"][::2], rrows[::2]))          # indptr, last page
        assert torch.equal(bufs["rows"][1][:total], rrows[1][:total]) and torch.equal(bufs["rows"][3], rrows[3])
        _, rprobs = ref.int4_candidate_scores(q, codes, sz, kv, nkv, sm)
        perr = (bufs["probs"][1].masked_fill(~m, 0) - rprobs).abs() / (rprobs.abs() + 1e-30)
        assert perr.masked_fill(~m, 0).max().item() <= 1e-4, (perr.max().item(), torch.nonzero(perr > 1e-4)[:5])
        kept, nkept = bufs["kept"]
        _, rn = ref.top_p_select(bufs["probs"][1], nkv, 0.9)
        assert (nkept == rn).float().mean() >= 0.95
        vkv, vn, vw, vreq = bufs["vs"]
        rvkv, rvn, rvw, rvreq = ref.vattention_sample(q, pool.k_cache, pool.v_cache, sel, cnt, pool.req_to_token,
                                                      pool.req_pool_indices, pool.seq_lens, seeds, lse_det, o_det,
                                                      P, sm, 0.05, 0.05, 0.02, 2048)
        assert ((vreq.double() - rvreq.double()).abs() <= 1e-3 * rvreq.double() + 2).all()
        same = vn == rvn
        assert same.float().mean() >= 0.9
        for b, h in torch.nonzero(same).tolist():
            assert torch.equal(vkv[b, h, : int(vn[b, h])], rvkv[b, h, : int(vn[b, h])])


REFINE_CASES = [(torch.bfloat16, 128, 8, 4, 16, 4, [9000, 1, 15, 33000, 4096]),
                (torch.float16, 64, 3, 3, 8, 2, [5000, 17, 12000]),
                (torch.bfloat16, 128, 2, 7, 16, 8, [131072 - 5, 70000]),
                (torch.float16, 256, 1, 1, 16, 4, [3000, 2999])]


@pytest.mark.parametrize("case", REFINE_CASES, ids=lambda c: f"{str(c[0])[6:]}-D{c[1]}-HK{c[2]}-G{c[3]}-P{c[4]}-R{c[5]}")
def test_quest_refine_scores(case):
    """The scores inside the kept coarse pages equal quest_page_scores' there (the same float32 tolerance as its
    test), -inf on the request's other pages; columns past a request's pages and the rows of skipped requests are
    not written; the coarse pages come from a real coarse pass."""
    import cupy_kernels as ck
    dtype, D, HK, G, P, R, lens = case
    C = P * R
    gen = _gen(21)
    pool = make_pool(lens, HK, D, C, dtype, DEV, gen)           # SGLang pages of C tokens: coarse pages contiguous
    S = pool.k_cache.shape[0]
    fine = torch.zeros((S // P, HK, 2, D), dtype=dtype, device=DEV)
    coarse = torch.zeros((S // C, HK, 2, D), dtype=dtype, device=DEV)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, fine, P)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, coarse, C)
    q = _query(len(lens), HK, G, D, dtype, gen)
    B = len(lens)
    max_pages = -(-max(lens) // P) + 5
    args = (q, fine, pool.req_to_token, pool.req_pool_indices, pool.seq_lens)
    cscores = ref.quest_page_scores(q, coarse, pool.req_to_token, pool.req_pool_indices, pool.seq_lens, C,
                                    -(-max_pages // R))
    kept, count = ck.topk_pages(cscores.contiguous(), pool.seq_lens, C, 37, 0, 0)
    full = ref.quest_page_scores(*args, P, max_pages)
    npg = (pool.seq_lens.long() + P - 1) // P
    columns = torch.arange(max_pages, device=DEV)
    poison = 7.0
    for skip_upto, skip_rows in [(0, None), (-(-4096 // P), None),
                                 (0, torch.tensor([i % 2 for i in range(B)], dtype=torch.int32, device=DEV))]:
        got = ck.quest_refine_scores(*args, kept, count, P, R, max_pages,
                                     out=torch.full((B, HK, max_pages), poison, device=DEV),
                                     skip_pages_upto=skip_upto, skip_rows=skip_rows)
        want = ref.quest_refine_scores(*args, kept, count, P, R, max_pages, skip_pages_upto=skip_upto,
                                       skip_rows=skip_rows)
        scored = npg > skip_upto
        if skip_rows is not None:
            scored &= skip_rows == 0
        written = (scored[:, None] & (columns[None] < npg[:, None]))[:, None, :].expand_as(got)
        assert (got[~written] == poison).all()                    # nothing past the pages present
        assert torch.equal(torch.isneginf(got[written]), torch.isneginf(want[written]))
        finite = torch.isfinite(want) & written
        assert finite.any() == written.any()                      # every scored row has kept pages
        if finite.any():
            scale = (q.float().abs().sum(-1).amax(-1).max() * fine.float().abs().amax()).item()
            assert (got[finite] - full[finite]).abs().max().item() <= 1e-5 * scale + 1e-6
            assert (got[finite] - want[finite]).abs().max().item() <= 1e-5 * scale + 1e-6


@pytest.mark.parametrize("G", [1, 4, 7])
def test_group_score_mean_kernels(G):
    """group_score "mean" in both score kernels equals the reference (float32 tolerance of the max tests)."""
    import cupy_kernels as ck
    dtype, D, HK, P, R = torch.bfloat16, 128, 2, 16, 4
    lens = [5000, 300, 12000]
    gen = _gen(31 + G)
    pool = make_pool(lens, HK, D, P * R, dtype, DEV, gen)
    bounds = torch.zeros((pool.k_cache.shape[0] // P, HK, 2, D), dtype=dtype, device=DEV)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, bounds, P)
    q = _query(len(lens), HK, G, D, dtype, gen)
    max_pages = -(-max(lens) // P) + 2
    args = (q, bounds, pool.req_to_token, pool.req_pool_indices, pool.seq_lens)
    got = ck.quest_page_scores(*args, P, max_pages, out=torch.full((len(lens), HK, max_pages), float("-inf"),
                                                                      device=DEV), group_score="mean")
    want = ref.quest_page_scores(*args, P, max_pages, group_score="mean")
    finite = torch.isfinite(want)
    scale = (q.float().abs().sum(-1).amax(-1).max() * bounds.float().abs().amax()).item()
    assert torch.equal(torch.isfinite(got), finite)
    assert (got[finite] - want[finite]).abs().max().item() <= 1e-5 * scale + 1e-6
    assert not torch.equal(want, ref.quest_page_scores(*args, P, max_pages)) or G == 1     # mean != max
    kept = torch.arange(5, dtype=torch.int32, device=DEV).expand(len(lens), HK, 5).contiguous()
    count = torch.full((len(lens), HK), 5, dtype=torch.int32, device=DEV)
    refined = ck.quest_refine_scores(*args, kept, count, P, R, max_pages, group_score="mean")
    inside = torch.zeros_like(finite)
    inside[..., :5 * R] = True
    inside &= finite
    assert (refined[inside] - want[inside]).abs().max().item() <= 1e-5 * scale + 1e-6


# ----------------------------------------------------------------------------- int8 page bounds (bounds_dtype int8)

def _bounds_int8(pool):
    S, HK, D = pool.k_cache.shape
    return torch.zeros((S // pool.page_size, HK, ref.int8_bounds_row_bytes(D)), dtype=torch.uint8, device=DEV)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", CASES + LONG, ids=_id)
def test_int8_page_bounds_prefill_decode_and_reuse(case, slot_dtype):
    """The BOUNDS_INT8 update kernel writes exactly the reference's bytes (codes and (lo, scale)): a prefill of many
    tokens per page, a decode token per request, a page reused from offset 0; and every key inside the bounds."""
    dtype, D, HK, G, P, lens = case
    pool = make_pool(lens, HK, D, P, dtype, DEV, _gen(21))
    got = _bounds_int8(pool)

    def keys_inside(slots, touched):
        deq = ref.dequantize_bounds_int8(got[touched])                              # [U, HK, 2, D]
        exact = _bounds(pool)
        ref.page_bounds_update(pool.k_cache, slots, exact, P)
        assert (deq[:, :, 0] <= exact[touched, :, 0].float()).all()
        assert (deq[:, :, 1] >= exact[touched, :, 1].float()).all()

    _prefill_decode_rewrite(pool, got, _bounds_int8(pool), slot_dtype, after_prefill=keys_inside)


def test_int8_bounds_of_every_layer_in_one_launch():
    """page_bounds_update_layers on int8 tables == the reference per layer, eager and replayed from a graph."""
    import cupy_kernels as ck
    gen = _gen(22)
    HK, D, P, L = 8, 128, 16, 3
    lens = [700, 33, 4096]
    pool = make_pool(lens, HK, D, P, torch.bfloat16, DEV, gen, spare_pages=8)
    k_caches = [pool.k_cache] + [torch.randn_like(pool.k_cache.float()).to(torch.bfloat16) for _ in range(L - 1)]
    got = [_bounds_int8(pool) for _ in range(L)]
    for k, g in zip(k_caches, got):
        ref.page_bounds_update(k, pool.written_slots, g, P)
    want = [g.clone() for g in got]
    slots = pool.last_slots
    for k in k_caches:
        k[slots] = torch.randn((len(lens), HK, D), device=DEV).to(torch.bfloat16)
    tables = ck.LayerTables(k_caches, got, P)
    ck.page_bounds_update_layers(tables, slots)
    ref.page_bounds_update_layers(k_caches, slots, want, P)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.page_bounds_update_layers(tables, slots)
    for k in k_caches:
        k[slots] = torch.randn((len(lens), HK, D), device=DEV).mul(5).to(torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    ref.page_bounds_update_layers(k_caches, slots, want, P)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("group_score", ["max", "mean"])
@pytest.mark.parametrize("case", CASES + LONG, ids=_id)
def test_int8_quest_scores(case, group_score):
    """The BOUNDS_INT8 score kernel == the reference on the dequantized bounds, within float32 rounding; rows not
    scored (skip_pages_upto) untouched."""
    pool, q, rows, got, want, got_skip, skip, npg = _scored_case(case, 23, _bounds_int8,
                                                                 group_score=group_score)
    finite = torch.isfinite(want)
    assert (got[~finite] == POISON).all()
    scale = (q.float().abs().sum(-1).amax(-1).max() * ref.dequantize_bounds_int8(rows).abs().amax()).item()
    assert (got[finite] - want[finite]).abs().max().item() <= 1e-5 * scale + 1e-6
    scored = finite & (npg > skip)[:, None, None]
    assert torch.equal(got_skip[scored], got[scored]) and (got_skip[~scored] == POISON).all()


@pytest.mark.parametrize("group_score", ["max", "mean"])
@pytest.mark.parametrize("dtype,D,HK,G", [(torch.bfloat16, 128, 2, 7), (torch.float16, 64, 3, 5),
                                          (torch.bfloat16, 256, 1, 8)])
def test_int8_quest_scores_with_query_heads_far_apart_in_scale(dtype, D, HK, G, group_score):
    """int8 rows against query heads scaled 2^-8 .. 2^8 apart (the kernel scales each head's query by its own
    power of two): every (request, KV head) row == the reference within float32 rounding of that row's own
    magnitude, so a head scored with another head's scale shows; head_dim 256 and odd groups at 128 included."""
    import cupy_kernels as ck
    gen = _gen(29)
    P, lens = 16, [3000, 17, 1500]
    pool = make_pool(lens, HK, D, P, dtype, DEV, gen)
    rows = _bounds_int8(pool)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, rows, P)
    exps = torch.arange(HK * G) % 17 - 8                                   # query head i scaled by 2^exps[i]
    q = (_query(len(lens), HK, G, D, torch.float32, gen) * torch.pow(2.0, exps.float()).to(DEV)[None, :, None]
         ).to(dtype)
    max_pages = pool.max_pages()
    args = (pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P, max_pages)
    got = torch.full((len(lens), HK, max_pages), POISON, device=DEV)
    ck.quest_page_scores(q, rows, *args, out=got, group_score=group_score)
    want = ref.quest_page_scores(q, rows, *args, group_score=group_score)
    bounds = ref.dequantize_bounds_int8(rows).abs().amax((0, 2, 3))                         # [HK]
    row_scale = q.float().abs().sum(-1).view(len(lens), HK, G).amax(-1) * bounds[None, :]  # [B, HK]
    finite = torch.isfinite(want)
    err = torch.where(finite, (got - want).abs(), torch.zeros_like(got)).amax(-1)          # [B, HK]
    assert (err <= 1e-5 * row_scale + 1e-6).all(), (err, row_scale)
    assert (got[~finite] == POISON).all()


def test_scores_refuse_misaligned_inputs():
    """A view that starts off the kernels' vector width is refused by name, not read misaligned."""
    import cupy_kernels as ck
    r2t = torch.zeros((1, 128), dtype=torch.int32, device=DEV)
    rpi, sl = torch.zeros(1, dtype=torch.int32, device=DEV), torch.full((1,), 128, dtype=torch.int32, device=DEV)
    q = torch.zeros((1, 2, 64), dtype=torch.bfloat16, device=DEV)
    q_off = torch.zeros(1 + 2 * 64, dtype=torch.bfloat16, device=DEV)[1:].view(1, 2, 64)
    bounds = torch.zeros((8, 2, 2, 64), dtype=torch.bfloat16, device=DEV)
    rows_off = torch.zeros(4 + 8 * 2 * 136, dtype=torch.uint8, device=DEV)[4:].view(8, 2, 136)
    for args, name in (((q_off, bounds), "q"), ((q, rows_off), "page_key_bounds")):
        with pytest.raises(ValueError, match=f"{name} must start at a"):
            ck.quest_page_scores(*args, r2t, rpi, sl, 16, 8)


def test_refine_scores_refuse_int8_bounds_on_gpu():
    import cupy_kernels as ck
    q = torch.zeros((1, 2, 64), dtype=torch.bfloat16, device=DEV)
    rows = torch.zeros((8, 2, 136), dtype=torch.uint8, device=DEV)
    r2t = torch.zeros((1, 128), dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="int8"):
        ck.quest_refine_scores(q, rows, r2t, torch.zeros(1, dtype=torch.int32, device=DEV),
                               torch.full((1,), 128, dtype=torch.int32, device=DEV),
                               torch.zeros((1, 2, 1), dtype=torch.int32, device=DEV),
                               torch.ones((1, 2), dtype=torch.int32, device=DEV), 16, 4, 8)
