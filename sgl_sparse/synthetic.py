"""Synthetic decode workloads on SGLang's real memory layout: a paged KV pool with requests on shuffled physical
pages, and queries/keys shaped to give peaked, heavy-tailed or flat attention. Used by the tests, the fidelity
routine and the benchmarks."""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class Pool:
    k_cache: torch.Tensor        # [slots, HK, D]
    v_cache: torch.Tensor        # [slots, HK, D]
    req_to_token: torch.Tensor   # [max_reqs, max_ctx] int32
    req_pool_indices: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor       # [B] int64
    page_size: int
    free_pages: list[int]        # physical pages no request uses (page 0 is reserved like SGLang's)

    @property
    def written_slots(self) -> torch.Tensor:
        """Every slot of every request, request by request, in position order (a prefill's out_cache_loc)."""
        rows = [self.req_to_token[int(r), : int(n)] for r, n in zip(self.req_pool_indices, self.seq_lens)]
        return torch.cat(rows).long()

    @property
    def last_slots(self) -> torch.Tensor:
        """The slot of each request's newest token, int64 ``[B]`` (a decode step's out_cache_loc)."""
        return torch.stack([self.req_to_token[int(r), int(n) - 1]
                            for r, n in zip(self.req_pool_indices, self.seq_lens)]).long()

    def max_pages(self) -> int:
        return int((self.seq_lens.max() + self.page_size - 1) // self.page_size)

    def append_token(self, new_slots: torch.Tensor) -> None:
        """Every request decodes one token: its slot follows its last one (a free page at a page boundary), with
        random K and V; ``new_slots`` ``[B]`` receives the slots (the step's out_cache_loc)."""
        P = self.page_size
        slots = []
        for row, n in zip(self.req_pool_indices.tolist(), self.seq_lens.tolist()):
            slot = self.free_pages.pop() * P if n % P == 0 else int(self.req_to_token[row, n - 1]) + 1
            self.req_to_token[row, n] = slot
            slots.append(slot)
        new_slots.copy_(torch.tensor(slots, device=new_slots.device))
        self.seq_lens += 1
        B, (HK, D) = len(slots), self.k_cache.shape[1:]
        dev = self.k_cache.device
        self.k_cache[new_slots] = torch.randn((B, HK, D), device=dev).to(self.k_cache.dtype)
        self.v_cache[new_slots] = torch.randn((B, HK, D), device=dev).to(self.v_cache.dtype)


def make_pool(seq_lens: list[int], num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
              device: torch.device | str, gen: torch.Generator, spare_pages: int | None = None, max_ctx: int | None = None,
              kv_scale: float = 1.0) -> Pool:
    """Requests on shuffled physical pages (token i at page offset i % P), rows of req_to_token shuffled too."""
    P = page_size
    pages_per_req = [(n + P - 1) // P for n in seq_lens]
    spare_pages = len(seq_lens) + 8 if spare_pages is None else spare_pages
    total_pages = 1 + sum(pages_per_req) + spare_pages
    perm = (torch.randperm(total_pages - 1, generator=gen) + 1).tolist()
    max_ctx = max_ctx or max(max(seq_lens), 1) + 2 * P
    B = len(seq_lens)
    n_rows = B + 3
    rows = torch.randperm(n_rows, generator=gen)[:B]
    r2t = torch.zeros((n_rows, max_ctx), dtype=torch.int32)
    at = 0
    for b, (n, npg) in enumerate(zip(seq_lens, pages_per_req)):
        pages = torch.tensor(perm[at: at + npg], dtype=torch.int64)
        at += npg
        pos = torch.arange(n)
        r2t[rows[b], :n] = (pages[pos // P] * P + pos % P).to(torch.int32)
    free = perm[at:]
    S = total_pages * P
    dgen = torch.Generator(device=device)
    dgen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    k = (torch.randn((S, num_kv_heads, head_dim), generator=dgen, device=device) * kv_scale).to(dtype)
    v = torch.randn((S, num_kv_heads, head_dim), generator=dgen, device=device).to(dtype)
    return Pool(k, v, r2t.to(device), rows.to(device), torch.tensor(seq_lens).to(device), P, free)


ATTENTION_KINDS = ("peaked", "heavy_tailed", "flat")


def shape_attention(pool: Pool, q: torch.Tensor, kind: str, gen: torch.Generator, needles: int = 8) -> torch.Tensor:
    """Reshape the keys of every request (in place) and return the query so attention is ``kind``:

    - ``peaked``: ``needles`` random tokens per (request, KV head) get keys along the group's mean query
      direction, ~10 logits above the rest (a retrieval-like head);
    - ``heavy_tailed``: every key gets a Pareto(alpha=3)-distributed logit boost (capped near 9) along
      that direction;
    - ``flat``: the query is shrunk 20x, so attention is nearly uniform (the hard case for top-k methods).

    Values get a per-head mean vector plus unit noise (real value vectors share a large common component;
    with zero-mean values the dense output of flat attention is ~0 and relative errors mean nothing).
    ``q`` is ``[B, HQ, D]``; the returned query has q's dtype.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    B, HQ, D = q.shape
    HK = pool.k_cache.shape[1]
    G = HQ // HK
    v_mean = torch.randn((HK, D), generator=gen).to(pool.v_cache.device)
    pool.v_cache.copy_((pool.v_cache.float() + v_mean[None]).to(pool.v_cache.dtype))
    qf = q.float()
    if kind == "flat":
        return (qf * 0.05).to(q.dtype)
    q_mean = qf.view(B, HK, G, D).mean(2)                                      # [B, HK, D]
    u = q_mean / q_mean.norm(dim=-1, keepdim=True)
    # keys c*u get a group-mean logit of c * |q_mean| / sqrt(D): c = target * sqrt(D) / |q_mean|
    per_logit = (math.sqrt(D) / q_mean.norm(dim=-1)).cpu()                     # [B, HK]
    for b in range(B):
        n = int(pool.seq_lens[b])
        slots = pool.req_to_token[int(pool.req_pool_indices[b]), :n].long()
        k = pool.k_cache[slots].float()                                         # [n, HK, D]
        if kind == "peaked":
            for h in range(HK):
                pick = torch.randperm(n, generator=gen)[: min(needles, n)].to(k.device)
                k[pick, h] = u[b, h] * (10.0 * float(per_logit[b, h]))     # needles ~10 logits up
        else:
            t = torch.rand((n, HK), generator=gen).clamp_min(1e-3) ** (-1 / 3.0) - 1.0   # Pareto(3), capped at ~9
            k += (t * per_logit[b][None]).to(k.device)[..., None] * u[b][None]
        pool.k_cache[slots] = k.to(pool.k_cache.dtype)
    return q


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """``fn`` run once on a side stream (compiling and JIT-ing outside the capture), then captured in a CUDA
    graph (replay it with ``.replay()``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class PageAllocator:
    """SGLang-like page allocation over a K pool on the host, for the CPU tests' simulators of the side tables.

    ``append`` writes a request's new tokens (random keys) page by page, taking pages from the front of a shuffled
    free list; ``finish`` returns a request's pages to the front of the list, so they are handed out again next
    (``reused`` tracks those); ``valid_keys`` is a page's keys over the valid offsets of its current owner. The pool
    starts full of large stale keys (x50), which a page's first write must make irrelevant.
    """

    def __init__(self, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, num_pages: int,
                 gen: torch.Generator):
        self.P, self.HK, self.D, self.dtype, self.gen = page_size, num_kv_heads, head_dim, dtype, gen
        self.k = (torch.randn((num_pages * page_size, num_kv_heads, head_dim), generator=gen) * 50).to(dtype)
        self.free = torch.randperm(num_pages, generator=gen).tolist()
        self.reqs: dict[str, list] = {}      # name -> [pages, length]
        self.owner: dict[int, str] = {}      # page -> request
        self.ever_used: set[int] = set()     # pages that belonged to some request
        self.reused: set[int] = set()        # pages handed out again after a request finished

    def append(self, name: str, n: int, scale: float = 2.0, offset: float = 0.0) -> list[int]:
        """Write n new tokens of request ``name`` (created if new), keys ``randn * scale + offset``; returns their
        slots in order."""
        pages, length = self.reqs.setdefault(name, [[], 0])
        slots = []
        for i in range(length, length + n):
            if i % self.P == 0:
                page = self.free.pop(0)
                if page in self.ever_used:
                    self.reused.add(page)
                self.ever_used.add(page)
                pages.append(page)
                self.owner[page] = name
            slot = pages[i // self.P] * self.P + i % self.P
            self.k[slot] = (torch.randn((self.HK, self.D), generator=self.gen) * scale + offset).to(self.dtype)
            slots.append(slot)
        self.reqs[name][1] = length + n
        return slots

    def finish(self, name: str) -> None:
        """Free the pages of a request (they go to the front of the free list: reused next)."""
        pages, _ = self.reqs.pop(name)
        for p in pages:
            del self.owner[p]
        self.free[:0] = pages

    def valid_keys(self, page: int) -> torch.Tensor:
        """``[n, HK, D]`` float64: the keys at the valid offsets of the page's current owner."""
        pages, length = self.reqs[self.owner[page]]
        n = min(self.P, length - pages.index(page) * self.P)
        return self.k[page * self.P:page * self.P + n].double()


def plan_reusing_step(op, pool: Pool) -> None:
    """Plan ``op``'s next step over ``pool`` as one that reuses the selections its last steps kept (a config with
    ``reselect_every`` > 1): they are marked as made one token ago, the state of the steps after a selection. With
    no request's context starting a page, the token since lies on the selection's last page: nothing is appended.
    For benchmarks (it reads the lengths on the host)."""
    lens = pool.seq_lens.cpu()
    assert bool((lens % pool.page_size != 1).all()), "a reusing step needs contexts that do not start a page"
    op.reuse.selected_at[pool.req_pool_indices.long()] = pool.seq_lens.int() - 1
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, lens)
    assert bool((op.batch.reuse_from > 0).all()), "the step after a selection must reuse it"


class ServerStepUpdates:
    """The new token's side-table work of one layer's decode step, split as SGLang's backend runs it
    (``sglang_backend.forward_decode``): Twilight's int4 copy of the new key in every layer's step
    (:meth:`per_layer`), and every layer's page bounds in one ``page_bounds_update_layers`` launch per step after
    the last layer (:meth:`all_layers`), whose cost a layer's step carries as ``1 / layers`` of it.

    The benchmark holds one layer's K pool and tables, so :meth:`all_layers` runs ``layers`` aliases of them: the
    same launch and the same per-layer work, but the K pages it reads come from the L2 after the first alias
    where a model's layers read theirs from DRAM. :meth:`floor_bytes` is what the server's launch moves, at most
    (each layer's new-token pages read whole, their bounds rows written; exact for a new token at a page's last
    offset, as in the benchmarks' contexts); a benchmark charges the slower of the measured launch and those bytes
    at the copy peak.

    ``meta``: a :class:`~sgl_sparse.metadata.SparseKVMetadata` of one layer; ``k_cache`` ``[slots, HK, D]``;
    ``new_slots`` ``[B]`` int64 device: the step's out_cache_loc."""

    def __init__(self, meta, k_cache: torch.Tensor, new_slots: torch.Tensor, layers: int):
        self.meta, self.k_cache, self.new_slots, self.layers = meta, k_cache, new_slots, layers
        self._bounds = [(meta.page_key_bounds[0], meta.page_size)]
        if meta.coarse_key_bounds:
            self._bounds.append((meta.coarse_key_bounds[0], meta.coarse_page_size))
        self._tables = None

    def per_layer(self) -> None:
        """What a layer's own step adds: Twilight's int4 key of the new token (nothing for other methods)."""
        self.meta.update_keys_int4(0, self.k_cache, self.new_slots)

    def all_layers(self) -> None:
        """The once-per-step launch: every layer's page bounds of the new tokens' pages."""
        from cupy_kernels import page_bounds
        if self._tables is None:
            self._tables = [page_bounds.LayerTables([self.k_cache] * self.layers, [b] * self.layers, p)
                            for b, p in self._bounds]
        for tables in self._tables:
            page_bounds.page_bounds_update_layers(tables, self.new_slots)

    def floor_bytes(self) -> int:
        """Bytes :meth:`all_layers` moves in a server, at most: per layer and new token, its page's K (the
        tokens up to the new one, a whole page at most) read and the page's bounds rows (every KV head)
        written."""
        S, HK, D = self.k_cache.shape
        per_token = sum(p * HK * D * self.k_cache.element_size() + b[0].numel() * b.element_size()
                        for b, p in self._bounds)
        return self.layers * self.new_slots.numel() * per_token
