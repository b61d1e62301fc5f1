"""Pure-torch references: the executable specification of every kernel in this package.

They run on CPU (and on CUDA tensors), favour clarity over speed, and compute in float32/float64 where the
kernels use float32. The GPU tests compare each kernel against the function of the same name here; the CPU
tests check these functions against brute-force math.

Memory layout (SGLang's MHA pool, one layer):
    k_cache, v_cache    [num_slots, HK, D]   fp16/bf16     token slot s, KV head h
    req_to_token        [max_reqs, max_ctx]  int32         slots of request r by position
    req_pool_indices    [B]                  int           row of req_to_token of batch entry b
    seq_lens            [B]                  int           tokens of batch entry b (the new decode token included)
    page size P: physical page p holds slots p*P ... p*P+P-1; the token at position i of a request lives at
    page offset i % P (SGLang's paged allocator), so logical page j of a request is physical page
    req_to_token[r, j*P] // P.

Query heads: q is [B, HQ, D] with HQ = HK * G; query head qh belongs to KV head qh // G (GQA).

Token lists handed to FlashInfer are **kv indices**: ``kv_index = slot * HK + h``, the row of the
``[num_slots * HK, D]`` view of the cache (and of every per-token side table, e.g. the int4 keys).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

# ----------------------------------------------------------------------------- helpers


def num_pages(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages of each request: ceil(seq_len / P). int64 [B]."""
    return (seq_lens.long() + page_size - 1) // page_size


def _gqa(q: torch.Tensor, num_kv_heads: int) -> tuple[int, int, int, int]:
    B, HQ, D = q.shape
    if HQ % num_kv_heads:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({num_kv_heads})")
    return B, HQ, D, HQ // num_kv_heads


# ----------------------------------------------------------------------------- 1. page metadata


def page_bounds_update(k_cache: torch.Tensor, written_slots: torch.Tensor, page_key_bounds: torch.Tensor,
                       page_size: int) -> None:
    """Update the per-page, per-KV-head channel-wise min and max of K for the slots just written.

    Args:
        k_cache: ``[num_slots, HK, D]`` fp16/bf16, the layer's K pool (already holding the new tokens).
        written_slots: ``[N]`` int32/int64, slots written by this forward (SGLang's ``out_cache_loc``).
            Slots of one page appear contiguously and in increasing page offset (SGLang fills a page from
            offset 0 upwards; a page belongs to one request).
        page_key_bounds: ``[num_slots // P, HK, 2, D]``, same dtype as ``k_cache``; ``[..., 0, :]`` is the min,
            ``[..., 1, :]`` the max. Updated in place. Or an int8 table ``[num_slots // P, HK, 2D + 8]`` uint8
            (config ``bounds_dtype: int8``): see :func:`page_bounds_update_int8`.
        page_size: P.

    Semantics: for every page p touched, with o = the largest page offset written in p, the bounds become the
    min/max over offsets 0..o of p. So a write at offset 0 resets the page (a page reused by the radix cache
    never keeps stale values), and a page filled over several forwards accumulates all of its tokens.
    """
    if written_slots.numel() == 0:
        return
    if page_key_bounds.dtype == torch.uint8:
        return page_bounds_update_int8(k_cache, written_slots, page_key_bounds, page_size)
    pages, kmin, kmax = _page_min_max(k_cache, written_slots, page_size)
    page_key_bounds[pages, :, 0] = kmin.to(page_key_bounds.dtype)
    page_key_bounds[pages, :, 1] = kmax.to(page_key_bounds.dtype)


def _page_min_max(k_cache: torch.Tensor, written_slots: torch.Tensor, page_size: int):
    """The pages touched by ``written_slots`` and their exact channel-wise min/max over offsets 0..o (o the largest
    offset written): ``(pages [U], kmin [U, HK, D], kmax [U, HK, D])`` float32."""
    P = page_size
    slots = written_slots.long()
    uniq, inverse = torch.unique(slots // P, return_inverse=True)
    last_offset = torch.full((uniq.numel(),), -1, dtype=torch.long, device=slots.device)
    last_offset = last_offset.scatter_reduce(0, inverse, slots % P, reduce="amax")
    page_slots = uniq[:, None] * P + torch.arange(P, device=slots.device)[None, :]          # [U, P]
    valid = (torch.arange(P, device=slots.device)[None, :] <= last_offset[:, None])[:, :, None, None]
    k = k_cache[page_slots].float()                                                          # [U, P, HK, D]
    inf = torch.tensor(float("inf"), device=k.device)
    return uniq, torch.where(valid, k, inf).amin(1), torch.where(valid, k, -inf).amax(1)


# int8 page bounds (config bounds_dtype "int8"). One uint8 row of 2*D + 8 bytes per (page, KV head):
#   bytes [0, D)        code_min_d      bytes [D, 2D)   code_max_d
#   bytes [2D, 2D + 4)  lo (fp32)       bytes [2D + 4, 2D + 8)  scale (fp32)
# bound(code) = fl(fl(code * scale) + lo) (two fp32 roundings, no fused multiply-add: the kernels use __fmul_rn and
# __fadd_rn), and the codes are the tightest OUTWARD ones: code_min_d = the largest c with bound(c) <= min_d,
# code_max_d = the smallest c with bound(c) >= max_d. lo / hi: the smallest min / largest max of the page-head;
# scale: fl((hi - lo) / 255), raised ulp by ulp until bound(255) >= hi (0 when lo == hi: every code 0). So the
# dequantized bounds contain every key of the page and Quest's score from them bounds every q.k of the page.
INT8_LEVELS = 255


def int8_bounds_row_bytes(head_dim: int) -> int:
    """Bytes of one (page, KV head) of an int8 bounds table: 2 * D codes + (lo, scale) fp32."""
    return 2 * head_dim + 8


def int8_dequantize(code: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fl(fl(code * scale) + lo)`` in float32 (lo and scale broadcast against code)."""
    return code.float() * scale + lo


def quantize_bounds_int8(kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Outward int8 encoding of bounds ``kmin``/``kmax`` ``[..., D]`` float32 (kmin <= kmax): the ``[..., 2D + 8]``
    uint8 rows described above."""
    D = kmin.shape[-1]
    kmin, kmax = kmin.float(), kmax.float()
    lo, hi = kmin.amin(-1, keepdim=True), kmax.amax(-1, keepdim=True)
    # a tensor divisor: PyTorch divides by a Python scalar on CUDA as a * fl(1/b), not as the kernel's true
    # division (__fdiv_rn); a tensor takes the true-division path on every device
    scale = (hi - lo) / torch.full_like(hi, float(INT8_LEVELS))
    while True:                                          # round scale up until code 255 reaches hi
        short = int8_dequantize(torch.full_like(scale, INT8_LEVELS), lo, scale) < hi
        if not bool(short.any()):
            break
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    nonzero = scale > 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    top = torch.full_like(kmin, INT8_LEVELS)
    cmin = torch.where(nonzero, ((kmin - lo) / safe).floor().clamp(0, INT8_LEVELS), 0 * kmin)
    cmax = torch.where(nonzero, ((kmax - lo) / safe).ceil().clamp(0, INT8_LEVELS), 0 * kmax)
    while True:                                          # the largest code at or below min_d
        down = (cmin > 0) & (int8_dequantize(cmin, lo, scale) > kmin)
        up = (cmin < top) & (int8_dequantize(cmin + 1, lo, scale) <= kmin) & nonzero
        if not bool((down | up).any()):
            break
        cmin = cmin - down.float() + up.float()
    while True:                                          # the smallest code at or above max_d
        up = (cmax < top) & (int8_dequantize(cmax, lo, scale) < kmax)
        down = (cmax > 0) & (int8_dequantize(cmax - 1, lo, scale) >= kmax) & nonzero
        if not bool((down | up).any()):
            break
        cmax = cmax + up.float() - down.float()
    out = torch.empty((*kmin.shape[:-1], int8_bounds_row_bytes(D)), dtype=torch.uint8, device=kmin.device)
    out[..., :D] = cmin.to(torch.uint8)
    out[..., D:2 * D] = cmax.to(torch.uint8)
    out[..., 2 * D:].view(torch.float32).copy_(torch.cat([lo, scale], -1))
    return out


def dequantize_bounds_int8(rows: torch.Tensor) -> torch.Tensor:
    """``[..., 2D + 8]`` uint8 int8-bounds rows -> ``[..., 2, D]`` float32 (min, max)."""
    D = (rows.shape[-1] - 8) // 2
    params = rows[..., 2 * D:].contiguous().view(torch.float32)                                # [..., 2]
    codes = rows[..., :2 * D].unflatten(-1, (2, D))
    return int8_dequantize(codes, params[..., None, 0:1], params[..., None, 1:2])


def page_bounds_float(page_key_bounds: torch.Tensor) -> torch.Tensor:
    """A bounds table (or rows of one) as ``[..., 2, D]`` float32: bf16/fp16 ``[..., 2, D]`` as is, int8 rows
    dequantized."""
    if page_key_bounds.dtype == torch.uint8:
        return dequantize_bounds_int8(page_key_bounds)
    return page_key_bounds.float()


def page_bounds_update_int8(k_cache: torch.Tensor, written_slots: torch.Tensor, page_key_bounds: torch.Tensor,
                            page_size: int) -> None:
    """:func:`page_bounds_update` into an int8 table ``[num_slots // P, HK, 2D + 8]`` uint8: each page touched gets
    the outward encoding (:func:`quantize_bounds_int8`) of its exact min/max over offsets 0..o, recomputed from the
    page's keys (as the bf16 update does: the kernel re-reads the page's tokens anyway), so a page filled over
    many steps ends with exactly the encoding of a page written at once: no widening accumulates. Called by
    :func:`page_bounds_update` (which returns first when no slot was written)."""
    pages, kmin, kmax = _page_min_max(k_cache, written_slots, page_size)
    page_key_bounds[pages] = quantize_bounds_int8(kmin, kmax)


def page_bounds_update_layers(k_caches: list[torch.Tensor], written_slots: torch.Tensor,
                              page_key_bounds: list[torch.Tensor], page_size: int) -> None:
    """:func:`page_bounds_update` for every layer (``k_caches[l]`` with ``page_key_bounds[l]``), same slots."""
    for k_cache, bounds in zip(k_caches, page_key_bounds, strict=True):
        page_bounds_update(k_cache, written_slots, bounds, page_size)


# ----------------------------------------------------------------------------- 2. Quest page scores


def quest_page_scores(q: torch.Tensor, page_key_bounds: torch.Tensor, req_to_token: torch.Tensor,
                      req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                      max_pages: int, skip_pages_upto: int = 0, skip_rows: torch.Tensor | None = None,
                      group_score: str = "max") -> torch.Tensor:
    """Quest's upper-bound score of every page of every request, per KV head.

    For query head g and page bounds (min_d, max_d): ``u_g = sum_d max(q_gd * min_d, q_gd * max_d)``, an upper
    bound of ``q_g . k`` for every key k of the page. The G query heads of a GQA group share one selection, so
    the group's score is ``max_g u_g``: an upper bound of every logit any head of the group can have in the
    page, which keeps Quest's guarantee (a page that holds the largest logit of some head is never ranked
    below a page that cannot reach it). Softmax scaling is a positive constant and is left out.

    Args:
        q: ``[B, HQ, D]`` fp16/bf16.
        page_key_bounds: ``[num_pages_total, HK, 2, D]``, or int8 rows ``[num_pages_total, HK, 2D + 8]`` uint8
            (see :func:`quantize_bounds_int8`; scored from their dequantized bounds).
        req_to_token, req_pool_indices, seq_lens: see the module docstring.
        page_size: P.
        max_pages: columns of the output (>= the pages of the longest request).
        skip_pages_upto: requests with at most this many pages are not scored (top-k keeps all their pages).
        skip_rows: optional ``[B]``; requests with a nonzero entry are not scored (their selection is reused).
        group_score: ``max`` (above) or ``mean``: the mean of the G heads' bounds, which ranks pages by what the
            group needs on average and bounds no single head's logits.

    Returns:
        ``[B, HK, max_pages]`` float32. Defined: the columns below the page count of each scored request. The
        kernel leaves the other entries unwritten; here they are ``-inf``.
    """
    P = page_size
    out, qg, rows = _scored_rows(q, page_key_bounds, req_to_token, req_pool_indices, seq_lens, P, max_pages,
                                 skip_pages_upto, skip_rows)
    for b, n, row in rows:
        phys = row[torch.arange(n, device=row.device) * P].long() // P                     # [n]
        for c0 in range(0, n, 1024):
            bounds = page_bounds_float(page_key_bounds[phys[c0:c0 + 1024]])                  # [c, HK, 2, D]
            out[b, :, c0:c0 + bounds.shape[0]] = _bound_scores(qg[b], bounds, group_score).transpose(0, 1)
    return out


def _scored_rows(q, page_key_bounds, req_to_token, req_pool_indices, seq_lens, page_size: int, max_pages: int,
                 skip_pages_upto: int, skip_rows):
    """The ``-inf`` output ``[B, HK, max_pages]``, the float32 queries ``[B, HK, G, D]`` and the requests to score:
    ``(b, pages, req_to_token row)`` for each request with pages, more than ``skip_pages_upto`` of them and no
    nonzero ``skip_rows`` entry."""
    HK = page_key_bounds.shape[1]
    B, HQ, D, G = _gqa(q, HK)
    out = torch.full((B, HK, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
    npg = num_pages(seq_lens, page_size)
    rows = [(b, int(npg[b]), req_to_token[int(req_pool_indices[b])]) for b in range(B)
            if 0 < int(npg[b]) and int(npg[b]) > skip_pages_upto
            and (skip_rows is None or int(skip_rows[b]) == 0)]
    return out, q.float().view(B, HK, G, D), rows


def _bound_scores(qg: torch.Tensor, bounds: torch.Tensor, group_score: str = "max") -> torch.Tensor:
    """Quest's bound per page and KV head, ``max_g sum_d max(q_gd * min_d, q_gd * max_d)`` (``group_score`` "mean":
    the mean over g): ``qg`` ``[HK, G, D]`` and ``bounds`` ``[c, HK, 2, D]`` float32 -> ``[c, HK]``."""
    kmin, kmax = bounds[:, None, :, 0], bounds[:, None, :, 1]                                # [c, 1, HK, D]
    qq = qg.permute(1, 0, 2)[None]                                                           # [1, G, HK, D]
    u = torch.maximum(qq * kmin, qq * kmax).sum(-1)                                          # [c, G, HK]
    return u.mean(1) if group_score == "mean" else u.amax(1)


def quest_refine_scores(q: torch.Tensor, page_key_bounds: torch.Tensor, req_to_token: torch.Tensor,
                        req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, coarse_pages: torch.Tensor,
                        coarse_count: torch.Tensor, page_size: int, ratio: int, max_pages: int,
                        skip_pages_upto: int = 0, skip_rows: torch.Tensor | None = None,
                        group_score: str = "max") -> torch.Tensor:
    """Coarse-to-fine scoring's second pass: :func:`quest_page_scores` of the pages inside the coarse pages each
    (request, KV head) kept, ``-inf`` for every other page.

    A coarse page of ``ratio`` pages has the channel-wise min/max of their bounds as its bounds, so its Quest score
    is at least the score of each of its pages (which bounds every logit inside): a page outside the kept coarse
    pages scores at most its coarse page's score, below the kept ones'.

    Args:
        q, page_key_bounds, req_to_token, req_pool_indices, seq_lens, page_size: as :func:`quest_page_scores`.
        coarse_pages: ``[B, HK, Wc]`` int, kept coarse pages (logical coarse page c holds pages
            ``c * ratio .. c * ratio + ratio - 1``); ``coarse_count`` ``[B, HK]`` of them are valid.
        ratio: pages per coarse page. max_pages: output columns.
        skip_pages_upto, skip_rows, group_score: as :func:`quest_page_scores`.

    Returns:
        ``[B, HK, max_pages]`` float32: the score of page j of (b, h) if j is inside a kept coarse page and below
        the request's page count, else ``-inf``. Defined: the columns below the page count of each scored
        request (the kernel leaves the other entries unwritten).
    """
    P = page_size
    if page_key_bounds.dtype == torch.uint8:
        raise ValueError("quest_refine_scores reads bf16/fp16 bounds only (int8 bounds with coarse-to-fine scoring "
                         "are not supported)")
    out, qg, rows = _scored_rows(q, page_key_bounds, req_to_token, req_pool_indices, seq_lens, P, max_pages,
                                 skip_pages_upto, skip_rows)
    for b, n, row in rows:
        for h in range(page_key_bounds.shape[1]):
            kept = coarse_pages[b, h, :int(coarse_count[b, h])].long()
            pages = (kept[:, None] * ratio + torch.arange(ratio, device=kept.device)).reshape(-1)
            pages = pages[(pages < n) & (pages < max_pages)]
            if pages.numel() == 0:
                continue
            bounds = page_key_bounds[row[pages * P].long() // P, h:h + 1].float()            # [c, 1, 2, D]
            out[b, h, pages] = _bound_scores(qg[b, h:h + 1], bounds, group_score)[:, 0]
    return out


# ----------------------------------------------------------------------------- 3. top-k pages


def topk_pages(page_scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, top_k: int, n_sink: int,
               n_local: int, select_all_upto: int = 0, *,
               reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
               row_top_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` best pages per (request, KV head), always including sinks and the local window; or a kept
    selection reused.

    Args:
        page_scores: ``[B, HK, max_pages]`` float32 (as from :func:`quest_page_scores`).
        seq_lens: ``[B]``; request b has ``n = ceil(seq_len / P)`` pages.
        top_k: pages to keep, ``>= n_sink + n_local``.
        n_sink: the first ``n_sink`` pages are always kept.
        n_local: the last ``n_local`` pages (the current, possibly partial page included) are always kept.
        select_all_upto: a request with ``n <= fit = max(top_k, select_all_upto)`` pages keeps every page (the
            dense fallback for requests shorter than the sparse minimum context).
        reuse: optional ``(req_pool_indices [B], reuse_from [B], kept [max_reqs, HK, top_k] int32,
            extra_pages)``, for a request with ``n > fit`` pages:

            - ``reuse_from[b] > 0`` (the seq_len at which the row's plan made its selection): the row's top-k is
              ``kept[req_pool_indices[b], h]`` (ascending), followed by every page after both the kept pages and
              the planned selection, ``max(ceil(reuse_from[b] / P), kept[.., -1] + 1) .. n-1`` (at most
              ``extra_pages`` of them; a layer that selected again since, on a drift test, kept later pages);
              scores are not read;
            - ``reuse_from[b] == 0``: selected from the scores as without reuse, and written to
              ``kept[req_pool_indices[b], h]`` (in place).

        row_top_k: optional ``[B]`` int32, request b's own ``k_b <= top_k`` pages (``>= n_sink + n_local``) in place
            of ``top_k``: it keeps every page when it has at most ``max(k_b, select_all_upto)``, otherwise its
            ``k_b`` best; a kept selection holds ``k_b`` pages (the first ``k_b`` of its kept row).

    Returns:
        selected_pages ``[B, HK, W]`` int32 with ``W = fit`` (``max(fit, top_k + extra_pages)`` with reuse):
        logical page indices in ascending order, ``-1`` past the count;
        num_selected ``[B, HK]`` int32: ``n`` if ``n <= fit``, else ``top_k`` or the row's own ``k`` (plus the
        pages written since, for a reused selection). Among equal scores the lower page index wins.
    """
    if top_k < n_sink + n_local:
        raise ValueError(f"top_k ({top_k}) must be >= n_sink + n_local ({n_sink} + {n_local})")
    B, HK, M = page_scores.shape
    fit = W = max(top_k, select_all_upto)
    if reuse is not None:
        W = max(fit, top_k + reuse[3])
    npg = num_pages(seq_lens, page_size)
    sel = torch.full((B, HK, W), -1, dtype=torch.int32, device=page_scores.device)
    cnt = torch.zeros((B, HK), dtype=torch.int32, device=page_scores.device)
    for b in range(B):
        n = int(npg[b])
        k = top_k if row_top_k is None else int(row_top_k[b])
        if not n_sink + n_local <= k <= top_k:
            raise ValueError(f"request {b}: row_top_k {k} outside {n_sink + n_local}..{top_k}")
        if n <= max(k, select_all_upto):
            sel[b, :, :n] = torch.arange(n, dtype=torch.int32, device=sel.device)
            cnt[b] = n
            continue
        if reuse is not None and int(reuse[1][b]) > 0:
            rpi, reuse_from, kept, extra = reuse
            for h in range(HK):
                row = kept[int(rpi[b]), h, :k]
                first_new = max(-(-int(reuse_from[b]) // page_size), int(row[-1]) + 1)
                if not 0 <= n - first_new <= extra:
                    raise ValueError(f"request {b}: {n - first_new} pages written since its kept selection, more "
                                     f"than extra_pages={extra}")
                sel[b, h, :k] = row
                sel[b, h, k: k + n - first_new] = torch.arange(first_new, n, dtype=torch.int32, device=sel.device)
                cnt[b, h] = k + n - first_new
            continue
        key = page_scores[b, :, :n].clone()
        key[:, :n_sink] = float("inf")
        key[:, n - n_local:] = float("inf")
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
        sel[b, :, :k] = order.sort(-1).values.to(torch.int32)
        cnt[b] = k
        if reuse is not None:
            reuse[2][int(reuse[0][b]), :, :k] = sel[b, :, :k]
    return sel, cnt


def reuse_drift(q: torch.Tensor, req_pool_indices: torch.Tensor, fits_budget: torch.Tensor,
                reuse_from: torch.Tensor, query_kept: torch.Tensor, min_cosine: float) -> torch.Tensor:
    """One layer's selection-reuse decision per request: reuse while the query has not moved (drift test).

    Args:
        q: ``[B, HQ, D]`` decode queries of the layer (HQ = HK * G).
        req_pool_indices: ``[B]`` request slots; fits_budget: ``[B]`` bool, rows attended densely (they neither
            read nor write ``query_kept``: a CUDA-graph padding row's slot may be another request's).
        reuse_from: ``[B]`` int32, the step's plan: > 0 where the slot's kept selection may serve this step.
        query_kept: ``[max_reqs, HK, D]`` (dtype of ``q``), the group-mean query of every KV head stored when the
            slot's selection was made in this layer; updated in place for the rows that select.
        min_cosine: the least cosine similarity, over the KV heads, between the group-mean query now (float32
            mean of the G query heads) and the stored one for the kept selection to serve
            (``dot / sqrt(max(|a|^2 |b|^2, 1e-30))``; a zero vector has similarity 0).

    Returns:
        ``[B]`` int32: ``reuse_from[b]`` where row b reuses in this layer, 0 where it selects; a selecting row
        (planned, or drifted) stores its group-mean queries, rounded to ``query_kept``'s dtype.
    """
    B, HQ, D = q.shape
    HK = query_kept.shape[1]
    mean = q.float().view(B, HK, HQ // HK, D).sum(2) / (HQ // HK)
    out = torch.zeros(B, dtype=torch.int32, device=q.device)
    for b in range(B):
        if bool(fits_budget[b]):
            continue
        slot = int(req_pool_indices[b])
        kept = query_kept[slot].float()
        dot = (mean[b] * kept).sum(-1)
        norms = (mean[b] * mean[b]).sum(-1) * (kept * kept).sum(-1)
        cosine = dot / torch.sqrt(torch.clamp(norms, min=1e-30))
        if int(reuse_from[b]) > 0 and float(cosine.min()) >= min_cosine:
            out[b] = reuse_from[b]
        else:
            query_kept[slot] = mean[b].to(query_kept.dtype)
    return out


# ----------------------------------------------------------------------------- pages -> kv indices


def pages_to_kv_indices(selected_pages: torch.Tensor, num_selected: torch.Tensor, req_to_token: torch.Tensor,
                        req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                        capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand selected pages into the kv indices of their tokens, for FlashInfer's per-head paged decode.

    Args:
        selected_pages: ``[B, HK, K]`` int32, ascending logical pages (as from :func:`topk_pages`).
        num_selected: ``[B, HK]`` int32.
        capacity: columns of the output, ``>= K * P``.

    Returns:
        kv_indices ``[B, HK, capacity]`` int32: ``req_to_token[r, pos] * HK + h`` for every position of every
        selected page below ``seq_len``, in page order, ``-1`` past the count;
        num_kv ``[B, HK]`` int32.
    """
    B, HK, K = selected_pages.shape
    P = page_size
    out = torch.full((B, HK, capacity), -1, dtype=torch.int32, device=selected_pages.device)
    cnt = torch.zeros((B, HK), dtype=torch.int32, device=selected_pages.device)
    for b in range(B):
        row = req_to_token[int(req_pool_indices[b])].long()
        L = int(seq_lens[b])
        for h in range(HK):
            pages = selected_pages[b, h, : int(num_selected[b, h])].long()
            pos = (pages[:, None] * P + torch.arange(P, device=pages.device)[None]).reshape(-1)
            pos = pos[pos < L]
            out[b, h, : pos.numel()] = (row[pos] * HK + h).to(torch.int32)
            cnt[b, h] = pos.numel()
    return out, cnt


def token_rows(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Every token of every request as FlashInfer rows of page size 1 (the dense decode pass): ``[sum(seq_lens)]``
    int32, request b's slots ``req_to_token[req_pool_indices[b], :seq_lens[b]]`` back to back in batch order."""
    rows = [req_to_token[int(r), :int(n)] for r, n in zip(req_pool_indices.tolist(), seq_lens.tolist())]
    if not rows:
        return torch.zeros(0, dtype=torch.int32, device=req_to_token.device)
    return torch.cat(rows).to(torch.int32)


def page_rows(selected_pages: torch.Tensor, num_selected: torch.Tensor, req_to_token: torch.Tensor,
              req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, page_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selected pages as FlashInfer rows of the per-head paged view (page size P, one KV head per row).

    Row ``r = b * HK + h`` lists, back to back from ``indptr[r]``, the page index
    ``req_to_token[req, j * P] * HK + h`` of each selected logical page j: in the view whose page i starts at kv
    index i and steps HK kv indices per token, that page's token o is kv index ``(slot_of_page + o) * HK + h``.

    Args:
        selected_pages: ``[B, HK, W]`` int32, ascending logical pages below ``ceil(seq_len / P)``;
            num_selected: ``[B, HK]`` int32.

    Returns:
        indptr ``[R + 1]`` int32 (``indptr[r] = sum(num_selected[:r])`` over rows in order), page_indices
        ``[R * W]`` int32 (``-1`` after ``indptr[R]``), last_page_len ``[R]`` int32 (tokens of the row's last
        page: ``min(P, seq_len - last_page * P)``, 0 for an empty row) and num_tokens ``[B, HK]`` int32.
    """
    B, HK, W = selected_pages.shape
    P = page_size
    dev = selected_pages.device
    counts = num_selected.reshape(-1).long()
    indptr = torch.zeros(B * HK + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    indices = torch.full((max(B * HK * W, 1),), -1, dtype=torch.int32, device=dev)
    last = torch.zeros(B * HK, dtype=torch.int32, device=dev)
    ntok = torch.zeros((B, HK), dtype=torch.int32, device=dev)
    for b in range(B):
        row = req_to_token[int(req_pool_indices[b])].long()
        L = int(seq_lens[b])
        for h in range(HK):
            r = b * HK + h
            pages = selected_pages[b, h, : int(counts[r])].long()
            if pages.numel() == 0:
                continue
            indices[int(indptr[r]): int(indptr[r + 1])] = (row[pages * P] * HK + h).to(torch.int32)
            last[r] = min(P, L - int(pages[-1]) * P)
            ntok[b, h] = (pages.numel() - 1) * P + int(last[r])
    return indptr, indices, last, ntok


def compact_kv_rows(rows: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack fixed-capacity rows into FlashInfer's CSR form.

    Args:
        rows: ``[R, cap]`` (or ``[B, HK, cap]``) int32; counts: ``[R]`` (or ``[B, HK]``) int32.

    Returns:
        indptr ``[R + 1]`` int32 with ``indptr[r] = sum(counts[:r])``, and flat ``[R * cap]`` int32 holding the
        first ``counts[r]`` entries of row r at ``indptr[r] ...`` (``-1`` after ``indptr[R]``).
    """
    cap = rows.shape[-1]
    rows = rows.reshape(-1, cap)
    counts = counts.reshape(-1).long()
    indptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int32, device=rows.device)
    indptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    flat = torch.full((rows.shape[0] * cap,), -1, dtype=torch.int32, device=rows.device)
    for r in range(rows.shape[0]):
        flat[int(indptr[r]): int(indptr[r + 1])] = rows[r, : int(counts[r])]
    return indptr, flat


# ----------------------------------------------------------------------------- 4. int4 keys


def quantize_keys_int4(k_cache: torch.Tensor, written_slots: torch.Tensor, key_int4: torch.Tensor,
                       key_scale_zero: torch.Tensor, group_size: int) -> None:
    """Asymmetric int4 copy of K for the slots just written (in place).

    Per slot, KV head and group of ``group_size`` consecutive channels (``group_size`` divides D; D is one group
    by default): ``zero = min``, ``scale = (max - min) / 15``, ``code = clamp(round((x - zero) / scale), 0, 15)``
    (round half to even, float32 arithmetic; a constant group has scale 0 and codes 0), so
    ``x_hat = code * scale + zero`` is within ``scale / 2`` of x (up to float32 rounding).

    Args:
        k_cache: ``[num_slots, HK, D]`` fp16/bf16.
        written_slots: ``[N]`` int.
        key_int4: ``[num_slots, HK, D // 2]`` uint8; byte i holds channel 2i in its low nibble and 2i+1 in the
            high nibble.
        key_scale_zero: ``[num_slots, HK, D // group_size, 2]`` float32: (scale, zero).
    """
    if written_slots.numel() == 0:
        return
    S, HK, D = k_cache.shape
    slots = written_slots.long()
    k = k_cache[slots].float().view(-1, HK, D // group_size, group_size)
    mn = k.amin(-1)
    mx = k.amax(-1)
    # Tensor-by-tensor divisions: torch turns division by a Python scalar into a multiplication by its
    # reciprocal on some devices, which rounds differently from the IEEE division the kernel does.
    scale = (mx - mn) / torch.full_like(mx, 15.0)
    # A true division (not a multiplication by 1/scale, which overflows for subnormal scales).
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(scale[..., None] > 0, torch.round((k - mn[..., None]) / safe[..., None]), torch.zeros_like(k))
    codes = codes.clamp(0, 15).to(torch.uint8).view(-1, HK, D)
    key_int4[slots] = codes[..., 0::2] | (codes[..., 1::2] << 4)
    key_scale_zero[slots] = torch.stack([scale, mn], -1)


def int4_codes(key_int4: torch.Tensor) -> torch.Tensor:
    """Unpack ``[..., D // 2]`` uint8 into ``[..., D]`` codes 0..15 (uint8)."""
    lo = key_int4 & 0xF
    hi = key_int4 >> 4
    return torch.stack([lo, hi], -1).flatten(-2)


def dequantize_keys_int4(key_int4: torch.Tensor, key_scale_zero: torch.Tensor) -> torch.Tensor:
    """``x_hat = code * scale + zero``: ``[..., D // 2]`` uint8 and ``[..., D // g, 2]`` -> ``[..., D]`` float32."""
    codes = int4_codes(key_int4).float()
    ng = key_scale_zero.shape[-2]
    shape = codes.shape
    codes = codes.view(*shape[:-1], ng, shape[-1] // ng)
    return (codes * key_scale_zero[..., 0:1] + key_scale_zero[..., 1:2]).view(shape)


# ----------------------------------------------------------------------------- 5. int4 candidate scores


def quantize_query_int8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-head int8 query used against the int4 keys: ``q ~= q_int * q_scale``.

    ``q_scale = max|q| / 127``, ``q_int = clamp(round(q * (127 / max|q|)), -127, 127)`` in float32; a zero head
    has scale 0. Returns (q_int float32 ``[..., D]``, q_scale float32 ``[...]``).
    """
    qf = q.float()
    qmax = qf.abs().amax(-1)
    c127 = torch.full_like(qmax, 127.0)
    inv = torch.where(qmax > 0, c127 / qmax, torch.zeros_like(qmax))   # IEEE divisions, as in the kernel
    q_int = torch.round(qf * inv[..., None]).clamp(-127, 127)
    return q_int, qmax / c127


def int4_candidate_scores(q: torch.Tensor, key_int4: torch.Tensor, key_scale_zero: torch.Tensor,
                          candidates: torch.Tensor, num_candidates: torch.Tensor,
                          sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate logits of candidate tokens from the int4 keys, and their group-mean softmax.

    ``logit_g(t) = sm_scale * q~_g . k^_t`` with ``q~`` the int8 query of :func:`quantize_query_int8` and
    ``k^`` the dequantized int4 key (:func:`dequantize_keys_int4`). The G query heads of the group each get a
    softmax over the candidates; the group's distribution is their mean, ``p(t) = 1/G sum_g softmax_g(t)``:
    it sums to 1, so Twilight's top-p keeps at least a fraction p of the attention mass averaged over the
    group's heads.

    Args:
        q: ``[B, HQ, D]`` fp16/bf16.
        key_int4: ``[num_slots, HK, D // 2]`` uint8; key_scale_zero ``[num_slots, HK, D // g, 2]`` float32.
        candidates: ``[B, HK, C]`` int32 kv indices (``slot * HK + h``).
        num_candidates: ``[B, HK]`` int32, ``<= C``.
        sm_scale: softmax scale (usually ``1 / sqrt(D)``).

    Returns:
        logits ``[B, HK, G, C]`` float32 and probs ``[B, HK, C]`` float32; zero past each row's count.
    """
    S, HK, Dh = key_int4.shape
    B, HQ, D, G = _gqa(q, HK)
    C = candidates.shape[-1]
    q_int, q_scale = quantize_query_int8(q)
    q_deq = (q_int * q_scale[..., None]).double().view(B, HK, G, D)
    k_rows = key_int4.view(S * HK, Dh)
    sz_rows = key_scale_zero.view(S * HK, -1, 2)
    logits = torch.zeros((B, HK, G, C), dtype=torch.float32, device=q.device)
    probs = torch.zeros((B, HK, C), dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(HK):
            n = int(num_candidates[b, h])
            if n == 0:
                continue
            rows = candidates[b, h, :n].long()
            k_hat = dequantize_keys_int4(k_rows[rows], sz_rows[rows]).double()              # [n, D]
            lg = sm_scale * (q_deq[b, h] @ k_hat.T)                                          # [G, n]
            logits[b, h, :, :n] = lg.float()
            probs[b, h, :n] = torch.softmax(lg, -1).mean(0).float()
    return logits, probs


# ----------------------------------------------------------------------------- 6. top-p


def top_p_select(probs: torch.Tensor, num_candidates: torch.Tensor, top_p: float,
                 candidate_ids: torch.Tensor | None = None,
                 keep_all: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Twilight's top-p pruning: the smallest set of candidates holding a fraction ``top_p`` of the mass.

    Per row, with ``n`` candidates, ``total = sum(probs[:n])`` and ``target = top_p * total``: the threshold
    ``tau`` is the largest value such that ``sum(p_i for p_i >= tau) >= target``; every candidate with
    ``p_i >= tau`` is kept (ties at tau are all kept). ``top_p >= 1`` keeps every candidate.

    Args:
        probs: ``[B, HK, C]`` float32 (non-negative).
        num_candidates: ``[B, HK]`` int32.
        top_p: in (0, 1]; values above 1 act as 1.
        candidate_ids: optional ``[B, HK, C]`` int32; when given, the output holds ``candidate_ids`` of the kept
            positions instead of the positions.
        keep_all: optional ``[B]`` bool: the rows of these requests keep every candidate (Twilight's dense
            fallback for requests that fit in the budget).

    Returns:
        kept ``[B, HK, C]`` int32 (ascending position order, ``-1`` past the count) and num_kept ``[B, HK]``.
    """
    if not top_p > 0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, HK, C = probs.shape
    kept = torch.full((B, HK, C), -1, dtype=torch.int32, device=probs.device)
    cnt = torch.zeros((B, HK), dtype=torch.int32, device=probs.device)
    for b in range(B):
        for h in range(HK):
            n = int(num_candidates[b, h])
            if n == 0:
                continue
            p = probs[b, h, :n].double()
            if top_p >= 1.0 or (keep_all is not None and bool(keep_all[b])):
                keep = torch.ones(n, dtype=torch.bool, device=p.device)
            else:
                target = top_p * p.sum()
                desc = torch.sort(p, descending=True).values
                m = int(torch.searchsorted(torch.cumsum(desc, 0), target))
                tau = desc[min(m, n - 1)]
                keep = p >= tau
            pos = torch.nonzero(keep).flatten()
            vals = pos if candidate_ids is None else candidate_ids[b, h, pos].long()
            kept[b, h, : pos.numel()] = vals.to(torch.int32)
            cnt[b, h] = pos.numel()
    return kept, cnt


# ----------------------------------------------------------------------------- 7. vAttention sampling

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for uint32 values held in int64, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on uint32 values held in int64 (bit-exact with ``hash32`` in common.cuh)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def rng_key(seed: int, head: int) -> int:
    """Key of the draw stream of one (row seed, KV head); ``seed`` is an int64 (taken as its 64 bits)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    inner = hash32(t((s >> 32) ^ int(hash32(t(head)))))
    return int(hash32(t(s & _M32) ^ inner))


def rng_uniform(key: int, i: torch.Tensor, n: int) -> torch.Tensor:
    """Draws ``i`` (int64 tensor) of stream ``key``: uniform integers in ``[0, n)`` (multiply-shift)."""
    x = hash32(key ^ hash32(i))
    return (x * n) >> 32


def vattention_z(delta: float) -> float:
    """Two-sided normal quantile used by the sample-size rule: ``Phi^-1(1 - delta / 4)``."""
    return NormalDist().inv_cdf(1.0 - delta / 4.0)


def vattention_eps(epsilon: float) -> float:
    """Relative error allowed on each of the denominator and numerator: ``epsilon / (2 + epsilon)``."""
    return epsilon / (2.0 + epsilon)


def vattention_sample(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      selected_pages: torch.Tensor, num_selected: torch.Tensor, req_to_token: torch.Tensor,
                      req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seeds: torch.Tensor,
                      lse_det: torch.Tensor, o_det: torch.Tensor, page_size: int, sm_scale: float,
                      epsilon: float, delta: float, base_rate: float,
                      capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vAttention's adaptive uniform sample of the tokens outside the deterministic set.

    The deterministic set of (request b, KV head h) is its selected pages (sinks, local window and top-k, as
    from :func:`topk_pages`); attention over it has already run and gave, per query head g, ``o_det`` and
    ``lse_det`` (base 2, FlashInfer's convention). In the scale ``e_i = exp(l_i - lse_det_g * ln 2)`` with
    ``l_i = sm_scale * q_g . k_i``, the deterministic part has denominator 1 and numerator ``o_det``.
    The residual R (tokens of unselected pages, ``N_s = |R|``) is sampled uniformly with replacement by a
    counter-based RNG: draw i is residual token ``rng_uniform(rng_key(seeds[b], h), i, N_s)`` (residual
    tokens numbered in position order).

    1. Base sample: ``n_base = min(max(2, ceil(base_rate * N_s)), capacity)`` draws (``base_rate >= 1`` is a whole
       number of draws instead of a fraction, as in the paper's implementation). If ``N_s <= n_base`` every
       residual token is taken (exact, weight 1).
    2. From the base sample, per query head: mean and sample variance of ``e``, and of the vector ``e * v``
       (its variance summed over channels); ``D^ = 1 + N_s * mean(e)``, ``N^ = o_det + N_s * mean(e v)``.
    3. Sample size (the paper's CLT rule, ``n >= (z * N_s * sigma / (eps * estimate))**2``) for the
       denominator and for the numerator (``sigma`` of ``e v`` and ``||N^||``), with ``eps' = eps / (2 + eps)``
       and ``z = Phi^-1(1 - delta / 4)`` (two-sided, each part at ``delta / 2``). If
       ``|D^ - D| <= eps' D`` and ``||N^ - N|| <= eps' ||N||`` then ``||o^ - o|| <= eps ||o||``, so the output's
       relative error exceeds eps with probability at most delta (union bound, CLT approximation).
       ``required`` is the ceiling of the largest size over the group's query heads.
    4. ``n = max(required, n_base)``. If ``n >= N_s`` and ``N_s <= capacity`` all residual tokens are taken
       (weight 1). Otherwise ``n = min(n, capacity)`` draws (the first ``n_base`` are the base sample) with
       importance weight ``N_s / n``: the sampled attention's LSE gets ``+ log2(weight)`` before the merge.

    Args:
        q: ``[B, HQ, D]``; k_cache, v_cache: ``[num_slots, HK, D]`` fp16/bf16.
        selected_pages, num_selected: deterministic pages, ascending, as from :func:`topk_pages`; they must
            include the last (partial) page.
        seeds: ``[B]`` int64, one RNG seed per request row (vary it per step and layer).
        lse_det: ``[B, HQ]`` float32, base-2 LSE of the deterministic attention (scaled logits).
        o_det: ``[B, HQ, D]``, the deterministic attention output.
        sm_scale: softmax scale. epsilon, delta: the (eps, delta) target. base_rate: a fraction in (0, 1) or a
            whole number of draws >= 1.
        capacity: columns of the sample output.

    Returns:
        sample_kv_indices ``[B, HK, capacity]`` int32 (``-1`` past the count), num_sampled ``[B, HK]`` int32,
        sample_weight ``[B, HK]`` float32 (0 when nothing is left to sample), required ``[B, HK]`` int32
        (the computed sample size before clamping, capped at 2**31 - 1; ``N_s`` when everything was taken
        because ``N_s <= n_base``).
    """
    HK = k_cache.shape[1]
    B, HQ, D, G = _gqa(q, HK)
    P = page_size
    dev = q.device
    eps_part = vattention_eps(epsilon)
    z = vattention_z(delta)
    out = torch.full((B, HK, capacity), -1, dtype=torch.int32, device=dev)
    cnt = torch.zeros((B, HK), dtype=torch.int32, device=dev)
    weight = torch.zeros((B, HK), dtype=torch.float32, device=dev)
    required = torch.zeros((B, HK), dtype=torch.int32, device=dev)
    qf = q.float().view(B, HK, G, D)
    ln2 = math.log(2.0)
    for b in range(B):
        L = int(seq_lens[b])
        n_pages = (L + P - 1) // P
        row = req_to_token[int(req_pool_indices[b])].long()
        for h in range(HK):
            sel = selected_pages[b, h, : int(num_selected[b, h])].long()
            mask = torch.ones(n_pages, dtype=torch.bool, device=dev)
            mask[sel] = False
            unselected = torch.nonzero(mask).flatten()
            pos_all = (unselected[:, None] * P + torch.arange(P, device=dev)[None]).reshape(-1)
            pos_all = pos_all[pos_all < L]                           # residual positions, ascending
            n_s = pos_all.numel()
            if n_s == 0:
                continue
            want = math.floor(base_rate) if base_rate >= 1 else math.ceil(base_rate * n_s)
            n_base = min(max(2, want), capacity)
            if n_s <= n_base:
                r = torch.arange(n_s, device=dev)
                n_take, w, req = n_s, 1.0, n_s
            else:
                key = rng_key(int(seeds[b]), h)
                rb = rng_uniform(key, torch.arange(n_base, device=dev), n_s)
                slots = row[pos_all[rb]]
                k = k_cache[slots, h].double()                         # [n_base, D]
                v = v_cache[slots, h].double()
                lg = sm_scale * (qf[b, h].double() @ k.T)              # [G, n_base]
                e = torch.exp(lg - lse_det[b, h * G:(h + 1) * G, None].double() * ln2)
                mean_e = e.mean(1)
                var_e = e.var(1, unbiased=True).clamp_min(0)
                ev = e[:, :, None] * v[None]                           # [G, n_base, D]
                var_n = ev.var(1, unbiased=True).sum(-1).clamp_min(0)
                d_hat = 1.0 + n_s * mean_e
                n_hat = (o_det[b, h * G:(h + 1) * G].double() + n_s * ev.mean(1)).norm(dim=-1)
                n_den = (z * n_s * var_e.sqrt() / (eps_part * d_hat)) ** 2
                n_num = (z * n_s * var_n.sqrt() / (eps_part * n_hat)) ** 2
                need = float(torch.maximum(n_den, n_num).max())
                req = int(min(math.ceil(need), 2**31 - 1)) if math.isfinite(need) else 2**31 - 1
                n = max(req, n_base)
                if n >= n_s and n_s <= capacity:
                    r = torch.arange(n_s, device=dev)
                    n_take, w = n_s, 1.0
                else:
                    n_take = min(n, capacity)
                    r = rng_uniform(key, torch.arange(n_take, device=dev), n_s)
                    w = n_s / n_take
            out[b, h, :n_take] = (row[pos_all[r]] * HK + h).to(torch.int32)
            cnt[b, h] = n_take
            weight[b, h] = w
            required[b, h] = req
    return out, cnt, weight, required


def merge_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Merge two partial attentions by their base-2 LSE (float32 math), like ``flashinfer.merge_state``.

    ``o_a``/``o_b`` ``[..., D]``, ``lse_a``/``lse_b`` ``[...]``; a side with LSE ``-inf`` contributes nothing.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp2(lse_a - m)
    wb = torch.exp2(lse_b - m)
    out = (o_a.float() * wa[..., None] + o_b.float() * wb[..., None]) / (wa + wb)[..., None]
    return out.to(o_a.dtype)


def vattention_merge(o_det: torch.Tensor, lse_det: torch.Tensor, o_s: torch.Tensor, lse_s: torch.Tensor,
                     s_counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """vAttention's output: the deterministic attention merged with the importance-weighted sample attention.

    ``o_det``/``o_s`` ``[B, HQ, D]``, ``lse_det``/``lse_s`` ``[B, HQ]`` float32 base 2, ``s_counts`` ``[B, HK]``
    int32 (a KV head with no sample keeps ``o_det``; its ``o_s``/``lse_s`` are not used, whatever they hold),
    ``weight`` ``[B, HK]`` float32: each sampled token stands for ``weight`` residual tokens, so the sample's LSE
    gains ``log2(weight)`` (clamped at 1e-30). Returns ``[B, HQ, D]`` in ``o_det``'s dtype.
    """
    B, HQ, D = o_det.shape
    HK = s_counts.shape[1]
    G = HQ // HK
    sampled = (s_counts > 0)[..., None].expand(B, HK, G).reshape(B, HQ)
    o_s = torch.where(sampled[..., None], o_s, torch.zeros_like(o_det))             # empty rows: no NaN
    log_w = torch.log2(weight.float().clamp_min(1e-30))[..., None].expand(B, HK, G).reshape(B, HQ)
    lse_s = torch.where(sampled, lse_s.float() + log_w, torch.full_like(log_w, -math.inf))
    return merge_states(o_det, lse_det.float(), o_s, lse_s)
