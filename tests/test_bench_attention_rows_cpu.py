"""launch/bench_attention_rows.py on CPU: rows split into runs cover the same tokens, and the LSE merge of the
runs' attention (the project's reference merge and attention) equals attention over the whole row (the GPU part,
FlashInfer's replays, runs on the GPU host)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import bench_attention_rows as bar  # noqa: E402
from cupy_kernels.reference import merge_states  # noqa: E402
from sgl_sparse.decode import attend_rows_reference  # noqa: E402

P = 16


def _row_tokens(indptr, last, pages, r):
    """Token ids of row r: its pages' tokens in order, the last page cut at last_page_len."""
    lo, hi = int(indptr[r]), int(indptr[r + 1])
    out = []
    for i in range(lo, hi):
        n = int(last[r]) if i == hi - 1 else P
        out += [int(pages[i]) * P + t for t in range(n)]
    return out


def _attend(q, k, v, tokens):
    """Per head: (output [H, D], base-2 LSE [H]) of q [H, D] over the given token ids (-inf LSE for none): the
    operator's reference attention over one row of one KV head."""
    rows = torch.tensor(tokens or [0], dtype=torch.int32).view(1, 1, -1)
    counts = torch.tensor([[len(tokens)]], dtype=torch.int32)
    o, lse = attend_rows_reference(q[None], k[:, None], v[:, None], rows, counts, 1 / math.sqrt(q.shape[-1]), True)
    return o[0], lse[0]


def test_split_rows_cut_each_row_into_consecutive_runs():
    indptr = torch.tensor([0, 5, 7, 10, 11, 11], dtype=torch.int32)           # 5, 2, 3, 1, 0 pages
    last = torch.tensor([16, 4, 9, 3, 0], dtype=torch.int32)
    s_indptr, s_last = bar.split_rows(indptr, last, 2, P)
    assert s_indptr.tolist() == [0, 3, 5, 6, 7, 9, 10, 11, 11, 11, 11]
    # a row's last run with pages ends on its partial page, the others on full pages; an empty run has 0
    assert s_last.tolist() == [16, 16, 16, 4, 16, 9, 3, 0, 0, 0]
    assert s_indptr.dtype == torch.int32 and s_last.dtype == torch.int32
    one_indptr, one_last = bar.split_rows(indptr, last, 1, P)
    assert one_indptr.tolist() == indptr.tolist() and one_last.tolist() == last.tolist()
    with pytest.raises(ValueError, match="splits must be >= 1"):
        bar.split_rows(indptr, last, 0, P)


@pytest.mark.parametrize("splits", [2, 3, 4])
def test_split_rows_and_the_lse_merge_give_attention_over_the_whole_row(splits):
    gen = torch.Generator().manual_seed(splits)
    H, D, n_pages = 4, 32, 40
    k = torch.randn((n_pages * P, D), generator=gen)
    v = torch.randn((n_pages * P, D), generator=gen)
    pages = torch.randperm(n_pages, generator=gen)[:23]
    indptr = torch.tensor([0, 9, 10, 21, 23], dtype=torch.int32)              # rows of 9, 1, 11 and 2 pages
    last = torch.tensor([16, 7, 1, 12], dtype=torch.int32)
    q = torch.randn((4, H, D), generator=gen) * 2
    s_indptr, s_last = bar.split_rows(indptr, last, splits, P)
    for r in range(4):
        whole = _row_tokens(indptr, last, pages, r)
        runs = [_row_tokens(s_indptr, s_last, pages, r * splits + j) for j in range(splits)]
        assert sum(runs, []) == whole                                         # the same tokens, in order
        (out, lse), *rest = [_attend(q[r], k, v, t) for t in runs]            # merged part by part, as FlashInfer
        for o, s in rest:
            out, lse = merge_states(out, lse, o, s), torch.logaddexp2(lse, s)
        ref_out, ref_lse = _attend(q[r], k, v, whole)
        assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_command_line_refuses_bad_splits_budgets_and_points(capsys):
    for argv, message in ((["--splits", "0"], "--splits must be between 1"),
                          (["--splits", "256"], "--splits must be between 1"),
                          (["--budget", "100"], "multiple of the page size"),
                          (["--points", "8x1K"], "must hold the budget"),
                          (["--points", "eightx32K"], "invalid literal")):
        with pytest.raises(SystemExit):
            bar.main(argv)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bar.main(["--points", "8x32K"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_row_pages_list_each_request_and_head_s_own_full_pages_in_page_view_order():
    from sgl_sparse.synthetic import make_pool

    gen = torch.Generator().manual_seed(3)
    B, context, k = 3, 40 * P + 5, 12
    pool = make_pool([context] * B, bar.HK, 8, P, torch.float32, "cpu", gen)
    idx = bar.row_pages(pool, B, k, gen)
    assert idx.shape == (B * bar.HK, k) and idx.dtype == torch.int32
    slots = pool.k_cache.shape[0]
    view = pool.k_cache.as_strided(((slots - P + 1) * bar.HK, P, 1, 8), (8, bar.HK * 8, 8, 1))
    for b in range(B):
        row = pool.req_to_token[int(pool.req_pool_indices[b])]
        first_slots = {int(row[p * P]): p for p in range(context // P)}      # full pages only
        for h in range(bar.HK):
            ids = idx[b * bar.HK + h].long()
            assert torch.all(ids % bar.HK == h)
            logical = [first_slots[int(i) // bar.HK] for i in ids]           # KeyError: not this request's page
            assert logical == sorted(set(logical))                           # distinct, ascending
            i = int(ids[0])
            assert torch.equal(view[i, :, 0], pool.k_cache[i // bar.HK: i // bar.HK + P, h])
