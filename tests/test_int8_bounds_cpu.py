"""CPU tests of int8 page bounds (config ``bounds_dtype: int8``): the reference encoding in
``cupy_kernels.reference`` against brute force (every key inside the dequantized bounds, the tightest outward codes,
the widening), the update over prefill / decode / page reuse, Quest's scores from them, the config and the
metadata tables.

The encoding is checked against independent computations: enumeration of all 256 codes with the dequantization
written out in float32 (``fl(fl(c * scale) + lo)``), python float64 dot products for the logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from cupy_kernels import reference as ref
from sgl_sparse.config import SparseConfig, SparseConfigError
from sgl_sparse.decode import reference_decode
from sgl_sparse.fidelity import dense_attention, relative_l2
from sgl_sparse.metadata import SparseKVMetadata
from sgl_sparse.policies import DecodeBatch
from sgl_sparse.synthetic import PageAllocator, make_pool, shape_attention

U = 2.0 ** -24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(rows: torch.Tensor):
    """int8 rows ``[..., 2D + 8]`` -> (code_min, code_max, lo, scale) without the reference's helpers."""
    D = (rows.shape[-1] - 8) // 2
    params = rows[..., 2 * D:].contiguous().view(torch.float32)
    return rows[..., :D].long(), rows[..., D:2 * D].long(), params[..., 0], params[..., 1]


def _all_levels(lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[..., 256]`` float32: fl(fl(c * scale) + lo) for every code c (two float32 roundings)."""
    c = torch.arange(256, dtype=torch.float32)
    return (c * scale[..., None]).float() + lo[..., None]


def check_rows(rows: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Brute-force checks of int8 rows against the exact bounds ``kmin``/``kmax`` ``[..., D]`` (float32); returns
    the dequantized bounds ``[..., 2, D]``."""
    cmin, cmax, lo, scale = _split(rows)
    assert torch.equal(lo, kmin.amin(-1)), "lo is the smallest min of the page-head"
    hi = kmax.amax(-1)
    levels = _all_levels(lo, scale)                                                  # [..., 256]
    # scale: the first float32 at or above fl((hi - lo) / 255) with level 255 >= hi; 0 exactly when lo == hi
    start = (hi - lo) / 255
    assert bool((scale >= start).all()) and bool((levels[..., 255] >= hi).all())
    prev = torch.nextafter(scale, torch.zeros_like(scale))
    grown = scale > start
    assert bool(((prev * 255 + lo)[grown] < hi[grown]).all()), "scale raised further than needed"
    assert torch.equal(scale == 0, lo == hi)
    # outward and tightest: code_min is the largest code whose level is <= min, code_max the smallest >= max
    lv = levels[..., None, :].expand(*kmin.shape, 256)
    want_min = (lv <= kmin[..., None]).sum(-1) - 1
    want_max = 256 - (lv >= kmax[..., None]).sum(-1)
    flat = scale[..., None].expand_as(kmin) == 0
    want_min = torch.where(flat, 0, want_min)
    want_max = torch.where(flat, 0, want_max)
    assert torch.equal(cmin, want_min), "code_min is not the tightest outward code"
    assert torch.equal(cmax, want_max), "code_max is not the tightest outward code"
    deq = ref.dequantize_bounds_int8(rows)                                           # [..., 2, D]
    assert bool((deq[..., 0, :] <= kmin).all()) and bool((deq[..., 1, :] >= kmax).all()), "not outward"
    # the widening: at most one step (plus a few float32 roundings of the page range) per side
    step = (scale + 4 * U * (hi.abs() + lo.abs()))[..., None]
    assert bool((kmin - deq[..., 0, :] <= step).all()) and bool((deq[..., 1, :] - kmax <= step).all())
    return deq


@pytest.mark.parametrize("seed", range(4))
def test_quantize_outward_tightest_and_small_widening(seed):
    g = _gen(seed)
    HK, D = 6, 64
    a = torch.randn((40, HK, D), generator=g) * torch.logspace(-3, 3, 40)[:, None, None]
    b = a + torch.rand((40, HK, D), generator=g) * torch.logspace(-3, 3, 40)[:, None, None]
    a[0:5] = a[0:5].abs() + 1.0               # all positive
    b[0:5] = a[0:5] + b[0:5].abs()
    a[5:10] = -(a[5:10].abs() + 2.0)          # all negative
    b[5:10] = a[5:10] + 0.5
    b[10, 0] = a[10, 0]                       # channels with min == max
    a[11, 1] = 3.0; b[11, 1] = 3.0            # a constant page-head (lo == hi)
    a[12, 2] = 0.0; b[12, 2] = 0.0            # all zero
    a[13, 3, :] = -1e-3; b[13, 3, :] = 1e-3; a[13, 3, 0] = -500.0   # one outlier channel
    kmin, kmax = a.bfloat16().float(), b.bfloat16().float()
    rows = ref.quantize_bounds_int8(kmin, kmax)
    assert rows.dtype == torch.uint8 and rows.shape == (40, HK, 2 * D + 8)
    check_rows(rows, kmin, kmax)
    deq = ref.dequantize_bounds_int8(rows)
    assert torch.equal(deq[11, 1], torch.full((2, D), 3.0)) and torch.equal(deq[12, 2], torch.zeros(2, D))
    # relative to the page range the widening is ~1/255 per side, far below it for most channels
    rng = (kmax.amax(-1) - kmin.amin(-1))[..., None]
    wide = ((kmin - deq[..., 0, :]) / rng.clamp_min(1e-30))[rng[..., 0] > 0]
    assert float(wide.max()) <= 1 / 255 * (1 + 1e-4) and float(wide.mean()) < 0.6 / 255


def test_quantize_rounds_scale_up_when_the_quotient_falls_short():
    # hi - lo = 1 + 2**-23: (hi - lo) / 255 rounds so that 255 * scale + lo may fall below hi; whatever the case,
    # the code-255 level must reach hi, and a value at hi gets code 255
    # (the last three pairs: fl(fl(255 * fl((hi - lo) / 255)) + lo) < hi, found by a random search over float32)
    cases = [(0.0, 1.0 + 2 ** -23), (-1.0, 254.99998), (100.0, 100.0 + 255 * 2 ** -16), (-3e-5, 7e-5)] + \
        [(float.fromhex(a), float.fromhex(b)) for a, b in [("-0x1.a267f0p+1", "0x1.751e20p-1"),
                                                           ("-0x1.b112f8p+7", "0x1.3964f0p+5"),
                                                           ("-0x1.97aa6cp-10", "0x1.326a2cp-9")]]
    fixed = 0
    for lo_v, hi_v in cases:
        kmin = torch.tensor([[lo_v, hi_v]], dtype=torch.float32)
        kmax = kmin.clone()
        rows = ref.quantize_bounds_int8(kmin, kmax)
        check_rows(rows, kmin, kmax)
        assert int(rows[0, 3]) == 255 and int(rows[0, 0]) == 0
        lo, hi = kmin[0, 0], kmin[0, 1]
        fixed += bool(_split(rows)[3][0] > (hi - lo) / 255)
    assert fixed >= 3, "the scale fix-up must be exercised"


class Int8Sim(PageAllocator):
    """K pool + int8 bounds table driven like SGLang's allocator: after every forward, each page touched must hold
    exactly the outward encoding of the brute-force min/max over its valid tokens, every valid key inside the
    dequantized bounds; pages not touched keep their bytes."""

    def __init__(self, P: int, HK: int, D: int, num_pages: int, seed: int):
        super().__init__(P, HK, D, torch.bfloat16, num_pages, _gen(seed))
        self.bounds = torch.randint(0, 256, (num_pages, HK, ref.int8_bounds_row_bytes(D)), generator=self.gen,
                                    dtype=torch.uint8)

    def forward(self, slots: list[int], dtype=torch.int64) -> None:
        before = self.bounds.clone()
        ref.page_bounds_update(self.k, torch.tensor(slots, dtype=dtype), self.bounds, self.P)
        touched = sorted({s // self.P for s in slots})
        for p in touched:
            keys = self.valid_keys(p)
            kmin, kmax = keys.amin(0).float(), keys.amax(0).float()
            deq = check_rows(self.bounds[p], kmin, kmax).double()                         # [HK, 2, D]
            assert bool((keys >= deq[None, :, 0]).all() and (keys <= deq[None, :, 1]).all())
        others = torch.ones(self.bounds.shape[0], dtype=torch.bool)
        others[touched] = False
        assert torch.equal(self.bounds[others], before[others]), "a page not written changed"


@pytest.mark.parametrize("P", [4, 16])
def test_int8_bounds_prefill_decode_reuse(P):
    sim = Int8Sim(P, HK=2, D=32, num_pages=48, seed=P)
    # a prefill writing many tokens of each page at once; "old" has extreme values that go stale on reuse
    sim.forward(sim.append("old", 2 * P + 3, scale=100.0) + sim.append("a", P + 2, offset=5.0) +
                sim.append("b", 3, offset=-7.0))
    for _ in range(P + 1):            # decode: token by token, 'a' crosses a page boundary
        sim.forward(sim.append("old", 1, scale=100.0) + sim.append("a", 1, offset=5.0) + sim.append("b", 1),
                    torch.int32)
    sim.finish("old")                 # its pages are reused next: the first write (offset 0) resets them
    sim.forward(sim.append("c", 5, scale=0.01) + sim.append("a", 1))
    sim.forward(sim.append("b", 1) + sim.append("c", 6, scale=0.01))     # a chunk that starts mid-page
    for _ in range(2 * P):
        sim.forward(sim.append("a", 1) + sim.append("b", 1) + sim.append("c", 1, scale=0.01), torch.int32)
    before = sim.bounds.clone()
    ref.page_bounds_update(sim.k, torch.zeros(0, dtype=torch.int64), sim.bounds, P)
    assert torch.equal(sim.bounds, before)


def test_page_filled_token_by_token_equals_one_prefill():
    """No widening accumulates: a page filled over P decode steps ends with the bytes of a one-shot prefill."""
    P, HK, D = 16, 3, 64
    g = _gen(7)
    k = (torch.randn((4 * P, HK, D), generator=g) * 3 - 1).bfloat16()
    a = torch.zeros((4, HK, ref.int8_bounds_row_bytes(D)), dtype=torch.uint8)
    b = torch.zeros_like(a)
    ref.page_bounds_update(k, torch.arange(4 * P), a, P)
    for s in range(4 * P):
        ref.page_bounds_update(k, torch.tensor([s]), b, P)
    assert torch.equal(a, b)
    # and equal to the encoding of the exact page bounds
    kk = k.float().view(4, P, HK, D)
    assert torch.equal(a, ref.quantize_bounds_int8(kk.amin(1), kk.amax(1)))


def test_constant_pages_dequantize_exactly():
    P, HK, D = 8, 2, 16
    k = torch.full((2 * P, HK, D), -2.5).bfloat16()
    k[P:] = 0.0
    bounds = torch.full((2, HK, ref.int8_bounds_row_bytes(D)), 77, dtype=torch.uint8)
    ref.page_bounds_update(k, torch.arange(2 * P), bounds, P)
    assert bool((bounds[..., :2 * D] == 0).all())
    deq = ref.dequantize_bounds_int8(bounds)
    assert torch.equal(deq[0], torch.full((HK, 2, D), -2.5)) and torch.equal(deq[1], torch.zeros(HK, 2, D))


@pytest.mark.parametrize("G", [1, 4])
def test_int8_quest_scores_bound_every_logit_and_the_bf16_score(G):
    P, HK, D = 8, 2, 32
    pool = make_pool([37, 64, 9], HK, D, P, torch.bfloat16, "cpu", _gen(3))
    S = pool.k_cache.shape[0]
    exact = torch.zeros((S // P, HK, 2, D), dtype=torch.bfloat16)
    rows = torch.zeros((S // P, HK, ref.int8_bounds_row_bytes(D)), dtype=torch.uint8)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, exact, P)
    ref.page_bounds_update(pool.k_cache, pool.written_slots, rows, P)
    q = (torch.randn((3, HK * G, D), generator=_gen(4)) * 2).bfloat16()
    q[0, 0] = -q[0, 0].abs()
    max_pages = 10
    args = (pool.req_to_token, pool.req_pool_indices, pool.seq_lens, P, max_pages)
    s8 = ref.quest_page_scores(q, rows, *args)
    s16 = ref.quest_page_scores(q, exact, *args)
    ql, kl = q.double().tolist(), pool.k_cache.double().tolist()
    for b in range(3):
        n = -(-int(pool.seq_lens[b]) // P)
        assert bool(torch.isinf(s8[b, :, n:]).all())
        row = pool.req_to_token[int(pool.req_pool_indices[b])]
        for h in range(HK):
            for j in range(n):
                got, base = float(s8[b, h, j]), float(s16[b, h, j])
                page = int(row[j * P]) // P
                _, _, lo, scale = _split(rows[page, h])
                qabs = max(sum(abs(x) for x in ql[b][h * G + g]) for g in range(G))
                tol = D * U * qabs * (abs(float(lo)) + 255 * float(scale) + 1)
                # wider bounds: never below the bf16 score, above it by at most |q|_1 * one step per side
                assert base - tol <= got <= base + qabs * 2 * float(scale) * 1.001 + tol, (b, h, j)
                for t in range(j * P, min((j + 1) * P, int(pool.seq_lens[b]))):
                    s = int(row[t])
                    for g in range(G):
                        dot = math.fsum(x * y for x, y in zip(ql[b][h * G + g], kl[s][h]))
                        assert dot <= got + tol, (b, h, j, t, g)


def test_refine_scores_refuse_int8_bounds():
    q = torch.zeros((1, 2, 16), dtype=torch.bfloat16)
    rows = torch.zeros((4, 2, 40), dtype=torch.uint8)
    with pytest.raises(ValueError, match="int8"):
        ref.quest_refine_scores(q, rows, torch.zeros((1, 64), dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
                                torch.full((1,), 64, dtype=torch.int32), torch.zeros((1, 2, 1), dtype=torch.int32),
                                torch.ones((1, 2), dtype=torch.int32), 16, 4, 4)


def test_config_field_validation():
    assert SparseConfig().bounds_dtype == "bf16"
    assert SparseConfig.load("quest:bounds_dtype=int8").bounds_dtype == "int8"
    with pytest.raises(SparseConfigError, match=r"bounds_dtype='fp8' is invalid: choose one of bf16, int8"):
        SparseConfig(bounds_dtype="fp8")
    with pytest.raises(SparseConfigError, match=r"bounds_dtype='int8' is invalid: int8 is not supported with "
                                                r"coarse-to-fine scoring"):
        SparseConfig.load("quest:bounds_dtype=int8,coarse_page_tokens=64")


def test_metadata_allocates_int8_rows_and_counts_their_bytes():
    cfg = SparseConfig.load("quest:bounds_dtype=int8")
    meta = SparseKVMetadata(cfg, num_layers=2, num_slots=256, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                            device="cpu")
    t = meta.page_key_bounds[0]
    assert t.dtype == torch.uint8 and t.shape == (16, 8, 264)
    assert SparseKVMetadata.bounds_bytes_per_page_head(cfg, 128, torch.bfloat16) == 264
    assert SparseKVMetadata.bounds_bytes_per_page_head(SparseConfig(), 128, torch.bfloat16) == 512
    assert SparseKVMetadata.bytes_per_token(cfg, 8, 128, torch.bfloat16) == 8 * 264 // 16


@pytest.mark.parametrize("method", ["quest", "twilight", "vattention"])
def test_reference_decode_with_int8_bounds(method):
    """Exact when the budget covers the context; otherwise a sparse selection close to dense on peaked attention,
    and int8 bounds select almost the pages bf16 bounds select."""
    HK, G, D = 2, 3, 64
    gen = _gen(11)
    lens = [700, 333, 1500]
    pool = make_pool(lens, HK, D, 16, torch.bfloat16, "cpu", gen)
    q = shape_attention(pool, torch.randn((len(lens), HK * G, D), generator=gen).to(torch.bfloat16), "peaked", gen)
    batch = DecodeBatch(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, -(-max(lens) // 16) + 1)
    sm = 1 / math.sqrt(D)
    dense = dense_attention(q, pool.k_cache, pool.v_cache, batch, sm)
    for budget in (2048, 256):
        outs = {}
        for dt in ("bf16", "int8"):
            cfg = SparseConfig.load(method).replace(token_budget=budget, min_context=0, dense_layers=0,
                                                    bounds_dtype=dt)
            meta = SparseKVMetadata(cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK,
                                    head_dim=D, dtype=torch.bfloat16, device="cpu")
            meta.update_reference(0, pool.k_cache, pool.written_slots)
            assert meta.page_key_bounds[0].dtype == (torch.uint8 if dt == "int8" else torch.bfloat16)
            outs[dt] = reference_decode(cfg, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)[0]
        if budget >= max(lens):
            assert float(relative_l2(outs["int8"], dense).max()) < 1e-2
        else:
            assert float(relative_l2(outs["int8"], dense).max()) < 0.25
            assert float(relative_l2(outs["int8"], outs["bf16"]).max()) < 0.25
