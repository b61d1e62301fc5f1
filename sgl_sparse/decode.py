"""The sparse decode operator: one call per layer per decode step, on SGLang's tensors.

``SparseDecodeOperator`` follows FlashInfer's shape for stateful GPU objects::

    op = SparseDecodeOperator(SparseConfig.load("quest"), num_qo_heads=32, num_kv_heads=8, head_dim=128,
                              num_layers=32, max_batch=32, max_context=131072, dtype=torch.bfloat16)
    meta = SparseKVMetadata(op.config, num_layers=32, num_slots=k_cache.shape[0], num_kv_heads=8,
                            head_dim=128, dtype=torch.bfloat16, device="cuda")
    meta.update(layer, k_cache, out_cache_loc)           # after each KV write (prefill and decode)
    op.plan(req_to_token, req_pool_indices, seq_lens, seq_lens_cpu)   # host, once per step, outside graphs
    o = op.run(layer, q, k_cache, v_cache, meta)          # per layer; capturable in a CUDA graph

Shapes: ``q`` ``[B, HQ, D]``; ``k_cache``/``v_cache`` ``[num_slots, HK, D]`` (SGLang's per-layer MHA pool);
``req_to_token`` ``[max_reqs, max_ctx]`` int32; ``req_pool_indices``/``seq_lens`` ``[B]`` (``seq_lens`` counts
the token being decoded, whose K/V are already in the pool); output ``[B, HQ, D]`` in q's dtype.

Attention runs on stock FlashInfer ``BatchDecodeWithPagedKVCacheWrapper``:
- dense layers (and ``method: dense``): the usual GQA plan over ``req_to_token``, page size 1, planned each
  step from the host sequence lengths;
- sparse layers: per-KV-head selection through the view "rows = request x KV head, one KV head each, G query
  heads each" (``_PerHeadDecode``): Quest's selected pages as page rows (page index ``first_slot*HK + h`` of a
  strided view of the cache, written by ``page_rows``), Twilight's and vAttention's token lists as token rows
  (kv index ``slot*HK + h``, packed by ``compact_kv_rows``). Inside a step the kernels write the wrapper's
  indptr and indices buffers, so top-p and sampling lengths can vary under a CUDA graph; ``plan()`` gives
  FlashInfer each row's length (exact for Quest's selection, an upper bound for top-p, the capacity for
  vAttention's sample) so that its split of the work keeps every CTA busy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

import cupy_kernels as ck

from . import policies
from .config import SparseConfig
from .metadata import SparseKVMetadata
from .policies import DecodeBatch, LayerTables

WORKSPACE_BYTES = 256 * 1024 * 1024
EAGER_BATCH_SIZES = 4     # FlashInfer wrapper sets kept for batch sizes no CUDA graph was captured with
# FlashInfer 0.6's BatchDecodeWithPagedKVCacheWrapper allocates its own int workspace (the plan's work list) of this
# size on the device, besides the float workspace it is given.
FLASHINFER_INT_WORKSPACE_BYTES = 8 * 1024 * 1024
# ... and a page-locked host copy of it, where plan() writes the work list before copying it to the device: the one
# FlashInfer attribute (not API) the operator sets, so that the wrappers of every batch size share their role's.
FLASHINFER_PINNED_INT_WORKSPACE = "_pin_memory_int_workspace_buffer"
ALLOCATION_GRANULE = 512  # PyTorch's CUDA caching allocator rounds every allocation up to a multiple of this


def allocated_bytes(nbytes: int) -> int:
    """Device bytes an allocation of ``nbytes`` takes from PyTorch's caching allocator (as
    ``torch.cuda.memory_allocated`` counts it)."""
    return -(-nbytes // ALLOCATION_GRANULE) * ALLOCATION_GRANULE


def _flashinfer():
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - depends on the host
        raise ImportError("the sparse decode operator needs flashinfer-python (pip install 'sgl-sparse[serve]')") from e
    return flashinfer


class _RoleWorkspace:
    """FlashInfer's int workspace of one wrapper role, shared by the wrappers of every batch size: the device buffer
    (a plan's work list), its page-locked host copy (where plan() writes the list before copying it over) and
    ``planned_by``, the wrapper whose plan() wrote the list the buffer holds now. A step plans one batch size, so a
    wrapper planned in the step finds its own list; one that is not planned per step (vAttention's sample, planned
    at its capacity) plans again when another wrapper of its role has planned since
    (:meth:`_PerHeadDecode.plan_at_capacity`). Every plan() of the role's wrappers runs inside :meth:`planning`."""

    def __init__(self, device_ws: torch.Tensor):
        self.device = device_ws
        self.pinned = torch.empty(FLASHINFER_INT_WORKSPACE_BYTES, dtype=torch.uint8, pin_memory=True)
        self.planned_by = None
        self.copied = torch.cuda.Event()    # recorded after the last plan()'s copy to the device was queued

    @contextlib.contextmanager
    def planning(self, wrapper):
        """Around ``wrapper``'s FlashInfer plan(), which writes the work list into the page-locked copy and queues
        its copy to the device on the current stream without waiting for it. The host waits until the copy the
        role's previous plan() queued has run before the next one overwrites the page-locked buffer: a host that
        plans step N + 1 before the GPU has reached step N's copy would otherwise, with the buffer shared by every
        batch size, have step N's graph replay the list of step N + 1's batch size (an illegal address when that
        one is larger). SGLang's overlap scheduler plans step N + 1 once step N - 1, which the copy follows, has
        finished, so there the wait is short. Nothing is waited for or recorded while a CUDA graph is captured."""
        capturing = torch.cuda.is_current_stream_capturing()
        if not capturing:
            self.copied.synchronize()
        yield
        if not capturing:
            self.copied.record()
        self.planned_by = wrapper

    def attach(self, wrapper, workspace: torch.Tensor) -> None:
        """Point a FlashInfer decode wrapper at the shared float workspace and at this role's buffers (the 8 MiB
        of each that FlashInfer allocated are freed again)."""
        wrapper.reset_workspace_buffer(workspace, self.device)
        if not hasattr(wrapper, FLASHINFER_PINNED_INT_WORKSPACE):
            import flashinfer
            raise RuntimeError(f"flashinfer {flashinfer.__version__}: BatchDecodeWithPagedKVCacheWrapper has no "
                               f"{FLASHINFER_PINNED_INT_WORKSPACE}; sgl-sparse is tested with flashinfer-python "
                               "0.6.15.post1 (pip install 'sgl-sparse[serve]')")
        setattr(wrapper, FLASHINFER_PINNED_INT_WORKSPACE, self.pinned)


def _row_plan(tokens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host (indptr ``[R + 1]``, last_page_len ``[R]``) int32 of rows holding ``tokens`` ``[R]`` tokens each."""
    pages = (tokens.long() + page_size - 1) // page_size
    indptr = torch.zeros(tokens.numel() + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0).to(torch.int32)
    last = (tokens.long() - (pages - 1).clamp_min(0) * page_size).to(torch.int32)
    return indptr, last


class _PerHeadDecode:
    """FlashInfer decode over per-(request, KV head) rows: row ``b * HK + h`` holds one KV head and its G query
    heads.

    Two views of SGLang's ``[slots, HK, D]`` cache:

    - token rows (``page_size`` 1): ``[slots * HK, 1, 1, D]``, entry = kv index ``slot * HK + h``, filled from
      fixed-capacity token rows by ``compact_kv_rows`` (Twilight's top-p survivors, vAttention's sample);
    - page rows (``page_size`` P): ``[(slots - P + 1) * HK, P, 1, D]`` with strides ``(D, HK * D, D, 1)``, so page
      index ``first_slot * HK + h`` is KV head h of one physical page and a row lists selected pages, written
      by ``page_rows`` (Quest's selection, vAttention's deterministic part): P times fewer indices, no
      compaction.

    ``plan(tokens)`` runs on the host, once per step, with an upper bound of every row's tokens (exact for
    page rows): FlashInfer then splits the step's actual work over all its CTAs. Planned at a fixed capacity
    instead, a row attending half its capacity leaves half the CTAs idle. ``indptr_buf``, ``indices_buf`` and
    ``last_buf`` (int32) are shared by the wrappers of every batch size.
    """

    def __init__(self, workspace, role: _RoleWorkspace, batch_size, num_kv_heads, group, head_dim, page_size,
                 capacity, dtype, sm_scale, indptr_buf, indices_buf, last_buf):
        fi = _flashinfer()
        R = batch_size * num_kv_heads
        self.rows, self.group, self.head_dim = R, group, head_dim
        self.num_kv_heads, self.page_size, self.capacity = num_kv_heads, page_size, capacity
        self.dtype, self.sm_scale = dtype, sm_scale
        self.indptr = indptr_buf[: R + 1]
        self.indices = indices_buf[: R * -(-capacity // page_size)]
        self.last = last_buf[:R]
        self.num_tokens = torch.zeros((batch_size, num_kv_heads), dtype=torch.int32, device=indptr_buf.device)
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices, paged_kv_last_page_len_buffer=self.last)
        self.role = role
        role.attach(self.wrapper, workspace)

    def plan_at_capacity(self) -> None:
        """Plan every row at its full capacity (rows whose tokens only the device knows: vAttention's sample),
        unless the role's work list is this wrapper's capacity plan already."""
        if self.role.planned_by is not self:
            self.plan(torch.full((self.rows,), self.capacity, dtype=torch.int32))

    def plan(self, tokens: torch.Tensor) -> None:
        """``tokens`` ``[R]`` (host): the most tokens run() will put in each row this step (<= capacity)."""
        indptr, last = _row_plan(tokens, self.page_size)
        with self.role.planning(self):
            self.wrapper.plan(indptr, self.indices[:0], last, self.group, 1, self.head_dim, self.page_size,
                              q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.sm_scale)

    def _view(self, cache: torch.Tensor) -> torch.Tensor:
        if not cache.is_contiguous():
            raise ValueError("the KV cache must be contiguous [slots, KV heads, head_dim] (its rows are addressed "
                             "by stride)")
        S, HK, D = cache.shape
        P = self.page_size
        if P == 1:
            return cache.view(-1, 1, 1, D)
        return cache.as_strided(((S - P + 1) * HK, P, 1, D), (D, HK * D, D, 1))

    def _attend(self, q, k_cache, v_cache, return_lse):
        kv = (self._view(k_cache), self._view(v_cache))
        return self.wrapper.run(q.reshape(self.rows, self.group, self.head_dim), kv, return_lse=return_lse)

    def run_tokens(self, q, k_cache, v_cache, rows, counts, return_lse):
        """Attend token rows ``[B, HK, C]`` (kv indices) with ``counts`` ``[B, HK]`` (page size 1 only)."""
        ck.compact_kv_rows(rows, counts, out=(self.indptr, self.indices))
        return self._attend(q, k_cache, v_cache, return_lse)

    def page_rows_out(self, batch: DecodeBatch, num_tokens_out: torch.Tensor | None = None) -> tuple:
        """``topk_pages``' ``page_rows_out``: this wrapper's index buffers (and ``num_tokens_out``, else its own
        token counts)."""
        counts = self.num_tokens if num_tokens_out is None else num_tokens_out
        return batch.req_to_token, batch.req_pool_indices, self.indptr, self.indices, self.last, counts

    def run_pages(self, q, k_cache, v_cache, selected_pages, num_selected, batch: DecodeBatch, return_lse,
                  num_tokens_out: torch.Tensor | None = None, rows_written: bool = False):
        """Attend selected logical pages ``[B, HK, W]`` (ascending) with ``num_selected`` ``[B, HK]``; returns the
        attention output (and LSE) and the tokens attended per row ``[B, HK]`` int32 (written into
        ``num_tokens_out`` when given). ``rows_written``: ``topk_pages`` wrote the rows into
        :meth:`page_rows_out` already (no ``page_rows`` launch)."""
        counts = self.num_tokens if num_tokens_out is None else num_tokens_out
        if not rows_written:
            ck.page_rows(selected_pages, num_selected, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         self.page_size, out=(self.indptr, self.indices, self.last, counts))
        out = self._attend(q, k_cache, v_cache, return_lse)
        return (*out, counts) if return_lse else (out, counts)


class _DenseDecode:
    """FlashInfer GQA decode over every token of every request (page size 1), planned each step.

    With index buffers (shared by the batch sizes a CUDA graph may capture, sized for the largest) the wrapper is
    FlashInfer's CUDA-graph one; without (``indptr_buf is None``: a batch larger than any captured, always eager)
    a plain wrapper whose token indices are allocated at each plan(), as many as the step holds."""

    def __init__(self, workspace, role: _RoleWorkspace, batch_size, num_qo_heads, num_kv_heads, head_dim, dtype,
                 sm_scale, indptr_buf=None, indices_buf=None, last_buf=None):
        fi = _flashinfer()
        self.shape = (num_qo_heads, num_kv_heads, head_dim)
        self.dtype, self.sm_scale = dtype, sm_scale
        # host copy for plan(): FlashInfer reads last_page_len on the host, a device tensor would cost a sync
        self.last_host = torch.ones(batch_size, dtype=torch.int32)
        self.indices = indices_buf
        if indices_buf is None:
            self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        else:
            self.indptr = indptr_buf[: batch_size + 1]
            self.last = last_buf[:batch_size]
            self.last.fill_(1)
            self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=self.indptr,
                paged_kv_indices_buffer=self.indices, paged_kv_last_page_len_buffer=self.last)
        self.role = role
        role.attach(self.wrapper, workspace)

    def plan(self, batch: DecodeBatch, seq_lens_cpu: torch.Tensor) -> None:
        lens = seq_lens_cpu.to(torch.int64)
        indptr_host = torch.zeros(lens.numel() + 1, dtype=torch.int32)
        indptr_host[1:] = torch.cumsum(lens, 0).to(torch.int32)
        total = int(indptr_host[-1])
        dev = batch.req_to_token.device
        if self.indices is None:                          # eager-only size: exactly this step's tokens
            indices = torch.empty(total, dtype=torch.int32, device=dev)
        elif total > self.indices.numel():
            raise ValueError(f"batch holds {total} tokens, more than the operator's index buffer "
                             f"({self.indices.numel()}, captured batch x max_context); raise max_context")
        else:
            indices = self.indices[:total]
        ck.token_rows(batch.req_to_token, batch.req_pool_indices, batch.seq_lens, int(lens.max()), out=indices)
        HQ, HK, D = self.shape
        with self.role.planning(self):
            self.wrapper.plan(indptr_host, indices, self.last_host, HQ, HK, D, 1, q_data_type=self.dtype,
                              kv_data_type=self.dtype, sm_scale=self.sm_scale)

    def run(self, q, k_cache, v_cache):
        return self.wrapper.run(q, (k_cache.view(-1, 1, *k_cache.shape[1:]), v_cache.view(-1, 1, *v_cache.shape[1:])))


class _Wrapper(NamedTuple):
    """One FlashInfer wrapper of a batch size, as :meth:`SparseDecodeOperator._layout` lays it out: per-head rows
    of ``page_size`` (``capacity`` tokens a row), or the dense GQA pass (``page_size`` None); ``buffers`` are the
    shared (indptr, indices, last_page_len) it plans into, ``()`` for a dense pass planned per step (eager);
    ``int_workspace`` is FlashInfer's int workspace of its role, shared by every batch size."""

    page_size: int | None
    capacity: int
    buffers: tuple
    int_workspace: torch.Tensor

    def device_bytes(self, batch_size: int, num_kv_heads: int) -> int:
        """What the wrapper holds itself (the index buffers and the int workspace of its role are counted with the
        operator): under CUDA graphs FlashInfer's ``qo_indptr`` (rows + 1 int32); a per-head wrapper's token
        counts ``[B, HK]`` int32. (FlashInfer's own 8 MiB int workspace is allocated and freed again when the
        wrapper takes its role's.)"""
        rows = batch_size if self.page_size is None else batch_size * num_kv_heads
        n = 0
        if self.buffers:
            n += allocated_bytes(4 * (rows + 1))
        if self.page_size is not None:
            n += allocated_bytes(4 * rows)
        return n


def held_batch_sizes(captured: Iterable[int], max_batch: int) -> list[int]:
    """The batch sizes whose FlashInfer wrappers an operator holds at most at once: every size a CUDA graph was
    captured with, and ``EAGER_BATCH_SIZES`` others; the largest up to ``max_batch``, the costliest."""
    kept = set(captured)
    eager = []
    for b in range(max_batch, 0, -1):
        if len(eager) == EAGER_BATCH_SIZES:
            break
        if b not in kept:
            eager.append(b)
    return sorted(kept | set(eager))


class _StepAttention:
    """:class:`policies.Attention` of one layer's step on the operator's FlashInfer wrappers."""

    def __init__(self, wrappers: dict, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch,
                 counts_out: torch.Tensor | None = None):
        self.wrappers, self.k_cache, self.v_cache, self.batch = wrappers, k_cache, v_cache, batch
        self.counts_out = counts_out         # where pages() writes its token counts (the layer's statistics)

    def tokens(self, q, rows, counts, *, which, return_lse):
        return self.wrappers[which].run_tokens(q, self.k_cache, self.v_cache, rows, counts, return_lse)

    def page_rows_out(self):
        return self.wrappers["pages"].page_rows_out(self.batch, self.counts_out)

    def pages(self, q, selected_pages, num_selected, *, return_lse, rows_written=False):
        return self.wrappers["pages"].run_pages(q, self.k_cache, self.v_cache, selected_pages, num_selected,
                                                self.batch, return_lse, self.counts_out, rows_written)


class SparseDecodeOperator:
    """Sparse (or dense) decode attention for every layer of a model; see the module docstring.

    Args:
        config: the method and its parameters.
        num_qo_heads, num_kv_heads, head_dim: attention shape (``num_qo_heads / num_kv_heads`` <= 8 query heads per
            KV head for the sparse methods).
        num_layers: layers of the model (the first ``config.dense_layers`` run dense).
        max_batch: largest batch size planned.
        max_context: longest request (tokens), which sizes the dense index buffer and the score rows.
        dtype: q/K/V dtype (fp16 or bf16).
        sm_scale: softmax scale (default ``1/sqrt(head_dim)``).
        collect_stats: keep per-request attended token counts (for the attended-fraction statistics).
        max_requests: rows of ``req_to_token`` (request slots), with ``config.reselect_every > 1``: the kept
            selections are allocated here for that many slots (else at the first ``plan()``, from
            ``req_to_token``; ``req_to_token`` may not change size afterwards).
        graph_batch: the largest batch size a CUDA graph may be captured with (default ``max_batch``). The index
            buffers that graphs read are shared by the batch sizes up to it and sized for it (as SGLang's own
            FlashInfer backend sizes its graph buffers); larger batches, always eager, share a second set sized
            for ``max_batch`` (made when the first such batch comes) and a dense pass whose token indices are
            allocated per step.
    """

    def __init__(self, config: SparseConfig, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 num_layers: int, max_batch: int, max_context: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cuda", sm_scale: float | None = None, collect_stats: bool = True,
                 max_requests: int | None = None, graph_batch: int | None = None):
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.group = num_qo_heads // num_kv_heads
        if config.is_sparse:
            ck._cuda.check_group(num_qo_heads, num_kv_heads)
        if config.is_sparse and config.drift_test and num_kv_heads > 32:
            raise ValueError(f"the drift test (reselect_min_cosine) supports up to 32 KV heads per rank, the model "
                             f"has {num_kv_heads}: set reselect_min_cosine: -1, or split the heads with --tp")
        self.num_layers = num_layers
        self.max_batch, self.max_context = max_batch, max_context
        self.graph_batch = max_batch if graph_batch is None else min(graph_batch, max_batch)
        self.dtype = dtype
        self.device = torch.device(device)
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.max_pages = -(-max_context // config.page_size)
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.collect_stats = collect_stats
        # FlashInfer wrappers per batch size: the sizes a CUDA graph was captured with are kept for good; the
        # others, least recently planned first, beyond EAGER_BATCH_SIZES are dropped, so eager traffic of many batch
        # sizes keeps memory bounded.
        self._per_batch: dict[int, dict] = {}
        self._captured_sizes: set[int] = set()
        self._index_buffers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # FlashInfer's int workspace (a plan's work list, 8 MiB) per wrapper role, shared by every batch size: a
        # step plans one batch size, whose plan() rewrites the work list right before the graph replay or eager run
        # that reads it (see _RoleWorkspace); the roles a step plans together each have their own. (One per
        # wrapper would be ~8 MiB x roles x captured sizes: ~0.9 GiB for Quest at SGLang's default capture list.)
        self._int_workspaces: dict[str, torch.Tensor] = {}
        self._roles: dict[str, _RoleWorkspace] = {}     # with their host copies, for the real wrappers
        self.step = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.batch: DecodeBatch | None = None
        self.dense_rows: torch.Tensor | None = None
        self.path = "dense"          # of the planned step: "sparse", "mixed" or "dense" (see plan())
        # the mixed path: which rows opted out (written by plan() in place), and the tokens of those rows its dense
        # pass holds (a step with more falls back to an eager sparse step with a dense pass over every row)
        self.dense_row_mask = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self.max_dense_row_tokens = 4 * max_context + max_batch
        # Written by plan() in place (a captured graph reads them at fixed addresses), read by every layer's run():
        # SGLang's int64 batch indices as int32 (otherwise each kernel wrapper casts them again, per layer), the
        # dense-fallback mask and the step's vAttention seed base.
        self.req_pool_indices_i32 = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.seq_lens_i32 = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.fits_budget = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self.seed_base = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        self.reuse_from = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.row_top_k = torch.zeros(max_batch, dtype=torch.int32, device=self.device)   # pages per request
        # kept selections per request slot (config.reselect_every > 1; see SelectionReuse)
        self.reuse: policies.SelectionReuse | None = None
        self._reuses = config.is_sparse and config.reselect_every > 1 and num_layers > config.dense_layers
        if max_requests is not None and self._reuses:
            self._make_reuse(max_requests)
        # per step: tokens attended per (layer, request, KV head), zero for the layers that did not select. Quest's
        # page_rows writes its counts here directly; the step's sums are taken once, after the last layer.
        self.layer_counts = torch.zeros((num_layers, max_batch, num_kv_heads), dtype=torch.int32,
                                        device=self.device)

    @classmethod
    def fixed_bytes(cls, config: SparseConfig, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                    num_layers: int, max_batch: int, max_context: int, dtype: torch.dtype = torch.bfloat16,
                    max_requests: int | None = None, graph_batch: int | None = None,
                    batch_sizes: Iterable[int] = ()) -> dict[str, int]:
        """Device bytes that an operator built with these arguments holds besides the per-token side tables, by
        component, once it has planned every batch size of ``batch_sizes`` (:func:`held_batch_sizes`: the sizes
        CUDA graphs capture and the eager ones it keeps). The constructor and the wrappers' layout run on the
        meta device (nothing is allocated), so the count follows the code; each allocation is rounded as PyTorch's
        caching allocator rounds it.

        - ``workspace``: FlashInfer's float workspace (``WORKSPACE_BYTES``), shared by every wrapper;
        - ``int workspaces``: FlashInfer's int workspace (``FLASHINFER_INT_WORKSPACE_BYTES``) per wrapper role,
          shared by every batch size;
        - ``wrappers``: per batch size, FlashInfer wrappers for the dense pass and, for a sparse config, the mixed
          path's dense pass, the selection's rows and vAttention's sample: an int32 or two per row;
        - ``graph index buffers`` (int32, sized for ``graph_batch``): the dense pass's
          ``graph_batch x max_context`` indices, the mixed pass's ``4 x max_context + max_batch``, the per-head
          rows ``graph_batch x HK x`` the selection width (vAttention's sample: ``sample_capacity``);
        - ``eager index buffers``: the per-head rows again for ``max_batch``, once a batch beyond ``graph_batch``
          comes;
        - ``step state``: the step's per-row inputs and the token counts ``[num_layers, max_batch, HK]`` int32;
        - ``kept selections`` (``reselect_every > 1``): :class:`policies.SelectionReuse` for ``max_requests``.

        Not counted: what a step allocates and frees again (the eager dense pass's token indices, temporaries).
        """
        op = cls(config, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 num_layers=num_layers, max_batch=max_batch, max_context=max_context, dtype=dtype, device="meta",
                 max_requests=max_requests, graph_batch=graph_batch)
        sizes = sorted(set(batch_sizes))
        if sizes and (sizes[0] < 1 or sizes[-1] > max_batch):
            raise ValueError(f"batch sizes must lie in 1..max_batch={max_batch}, got {sizes}")
        layouts = {B: op._layout(B) for B in sizes}

        def total(tensors) -> int:
            return sum(allocated_bytes(t.nbytes) for t in tensors)

        index = {name: total(bufs) for name, bufs in op._index_buffers.items()}
        return {
            "workspace": total([op.workspace]),
            "int workspaces": total(op._int_workspaces.values()),
            "wrappers": sum(w.device_bytes(B, num_kv_heads) for B, layout in layouts.items()
                            for w in layout.values()),
            "graph index buffers": sum(n for name, n in index.items() if not name.startswith("eager_")),
            "eager index buffers": sum(n for name, n in index.items() if name.startswith("eager_")),
            "step state": total(op._step_state()),
            "kept selections": total(op.reuse.tensors()) if op.reuse is not None else 0,
        }

    def _step_state(self) -> list[torch.Tensor]:
        """The step's tensors that the constructor makes (what plan() writes for the graphs, the statistics)."""
        return [self.step, self.dense_row_mask, self.req_pool_indices_i32, self.seq_lens_i32, self.fits_budget,
                self.seed_base, self.reuse_from, self.row_top_k, self.layer_counts]

    # ------------------------------------------------------------------ host side, once per step

    def _int_workspace(self, role: str) -> torch.Tensor:
        """FlashInfer's int workspace of the wrappers named ``role`` (every batch size's)."""
        ws = self._int_workspaces.get(role)
        if ws is None:
            ws = torch.empty(FLASHINFER_INT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            self._int_workspaces[role] = ws
        return ws

    def _role(self, name: str, int_workspace: torch.Tensor) -> _RoleWorkspace:
        """The shared workspaces of the real wrappers named ``name`` (not built on the meta device), around the
        role's int workspace (``_Wrapper.int_workspace``)."""
        role = self._roles.get(name)
        if role is None:
            role = self._roles[name] = _RoleWorkspace(int_workspace)
        return role

    def _shared(self, name: str, rows: int, entries_per_row: int, entries: int | None = None):
        """int32 (indptr, indices, last_page_len) buffers shared by the wrappers of every batch size (``entries``
        indices in all, default ``rows * entries_per_row``)."""
        bufs = self._index_buffers.get(name)
        if bufs is None:
            dev = self.device
            bufs = (torch.zeros(rows + 1, dtype=torch.int32, device=dev),
                    torch.zeros(rows * entries_per_row if entries is None else entries, dtype=torch.int32,
                                device=dev),
                    torch.ones(rows, dtype=torch.int32, device=dev))
            self._index_buffers[name] = bufs
        return bufs

    def _buffers(self, B: int) -> dict:
        bufs = self._per_batch.pop(B, None)
        if bufs is not None:
            self._per_batch[B] = bufs                          # most recently planned last
            return bufs
        eager = [b for b in self._per_batch if b not in self._captured_sizes]
        for b in eager[: max(0, len(eager) + 1 - EAGER_BATCH_SIZES)]:
            del self._per_batch[b]
        HK, G, D = self.num_kv_heads, self.group, self.head_dim
        bufs = {}
        for name, w in self._layout(B).items():
            if w.page_size is None:
                bufs[name] = _DenseDecode(self.workspace, self._role(name, w.int_workspace), B, self.num_qo_heads, HK,
                                          D, self.dtype, self.sm_scale, *w.buffers)
            else:
                bufs[name] = _PerHeadDecode(self.workspace, self._role(name, w.int_workspace), B, HK, G, D,
                                            w.page_size, w.capacity, self.dtype, self.sm_scale, *w.buffers)
        self._per_batch[B] = bufs
        return bufs

    def _layout(self, B: int) -> dict[str, _Wrapper]:
        """The FlashInfer wrappers of batch size ``B`` by name, with the index buffers they plan into (made here
        at the first size that needs them; torch only, so it runs on any device)."""
        cfg = self.config
        HK = self.num_kv_heads
        # Sizes a graph may capture share buffers sized for the largest of them; larger (eager-only) sizes share a
        # second set, sized for max_batch and made only once such a batch comes.
        shared = B <= self.graph_batch
        rows = (self.graph_batch if shared else self.max_batch) * HK

        def buffers(name: str, entries_per_row: int):
            return self._shared(name if shared else f"eager_{name}", rows, entries_per_row)

        dense_buffers = self._shared("dense", self.graph_batch, self.max_context) if shared else ()
        layout = {"dense": _Wrapper(None, 0, dense_buffers, self._int_workspace("dense"))}
        if cfg.is_sparse:
            # the mixed path's dense pass: the opted-out rows' tokens, one token for every other row (an eager-only
            # size: indices allocated per step)
            layout["dense_rows"] = _Wrapper(None, 0, self._shared("dense_rows", self.graph_batch, 0,
                                                                  self.max_dense_row_tokens) if shared else (),
                                            self._int_workspace("dense_rows"))
            # A row holds every page of a request within the budget, else top_k (+ pages written since a
            # reused selection): selection_width pages.
            P, W = cfg.page_size, cfg.selection_width
            if cfg.method == "twilight":     # top-p survivors: token rows
                layout["main"] = _Wrapper(1, W * P, buffers("main", W * P), self._int_workspace("main"))
            else:                            # Quest's selection (vAttention's deterministic part): page rows
                layout["pages"] = _Wrapper(P, W * P, buffers("pages", W), self._int_workspace("pages"))
            if cfg.samples_residual:         # vAttention's sample (Twilight's too, with residual_sample)
                layout["sample"] = _Wrapper(1, cfg.sample_capacity, buffers("sample", cfg.sample_capacity),
                                            self._int_workspace("sample"))
        return layout

    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
             seq_lens_cpu: torch.Tensor, dense_rows: list[bool] | None = None, path: str | None = None,
             row_budgets: list[int | None] | None = None) -> str:
        """Prepare a decode step (host work, outside any CUDA graph); returns the step's path.

        ``seq_lens_cpu`` is the host copy of ``seq_lens`` (SGLang keeps one). ``req_pool_indices`` and ``seq_lens``
        are read here (copied to int32 buffers of the operator, on the current stream), so plan() must run before
        every replay of a captured graph; ``req_to_token`` is read by the step itself and must stay the same object
        (updated in place). ``dense_rows`` (host, one bool per request) marks requests that opted out of sparsity:
        they are attended densely in every layer (see the paths below). ``row_budgets`` (host, one per request: a token
        budget, or None for the config's) gives requests their own budgets, each a multiple of the page size
        between the sink + local pages and the config's ``token_budget``
        (:meth:`SparseConfig.request_budget_problem`); they are written to a device buffer the step reads, so a
        captured graph serves them too. A budget applies to a request past ``dense_pages`` (the config's budget
        or ``min_context``); shorter requests are attended densely whatever budget they ask for.

        The path: a step in which no request needs a selection (every one within its budget, below
        ``min_context`` or opted out; decided here from ``seq_lens_cpu``), or in which those that do hold fewer
        than ``min_batch_tokens`` tokens in all, is ``"dense"``: every layer runs the dense FlashInfer decode
        (its tensor-core kernel), so short traffic pays nothing for the sparse chain. Otherwise ``"sparse"``, or
        ``"mixed"`` when a request that opted out is longer than what the config attends in full: the sparse step
        plus a dense pass over the opted-out rows only (one token for every other row), merged per row. Past
        :meth:`mixed_fits` (the opted-out rows' tokens overflow the mixed pass's index buffer) such a step is
        ``"sparse"`` with a dense pass over every row, which must run eagerly. The paths launch different kernels,
        so a CUDA graph is captured per path (``path`` forces one for the capture, ``"mixed"`` with no row opted
        out; the SGLang backend keeps one graph of each per batch size) and the replay picks the graph of the path
        plan() returned. Rows that fit their budget inside a sparse step are not scored and attend all their
        tokens.
        """
        B = seq_lens.shape[0]
        if B > self.max_batch:
            raise ValueError(f"batch of {B} exceeds max_batch={self.max_batch}")
        if int(seq_lens_cpu.max()) > self.max_context:
            raise ValueError(f"a request has {int(seq_lens_cpu.max())} tokens, more than max_context="
                             f"{self.max_context}")
        cfg = self.config
        rpi, lens = self.req_pool_indices_i32[:B], self.seq_lens_i32[:B]
        rpi.copy_(req_pool_indices)
        lens.copy_(seq_lens)
        row_pages = self._row_pages(row_budgets, B)
        pages_dev = self.row_top_k[:B]
        if row_pages is None:
            pages_dev.fill_(cfg.top_k_pages)
        else:
            pages_dev.copy_(row_pages, non_blocking=True)
        fits = self.fits_budget[:B]
        policies.within_budget(cfg, lens, out=fits)
        self.batch = DecodeBatch(req_to_token, rpi, lens, self.max_pages, fits_budget=fits, row_top_k=pages_dev)
        if self.reuse is None and self._reuses:
            self._make_reuse(req_to_token.shape[0])
        if self.reuse is not None:
            if req_to_token.shape[0] > self.reuse.max_reqs:
                raise ValueError(f"req_to_token has {req_to_token.shape[0]} request slots, the operator keeps "
                                 f"selections for {self.reuse.max_reqs} (max_requests)")
            self.batch.reuse_from = self.reuse_from[:B]
        bufs = self._buffers(B)
        if dense_rows is not None and len(dense_rows) != B:
            raise ValueError(f"dense_rows has {len(dense_rows)} entries for a batch of {B}")
        opted = self.dense_pass_rows(seq_lens_cpu, dense_rows)
        if path is None:
            path = "sparse" if policies.needs_selection(cfg, seq_lens_cpu, opted) else "dense"
        elif path not in ("sparse", "mixed", "dense") or (path != "dense" and not cfg.is_sparse):
            raise ValueError(f"path must be 'dense' or (for a sparse config) 'sparse' or 'mixed', got {path!r}")
        elif path == "mixed" and opted is not None:
            raise ValueError("plan(path='mixed') captures the mixed path with no row opted out; pass dense_rows "
                             "without a path to plan a step")
        self.dense_rows = None
        if path == "sparse" and opted is not None:
            path = "mixed" if self.mixed_fits(seq_lens_cpu, opted) else "sparse"
            self.dense_rows = self.dense_row_mask[:B]
            self.dense_rows.copy_(opted, non_blocking=True)
        elif path == "mixed":                  # captured with every row sparse: its dense pass over one token each
            self.dense_rows = self.dense_row_mask[:B]
            self.dense_rows.zero_()
            opted = torch.zeros(B, dtype=torch.bool)
        self.path = path
        if path == "mixed":
            lens_cpu = torch.where(opted, seq_lens_cpu.to(torch.int64), 1)
            masked = DecodeBatch(req_to_token, rpi, torch.where(self.dense_rows, lens, 1), self.max_pages)
            bufs["dense_rows"].plan(masked, lens_cpu)
        if path == "dense" or cfg.dense_layers > 0 or (path == "sparse" and self.dense_rows is not None):
            bufs["dense"].plan(self.batch, seq_lens_cpu)
        self.step.add_(1)
        if path != "dense" and self.reuse is not None:
            self.reuse.plan(self.batch, out=self.batch.reuse_from)
        if path != "dense":
            # FlashInfer splits each row's tokens over its CTAs by the lengths planned here: Quest's selection
            # attends a number of tokens known from the lengths alone (the last page is always selected);
            # top-p keeps at most those. vAttention's sample is planned at its capacity (data-dependent).
            row_tokens = policies.selected_tokens(cfg, seq_lens_cpu, row_pages).repeat_interleave(self.num_kv_heads)
            for name in ("pages", "main"):
                if name in bufs:
                    bufs[name].plan(row_tokens)
            if cfg.samples_residual:
                bufs["sample"].plan_at_capacity()
                policies.vattention_seed_base(cfg.seed, self.step, B, out=self.seed_base[:B])
            if self.collect_stats:
                self.layer_counts[:, :B].zero_()
        return path

    def dense_pass_rows(self, seq_lens_cpu: torch.Tensor, dense_rows: list[bool] | None) -> torch.Tensor | None:
        """Host ``[B]`` bool: the rows that opted out of sparsity (``dense_rows``) and need a dense pass, those
        longer than what the config attends in full (within its budget or below ``min_context`` the sparse step
        attends every token anyway); None when there are none."""
        if dense_rows is None or not any(dense_rows):
            return None
        opted = torch.tensor(dense_rows, dtype=torch.bool)
        if self.config.is_sparse:
            opted &= ~policies.within_budget(self.config, seq_lens_cpu.to(torch.int64))
        return opted if bool(opted.any()) else None

    def replays_graph(self, seq_lens_cpu: torch.Tensor, opted: torch.Tensor | None) -> bool:
        """A step whose rows needing a dense pass are ``opted`` (:meth:`dense_pass_rows`) can replay a CUDA graph:
        none opted, the dense path's (no other row needs a selection) or the mixed path's (its dense pass holds
        them). Host only."""
        return (opted is None or not policies.needs_selection(self.config, seq_lens_cpu, opted)
                or self.mixed_fits(seq_lens_cpu, opted))

    def mixed_fits(self, seq_lens_cpu: torch.Tensor, opted: torch.Tensor) -> bool:
        """The opted-out rows (host ``[B]`` bool) of a step fit the mixed path's dense pass: their tokens, with one
        for each of up to ``max_batch`` other rows (so CUDA-graph padding rows never change the answer). Host
        only."""
        return int(seq_lens_cpu.to(torch.int64)[opted].sum()) + self.max_batch <= self.max_dense_row_tokens

    def _row_pages(self, row_budgets: list[int | None] | None, B: int) -> torch.Tensor | None:
        """Host ``[B]`` int32 pages per request from their token budgets (None where every one is the config's)."""
        if row_budgets is None or all(b is None for b in row_budgets):
            return None
        cfg = self.config
        if len(row_budgets) != B:
            raise ValueError(f"row_budgets has {len(row_budgets)} entries for a batch of {B}")
        for b in row_budgets:
            problem = None if b is None else cfg.request_budget_problem(b)
            if problem:
                raise ValueError(f"a request's budget: {problem}")
        return torch.tensor([cfg.top_k_pages if b is None else b // cfg.page_size for b in row_budgets],
                            dtype=torch.int32)

    def _make_reuse(self, max_requests: int) -> None:
        self.reuse = policies.SelectionReuse(self.config, self.num_layers - self.config.dense_layers, max_requests,
                                             self.num_kv_heads, self.device, self.head_dim, self.dtype)

    def _kept(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(kept selections, stored queries) of a sparse layer, (None, None) without selection reuse."""
        if self.reuse is None:
            return None, None
        index = layer - self.config.dense_layers
        return self.reuse.layer(index), self.reuse.layer_queries(index)

    def forget(self, req_pool_indices: torch.Tensor) -> None:
        """Request slots (``[n]`` device indices into ``req_to_token``) that start a new request or prefill again:
        with ``reselect_every > 1`` their next decode step selects instead of reusing what the slot kept.
        Call it for every prefill (SGLang's backend does, in its extend pass)."""
        if self.reuse is not None:
            self.reuse.forget(req_pool_indices)

    # ------------------------------------------------------------------ per layer, graph-capturable

    def run(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            metadata: SparseKVMetadata) -> torch.Tensor:
        """Attention output ``[B, HQ, D]`` of ``layer`` for the planned batch."""
        batch = self.batch
        if batch is None:
            raise RuntimeError("call plan() before run()")
        bufs = self._per_batch[batch.batch_size]
        if torch.cuda.is_current_stream_capturing():
            if batch.batch_size > self.graph_batch:
                raise RuntimeError(f"a CUDA graph captures a batch of {batch.batch_size}, more than the operator's "
                                   f"graph_batch ({self.graph_batch}): its dense pass is planned per step, not "
                                   "graph-safe")
            if layer == 0:                                     # a graph now holds this size's wrappers
                self._captured_sizes.add(batch.batch_size)
        cfg = self.config
        if self.path == "dense" or layer < cfg.dense_layers:
            return bufs["dense"].run(q, k_cache, v_cache)

        B = batch.batch_size
        counts_out = self.layer_counts[layer, :B] if self.collect_stats else None
        attend = _StepAttention(bufs, k_cache, v_cache, batch, counts_out)
        tables = layer_tables(metadata, layer, *self._kept(layer))
        seeds = (self.seed_base[: batch.batch_size] + layer * policies.SEED_LAYER_STRIDE   # = vattention_seeds()
                 if cfg.samples_residual else None)
        if cfg.method == "quest":
            out, counts = policies.quest(ck, cfg, q, tables, batch, attend)
        elif cfg.method == "twilight":
            residual = policies.Residual(k_cache, v_cache, seeds) if cfg.residual_sample else None
            out, counts = policies.twilight(ck, cfg, q, tables, batch, attend, self.sm_scale, residual=residual)
        else:
            out, counts = policies.vattention(ck, cfg, q, k_cache, v_cache, tables, batch, attend, self.sm_scale,
                                              seeds)
        out = out.view(q.shape)
        if self.dense_rows is not None:                        # opted-out requests: dense attention instead
            # mixed path: a dense pass over those rows only (one token for the others), graph-capturable; an
            # eager sparse step (too many opted-out tokens for it) reuses the dense plan of every row
            dense = bufs["dense_rows"] if self.path == "mixed" else bufs["dense"]
            dense_out = dense.run(q, k_cache, v_cache).view(q.shape)
            out = torch.where(self.dense_rows[:, None, None], dense_out, out)
            counts = torch.where(self.dense_rows[:, None], batch.seq_lens[:, None].to(counts.dtype), counts)
        if counts_out is not None and counts.data_ptr() != counts_out.data_ptr():
            counts_out.copy_(counts)
        self.last_counts = counts          # [B, HK]; may be the layer's statistics row, zeroed by the next plan()
        return out

    def add_request_stats(self, attended_tokens: torch.Tensor, context_tokens: torch.Tensor) -> None:
        """Add this step's attended and available token counts (sparse layers x KV heads) to per-request totals
        indexed by ``req_pool_indices`` (``[max_reqs]`` float64, device). Graph-capturable; call after the last
        layer. Rows with ``seq_len <= 1`` (CUDA-graph padding) add nothing."""
        batch = self.batch
        B = batch.batch_size
        valid = (batch.seq_lens > 1).double()
        idx = batch.req_pool_indices.long()
        sparse_layers = max(0, self.num_layers - self.config.dense_layers)
        available = batch.seq_lens.double() * valid * (sparse_layers * self.num_kv_heads)
        attended = self.layer_counts[:, :B].sum((0, 2)).double() * valid if self.path != "dense" else available
        attended_tokens.index_add_(0, idx, attended)
        context_tokens.index_add_(0, idx, available)

    def attended_fraction(self) -> torch.Tensor:
        """``[B]`` mean fraction of each request's tokens attended per KV head over the sparse layers of the
        last step (device tensor; read it after the step)."""
        batch = self.batch
        if self.path == "dense":
            return torch.ones(batch.batch_size, device=self.device)
        B = batch.batch_size
        counts = self.layer_counts[:, :B]
        calls = (counts.sum((1, 2)) > 0).sum().clamp_min(1).float()       # the layers that selected this step
        return counts.sum((0, 2)).float() / (calls * self.num_kv_heads * batch.seq_lens.float())


def layer_tables(metadata: SparseKVMetadata, layer: int, kept_selection: torch.Tensor | None = None,
                 kept_query: torch.Tensor | None = None) -> LayerTables:
    """The side tables of ``layer`` that the policies read (the operator's and the reference's alike)."""
    return LayerTables(metadata.page_key_bounds[layer],
                       metadata.key_int4[layer] if metadata.key_int4 else None,
                       metadata.key_scale_zero[layer] if metadata.key_scale_zero else None, kept_selection,
                       kept_query,
                       coarse_key_bounds=metadata.coarse_key_bounds[layer] if metadata.coarse_key_bounds else None)


# ---------------------------------------------------------------------------- the torch reference


def all_token_rows(batch: DecodeBatch, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of every request as kv-index rows ``[B, HK, max_len]`` int32 and counts ``[B, HK]`` (dense)."""
    lens = batch.seq_lens.long()
    slots = batch.req_to_token[batch.req_pool_indices.long()][:, : int(lens.max())].long()
    heads = torch.arange(num_kv_heads, device=slots.device)[None, :, None]
    rows = (slots[:, None, :] * num_kv_heads + heads).to(torch.int32)
    return rows, lens[:, None].expand(-1, num_kv_heads).to(torch.int32)


def attend_rows_reference(q, k_cache, v_cache, rows, counts, sm_scale, return_lse):
    """Dense attention of each (request, KV head) over its kv-index row (float32 math; the spec of ``attend``).

    Returns ``o`` ``[B, HQ, D]`` (q's dtype) and, if asked, the base-2 LSE ``[B, HQ]`` (``-inf`` for empty rows).
    """
    B, HQ, D = q.shape
    HK = k_cache.shape[1]
    G = HQ // HK
    kf = k_cache.reshape(-1, D)
    vf = v_cache.reshape(-1, D)
    o = torch.zeros((B, HQ, D), dtype=torch.float32, device=q.device)
    lse = torch.full((B, HQ), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(HK):
            n = int(counts[b, h])
            if n == 0:
                continue
            idx = rows[b, h, :n].long()
            lg = sm_scale * (q[b, h * G:(h + 1) * G].float() @ kf[idx].float().T)
            o[b, h * G:(h + 1) * G] = torch.softmax(lg, -1) @ vf[idx].float()
            lse[b, h * G:(h + 1) * G] = torch.logsumexp(lg, -1) / math.log(2)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


class _ReferenceAttention:
    """:class:`policies.Attention` in float32 torch (the spec of ``_StepAttention``)."""

    def __init__(self, k_cache, v_cache, batch: DecodeBatch, page_size: int, sm_scale: float):
        self.k_cache, self.v_cache, self.batch = k_cache, v_cache, batch
        self.page_size, self.sm_scale = page_size, sm_scale

    def tokens(self, q, rows, counts, *, which, return_lse):
        return attend_rows_reference(q, self.k_cache, self.v_cache, rows, counts, self.sm_scale, return_lse)

    def page_rows_out(self):
        return None                          # pages() gathers the tokens itself

    def pages(self, q, selected_pages, num_selected, *, return_lse, rows_written=False):
        if rows_written:
            raise ValueError("the reference attention has no rows for a selection to write into")
        # the tokens of the selected pages (FlashInfer reading page_rows' rows attends exactly these:
        # tests/test_reference.py proves the two equal)
        b = self.batch
        rows, counts = ck.reference.pages_to_kv_indices(selected_pages, num_selected, b.req_to_token,
                                                        b.req_pool_indices, b.seq_lens, self.page_size,
                                                        selected_pages.shape[-1] * self.page_size)
        out = attend_rows_reference(q, self.k_cache, self.v_cache, rows, counts, self.sm_scale, return_lse)
        return (*out, counts) if return_lse else (out, counts)


def reference_decode(config: SparseConfig, layer: int, q: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, batch: DecodeBatch, metadata: SparseKVMetadata,
                     sm_scale: float | None = None, seeds: torch.Tensor | None = None,
                     kept_selection: torch.Tensor | None = None, kept_query: torch.Tensor | None = None,
                     observe: policies.SelectionObserver | None = None):
    """The torch reference of :meth:`SparseDecodeOperator.run`: same policies, reference kernels, dense math.

    Runs on CPU or GPU tensors. ``seeds`` (vAttention's, or Twilight's with ``residual_sample``) defaults to the
    operator's derivation for step 1.
    ``kept_selection`` (``[max_reqs, HK, top_k]``, with ``batch.reuse_from`` set: selection reuse) is read for
    the rows that reuse and written for the rows that select, as the operator does with its own; so is
    ``kept_query`` (``[max_reqs, HK, D]``, the drift test's stored queries, with ``config.drift_test``).
    ``observe``: called with the page scores and the selection of a sparse layer (:class:`policies.SelectionObserver`;
    never for dense layers).
    Returns ``(o [B, HQ, D], attended token counts [B, HK])``.
    """
    ref = ck.reference
    B, HQ, D = q.shape
    HK = k_cache.shape[1]
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if not config.is_sparse or layer < config.dense_layers:
        rows, counts = all_token_rows(batch, HK)
        return attend_rows_reference(q, k_cache, v_cache, rows, counts, sm_scale, False), counts

    attend = _ReferenceAttention(k_cache, v_cache, batch, config.page_size, sm_scale)
    tables = layer_tables(metadata, layer, kept_selection, kept_query)
    if config.method == "quest":
        return policies.quest(ref, config, q, tables, batch, attend, observe)
    if seeds is None and config.samples_residual:
        seeds = policies.vattention_seeds(config.seed, torch.ones(1, dtype=torch.int64, device=q.device), layer, B)
    if config.method == "twilight":
        residual = policies.Residual(k_cache, v_cache, seeds) if config.residual_sample else None
        return policies.twilight(ref, config, q, tables, batch, attend, sm_scale, observe, residual=residual)
    return policies.vattention(ref, config, q, k_cache, v_cache, tables, batch, attend, sm_scale, seeds,
                              observe)
