"""Drift test of kept selections: per (layer, request), reuse while the query has not moved, else select again.

Spec: :func:`cupy_kernels.reference.reuse_drift`. Kernel: ``reuse_drift.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_group, check_tensor, f32, i32, kernel, launch


def reuse_drift(q: torch.Tensor, req_pool_indices: torch.Tensor, fits_budget: torch.Tensor,
                reuse_from: torch.Tensor, query_kept: torch.Tensor, min_cosine: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's reuse decision per request, from the step's plan and how far each query moved.

    Args:
        q: ``[B, HQ, D]`` fp16/bf16 decode queries of the layer.
        req_pool_indices: ``[B]`` int32 request slots; fits_budget: ``[B]`` bool (rows attended densely).
        reuse_from: ``[B]`` int32, the step's plan (:class:`sgl_sparse.policies.SelectionReuse`): > 0 where the
            slot's kept selection may serve.
        query_kept: ``[max_reqs, HK, D]`` (dtype of ``q``): the layer's group-mean queries stored at each slot's
            selection; rows that select overwrite their slot's (in place).
        min_cosine: a row reuses only if every KV head's cosine similarity (group-mean query now vs stored) is at
            least this.
        out: optional ``[B]`` int32.

    Returns:
        ``[B]`` int32: ``reuse_from`` where the layer reuses, 0 where it selects (``topk_pages``' ``reuse_from``
        and ``quest_page_scores``' ``skip_rows`` for the layer).
    """
    check_tensor(q, "q", dtypes=list(KV_DTYPES), ndim=3)
    dev = q.device
    B, HQ, D = q.shape
    check_tensor(query_kept, "query_kept", dtypes=[q.dtype], ndim=3, device=dev)
    HK = query_kept.shape[1]
    G = check_group(HQ, HK)
    check(query_kept.shape[2] == D, f"query_kept must be [max_reqs, {HK}, {D}], got {tuple(query_kept.shape)}")
    check(D in (64, 128, 256) and HK <= 32, f"head_dim must be 64, 128 or 256 and KV heads <= 32 (got {D}, {HK})")
    check_tensor(req_pool_indices, "req_pool_indices", dtypes=[torch.int32], ndim=1, device=dev)
    check_tensor(fits_budget, "fits_budget", dtypes=[torch.bool], ndim=1, device=dev)
    check_tensor(reuse_from, "reuse_from", dtypes=[torch.int32], ndim=1, device=dev)
    check(req_pool_indices.shape[0] == B and fits_budget.shape[0] == B and reuse_from.shape[0] == B,
          f"req_pool_indices, fits_budget and reuse_from need {B} entries")
    if out is None:
        out = torch.empty(B, dtype=torch.int32, device=dev)
    check_tensor(out, "out", dtypes=[torch.int32], ndim=1, device=dev)
    check(out.shape[0] == B, f"out must hold {B} entries, got {out.shape[0]}")
    if B == 0:
        return out
    fn = kernel("reuse_drift.cu", "reuse_drift", dev, KV_BF16=KV_DTYPES[q.dtype], HEAD_DIM=D, GROUP=G)
    launch(fn, (B,), (32 * HK,), (q, req_pool_indices, fits_budget, reuse_from, query_kept, out, i32(HK),
                                  f32(min_cosine)), dev)
    return out
