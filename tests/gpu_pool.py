"""A random SGLang-style paged KV pool for the GPU tests and benchmarks (real layout, random contents)."""

from __future__ import annotations

import dataclasses

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

    def max_pages(self) -> int:
        return int((self.seq_lens.max() + self.page_size - 1) // self.page_size)


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
