"""The three methods as small policies composed from the shared kernels.

Every policy is written once against a kernel set ``ops`` (the :mod:`cupy_kernels` package on the GPU, or
:mod:`cupy_kernels.reference` on CPU) and an attention callable, so the GPU operator and the torch reference
run literally the same selection logic:

    quest:      page scores -> top-k pages (sinks, local forced) -> attention over the selected pages
    twilight:   quest at the loose budget -> int4 scores + group softmax -> top-p -> attention
    vattention: quest -> attention with LSE -> (eps, delta) residual sample -> attention -> weighted merge

Selections are ascending logical pages ``[B, HK, W]`` plus counts ``[B, HK]``, attended as pages; token lists
(Twilight's candidates, vAttention's sample) are fixed-capacity rows ``[B, HK, C]`` of kv indices
(``slot * HK + h``) plus counts ``[B, HK]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .config import SparseConfig


@dataclass
class DecodeBatch:
    """SGLang's view of a decode batch (device tensors).

    The operator builds it in ``plan()`` with int32 copies of SGLang's int64 index tensors (so no kernel of the
    step casts them again) and with ``fits_budget`` computed once for its config; the references accept any
    integer dtype and compute ``fits_budget`` when it is ``None``.
    """

    req_to_token: torch.Tensor       # [max_reqs, max_ctx] int32
    req_pool_indices: torch.Tensor   # [B] int
    seq_lens: torch.Tensor           # [B] int, the new token included
    max_pages: int                   # score columns: >= ceil(max seq_len / P), fixed per captured batch size
    fits_budget: torch.Tensor | None = None   # [B] bool, fits_in_budget() for the config the batch was planned for
    reuse_from: torch.Tensor | None = None    # [B] int32, SelectionReuse.plan(): > 0 where a kept selection serves
    row_top_k: torch.Tensor | None = None     # [B] int32, each request's own budget in pages (None: the config's)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]


class Attention(Protocol):
    """Attention of one layer over selected tokens: the operator's FlashInfer wrappers, or the float32 reference.

    Outputs hold ``B * HQ`` rows of ``D`` (reshape to ``[B, HQ, D]``); LSEs are base 2, ``B * HQ`` entries.
    """

    def tokens(self, q: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, *, which: str,
               return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend token rows ``[B, HK, C]`` (kv indices) with ``counts`` ``[B, HK]``; ``which``: ``main`` or
        ``sample`` (the index buffers used)."""

    def page_rows_out(self) -> tuple[torch.Tensor, ...] | None:
        """Where the selection may write its pages as the attention's own rows (``topk_pages``'
        ``page_rows_out``), or None: :meth:`pages` then builds them."""

    def pages(self, q: torch.Tensor, selected_pages: torch.Tensor, num_selected: torch.Tensor, *,
              return_lse: bool, rows_written: bool = False) -> tuple[torch.Tensor, ...]:
        """Attend every token of the selected logical pages ``[B, HK, W]`` (ascending) with ``num_selected``
        ``[B, HK]``; returns ``(o, num_tokens)`` or ``(o, lse, num_tokens)``, num_tokens ``[B, HK]`` int32.
        ``rows_written``: the selection wrote them into :meth:`page_rows_out` already."""


@dataclass
class LayerTables:
    """The metadata one layer's selection reads."""

    page_key_bounds: torch.Tensor
    key_int4: torch.Tensor | None = None
    key_scale_zero: torch.Tensor | None = None
    kept_selection: torch.Tensor | None = None   # [max_reqs, HK, top_k] int32: SelectionReuse.layer(layer)
    kept_query: torch.Tensor | None = None       # [max_reqs, HK, D]: SelectionReuse.layer_queries(layer)
    coarse_key_bounds: torch.Tensor | None = None   # [num_slots // C, HK, 2, D]: coarse-to-fine scoring


class SelectionObserver(Protocol):
    """What a diagnostic sees of one layer's page selection (the CPU path's
    :func:`sgl_sparse.hf_sparse.sparse_attention` ``observer``; ``launch/selection_trace.py``).

    Called once per :func:`select_pages` with its own tensors, which it must not modify: ``page_scores``
    ``[B, HK, max_pages]`` float32 (Quest's bound per logical page; ``-inf`` where not scored: a request within
    ``dense_pages``, one reusing a kept selection, a page outside the kept coarse pages), ``selected_pages``
    ``[B, HK, W]`` int32 (ascending, ``-1`` past the count) and ``num_selected`` ``[B, HK]``."""

    def __call__(self, page_scores: torch.Tensor, selected_pages: torch.Tensor,
                 num_selected: torch.Tensor) -> None: ...


def select_pages(ops, cfg: SparseConfig, q: torch.Tensor, tables: LayerTables, batch: DecodeBatch,
                 observe: SelectionObserver | None = None, page_rows_out: tuple | None = None):
    """Quest's selection: ``(selected_pages [B, HK, W], num_selected [B, HK])``, W = cfg.dense_pages (or
    more with reuse); a request past ``dense_pages`` selects ``batch.row_top_k`` pages (its own budget) if set.
    ``observe`` (diagnostics; the operator never passes it) is called with the page scores the selection ranked
    and the selection: see :class:`SelectionObserver`. ``page_rows_out``: :meth:`Attention.page_rows_out`, where
    the selection is also written as the attention's rows."""
    P = cfg.page_size
    reuse = None
    if tables.kept_selection is not None:
        reuse_from = batch.reuse_from
        if tables.kept_query is not None:      # the drift test: this layer selects again where the query moved
            reuse_from = ops.reuse_drift(q, batch.req_pool_indices, fits_in_budget(cfg, batch), reuse_from,
                                         tables.kept_query, cfg.reselect_min_cosine)
        reuse = (batch.req_pool_indices, reuse_from, tables.kept_selection, cfg.reuse_extra_pages)
    # Requests that keep every page (within the budget or below min_context) or reuse a kept selection are not
    # scored.
    skip_rows = reuse[1] if reuse else None
    if cfg.coarse:
        scores = coarse_to_fine_scores(ops, cfg, q, tables, batch, skip_rows)
    else:
        scores = ops.quest_page_scores(q, tables.page_key_bounds, batch.req_to_token, batch.req_pool_indices,
                                       batch.seq_lens, P, batch.max_pages, skip_pages_upto=cfg.dense_pages,
                                       skip_rows=skip_rows, group_score=cfg.group_score)
    # a request's own budget (row_top_k) applies past dense_pages: shorter requests keep every page whatever it is
    into_rows = {} if page_rows_out is None else {"page_rows_out": page_rows_out}
    selected = ops.topk_pages(scores, batch.seq_lens, P, cfg.top_k_pages, cfg.sink_pages, cfg.local_pages,
                              select_all_upto=cfg.dense_pages, reuse=reuse, row_top_k=batch.row_top_k, **into_rows)
    if observe is not None:
        observe(scores, *selected)
    return selected


def coarse_to_fine_scores(ops, cfg: SparseConfig, q: torch.Tensor, tables: LayerTables, batch: DecodeBatch,
                          skip_rows: torch.Tensor | None) -> torch.Tensor:
    """``[B, HK, max_pages]`` page scores by coarse-to-fine scoring: the coarse pages (``coarse_page_tokens``) of
    every request are scored, the ``coarse_top_k`` best kept per KV head, and only the pages inside them scored
    (the others ``-inf``); top-k then ranks them as it ranks :func:`quest_page_scores`' (sinks and the local
    window are forced there whatever their score). A request that fits in ``coarse_top_k`` coarse pages gets
    every page scored: the same scores as without the coarse pass."""
    C, R = cfg.coarse_page_tokens, cfg.coarse_ratio
    max_coarse = -(-batch.max_pages // R)
    skip_coarse = cfg.dense_pages // R               # rows this short fit the budget (a few longer ones that also
    coarse = ops.quest_page_scores(q, tables.coarse_key_bounds, batch.req_to_token,   # fit are scored for nothing)
                                   batch.req_pool_indices, batch.seq_lens, C, max_coarse,
                                   skip_pages_upto=skip_coarse, skip_rows=skip_rows, group_score=cfg.group_score)
    kept, count = ops.topk_pages(coarse, batch.seq_lens, C, cfg.coarse_top_k, 0, 0)
    return ops.quest_refine_scores(q, tables.page_key_bounds, batch.req_to_token, batch.req_pool_indices,
                                   batch.seq_lens, kept, count, cfg.page_size, R, batch.max_pages,
                                   skip_pages_upto=cfg.dense_pages, skip_rows=skip_rows,
                                   group_score=cfg.group_score)


def pages_to_tokens(ops, cfg: SparseConfig, selected, batch: DecodeBatch):
    sel, cnt = selected
    return ops.pages_to_kv_indices(sel, cnt, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                                   cfg.page_size, sel.shape[-1] * cfg.page_size)


def selected_tokens(cfg: SparseConfig, seq_lens: torch.Tensor, row_pages: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``[B]`` int64 tokens :func:`select_pages` keeps per KV head, from the lengths alone (host or device):
    every page of a request within ``dense_pages``, else ``top_k`` pages, the request's last (partial) page
    always among them. With selection reuse, an upper bound: a reused selection adds up to
    ``cfg.reuse_extra_pages`` pages written since."""
    P = cfg.page_size
    lens = seq_lens.long()
    n = (lens + P - 1) // P
    k = torch.full_like(n, cfg.top_k_pages) if row_pages is None else row_pages.long()
    pages = torch.where(within_budget(cfg, lens), n, k + cfg.reuse_extra_pages)
    return (torch.minimum(pages, n) - 1) * P + (lens - (n - 1) * P)


class SelectionReuse:
    """Selections kept per request slot and reused for ``cfg.reselect_every`` decode steps (device state).

    ``plan()`` (once per step, device ops only, so a CUDA graph replay can follow) decides per row: a request
    with more than ``dense_pages`` pages reuses its kept selection while it has grown by 1 to
    ``reselect_every - 1`` tokens since; otherwise it selects, and the selection is kept (by ``topk_pages``) for
    the steps after. Rows within the budget (CUDA-graph padding rows among them) neither read nor write kept
    state. ``forget()`` drops the selections of request slots that (re)start: SGLang reuses a slot for a new
    request, and a request retracted and prefilled again has new pages.

    With the drift test (``cfg.reselect_min_cosine > -1``) a layer whose query moved selects again before the
    plan says so (``reuse_drift``, per layer); its kept pages then end later than the plan's selection, and a
    reusing step appends only the pages after both (``topk_pages``).

    Memory: ``kept`` ``[layers, max_reqs, HK, top_k]`` int32 and ``selected_at`` ``[max_reqs + 1]`` int32 (the
    seq_len at which each slot's selection was made, 0 = none; the last entry absorbs writes of rows that keep
    nothing, so that the scatter never races with a real request's entry); with the drift test, ``queries``
    ``[layers, max_reqs, HK, head_dim]`` (``dtype``): the group-mean queries each kept selection was made for.
    """

    def __init__(self, cfg: SparseConfig, num_layers: int, max_reqs: int, num_kv_heads: int,
                 device: torch.device | str, head_dim: int | None = None, dtype: torch.dtype | None = None):
        if cfg.drift_test and (head_dim is None or dtype is None):
            raise ValueError("the drift test stores queries: give head_dim and dtype")
        self.cfg = cfg
        self.max_reqs = max_reqs
        self.kept = torch.zeros((num_layers, max_reqs, num_kv_heads, cfg.top_k_pages), dtype=torch.int32,
                                device=device)
        self.selected_at = torch.zeros(max_reqs + 1, dtype=torch.int32, device=device)
        self.kept_pages = torch.zeros(max_reqs + 1, dtype=torch.int32, device=device)   # k of each kept selection
        self.queries = (torch.zeros((num_layers, max_reqs, num_kv_heads, head_dim), dtype=dtype, device=device)
                        if cfg.drift_test else None)

    def plan(self, batch: DecodeBatch, out: torch.Tensor) -> torch.Tensor:
        """Write ``reuse_from`` ``[B]`` int32 into ``out``: the seq_len of the kept selection a row reuses, or 0
        where the row selects (and its slot's ``selected_at`` becomes its seq_len)."""
        idx = batch.req_pool_indices.long()
        lens = batch.seq_lens.to(torch.int32)
        at = self.selected_at[idx]
        sparse = ~fits_in_budget(self.cfg, batch)
        k = batch.row_top_k if batch.row_top_k is not None else torch.full_like(lens, self.cfg.top_k_pages)
        # lens > at: a step never reuses the selection it makes itself (plan() twice for one step selects twice);
        # a kept selection of another size (the slot's request asked for another budget) is never reused
        reuse = sparse & (at > 0) & (lens > at) & (lens - at < self.cfg.reselect_every) & (self.kept_pages[idx] == k)
        torch.mul(at, reuse, out=out)
        selects = torch.where(sparse & ~reuse, idx, self.max_reqs)
        self.selected_at[selects] = lens
        self.kept_pages[selects] = k.to(torch.int32)
        return out

    def forget(self, req_pool_indices: torch.Tensor) -> None:
        """Request slots that (re)start: their next decode step selects."""
        self.selected_at[req_pool_indices.long()] = 0

    def layer(self, index: int) -> torch.Tensor:
        """Kept selections of the ``index``-th sparse layer, ``[max_reqs, HK, top_k]``."""
        return self.kept[index]

    def layer_queries(self, index: int) -> torch.Tensor | None:
        """Stored queries of the ``index``-th sparse layer, ``[max_reqs, HK, head_dim]`` (None: no drift test)."""
        return self.queries[index] if self.queries is not None else None

    def tensors(self) -> list[torch.Tensor]:
        """The device memory this state holds."""
        return [t for t in (self.kept, self.selected_at, self.kept_pages, self.queries) if t is not None]


def within_budget(cfg: SparseConfig, seq_lens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` bool (host or device, into ``out`` if given): requests with at most ``dense_pages`` pages, attended
    densely (they fit in the config's budget or are below min_context; whatever budget they ask for themselves);
    the others need a selection."""
    return torch.le((seq_lens + (cfg.page_size - 1)) // cfg.page_size, cfg.dense_pages, out=out)


def needs_selection(cfg: SparseConfig, seq_lens_cpu: torch.Tensor, opted: torch.Tensor | None = None) -> bool:
    """Whether a decode step runs a selection at all (host only): some request (host ``[B]`` lengths; ``opted``:
    host ``[B]`` bool of opted-out rows, which never select) is past :func:`within_budget`, and those requests hold
    at least ``cfg.min_batch_tokens`` tokens in all (the batch floor: below it the selection's fixed cost per layer
    is more than the dense step it saves). Otherwise every row of the step is attended densely."""
    if not cfg.is_sparse:
        return False
    lens = seq_lens_cpu.to(torch.int64)
    selects = ~within_budget(cfg, lens)
    if opted is not None:
        selects &= ~opted
    return bool(selects.any()) and int(lens[selects].sum()) >= cfg.min_batch_tokens


def fits_in_budget(cfg: SparseConfig, batch: DecodeBatch) -> torch.Tensor:
    """:func:`within_budget` of the batch (the operator computes it once per step, in ``plan()``)."""
    return batch.fits_budget if batch.fits_budget is not None else within_budget(cfg, batch.seq_lens)


def quest(ops, cfg, q, tables, batch, attend: Attention, observe: SelectionObserver | None = None):
    rows = attend.page_rows_out()
    return attend.pages(q, *select_pages(ops, cfg, q, tables, batch, observe, rows), return_lse=False,
                        rows_written=rows is not None)


def twilight(ops, cfg, q, tables, batch, attend: Attention, sm_scale: float,
             observe: SelectionObserver | None = None, residual: "Residual | None" = None):
    """Quest's candidates -> int4 scores -> top-p. ``residual`` (with ``cfg.residual_sample``): the tokens outside
    the candidate pages are estimated by vAttention's sample and merged in."""
    selected = select_pages(ops, cfg, q, tables, batch, observe)
    cand, ncand = pages_to_tokens(ops, cfg, selected, batch)
    _, probs = ops.int4_candidate_scores(q, tables.key_int4, tables.key_scale_zero, cand, ncand, sm_scale)
    # requests that fit in the budget keep every candidate (all their tokens): the dense fallback
    rows, counts = ops.top_p_select(probs, ncand, cfg.top_p, candidate_ids=cand, keep_all=fits_in_budget(cfg, batch))
    if residual is None:
        return attend.tokens(q, rows, counts, which="main", return_lse=False), counts
    o_det, lse_det = attend.tokens(q, rows, counts, which="main", return_lse=True)
    return sample_residual(ops, cfg, q, residual, selected, batch, attend, sm_scale, o_det, lse_det, counts)


@dataclass
class Residual:
    """What a residual sample reads besides the selection: the KV cache ``[num_slots, HK, D]`` and the step's
    per-request RNG seeds ``[B]`` int64 (:func:`vattention_seeds`)."""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seeds: torch.Tensor


def sample_residual(ops, cfg, q, residual: Residual, selected, batch: DecodeBatch, attend: Attention,
                    sm_scale: float, o_det: torch.Tensor, lse_det: torch.Tensor, counts: torch.Tensor):
    """vAttention's estimate of the tokens outside ``selected``'s pages, merged with the exact part (``o_det``
    viewable as ``[B, HQ, D]``, ``lse_det`` base 2 as ``[B, HQ]``, ``counts`` ``[B, HK]``): the merged output and
    the attended counts (exact + sampled)."""
    B, HQ, D = q.shape
    o_det = o_det.view(B, HQ, D)
    lse_det = lse_det.reshape(B, HQ).float()
    s_rows, s_counts, weight, _required = ops.vattention_sample(
        q, residual.k_cache, residual.v_cache, *selected, batch.req_to_token, batch.req_pool_indices,
        batch.seq_lens, residual.seeds, lse_det, o_det, cfg.page_size, sm_scale, cfg.epsilon, cfg.delta,
        cfg.base_rate, cfg.sample_capacity)
    o_s, lse_s = attend.tokens(q, s_rows, s_counts, which="sample", return_lse=True)
    # Importance weight: each sampled token stands for N_s / n residual tokens (log2 of it joins the sample's LSE).
    out = ops.vattention_merge(o_det, lse_det, o_s.view(B, HQ, D), lse_s.reshape(B, HQ), s_counts, weight)
    return out, counts + s_counts


def vattention(ops, cfg, q, k_cache, v_cache, tables, batch, attend: Attention, sm_scale: float,
               seeds: torch.Tensor, observe: SelectionObserver | None = None):
    rows = attend.page_rows_out()
    selected = select_pages(ops, cfg, q, tables, batch, observe, rows)
    o_det, lse_det, counts = attend.pages(q, *selected, return_lse=True, rows_written=rows is not None)
    return sample_residual(ops, cfg, q, Residual(k_cache, v_cache, seeds), selected, batch, attend, sm_scale,
                           o_det, lse_det, counts)


def vattention_seeds(base_seed: int, step: torch.Tensor, layer: int, batch_size: int) -> torch.Tensor:
    """Per-request RNG seeds of one (step, layer): ``[B]`` int64 computed on the device (graph-safe).

    ``step`` is a one-element int64 device tensor advanced once per decode step. This is the spec; the operator
    splits it into :func:`vattention_seed_base` (once per step) + :data:`SEED_LAYER_STRIDE` * layer (per layer).
    """
    rows = torch.arange(batch_size, device=step.device, dtype=torch.int64)
    return (step * 1_000_003 + (base_seed * 7_919 + layer) * 65_537) * 4_099 + rows


SEED_LAYER_STRIDE = 65_537 * 4_099   # vattention_seeds(.., layer, ..) = vattention_seed_base(..) + layer * this


def vattention_seed_base(base_seed: int, step: torch.Tensor, batch_size: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``vattention_seeds(base_seed, step, 0, batch_size)``, optionally written into ``out`` (``[B]`` int64)."""
    rows = torch.arange(batch_size, device=step.device, dtype=torch.int64)
    return torch.add(rows, (step * 1_000_003 + base_seed * 7_919 * 65_537) * 4_099, out=out)
