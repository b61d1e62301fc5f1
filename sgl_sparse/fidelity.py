"""Attention fidelity: how far each method's decode output is from dense attention.

``attention_fidelity`` builds a synthetic paged pool (``sgl_sparse.synthetic``), runs one sparse layer for
several decode steps (new query and, for vAttention, new samples each step) and reports the relative L2 error
``||o - o_dense|| / ||o_dense||`` per (request, query head), the attended fraction and, for vAttention, the
fraction of (step, request, head) outputs whose error exceeds epsilon (to compare with delta).

It runs through the torch reference (``backend="reference"``, CPU or GPU tensors) or the GPU operator
(``backend="gpu"``); the accuracy work reuses it on real q/k/v captured from models (``fidelity_of``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import policies
from .config import SparseConfig
from .decode import all_token_rows, attend_rows_reference, reference_decode
from .metadata import SparseKVMetadata
from .policies import DecodeBatch
from .synthetic import make_pool, shape_attention


@dataclass
class FidelityResult:
    method: str
    kind: str
    context: int
    token_budget: int
    rel_l2_mean: float
    rel_l2_max: float
    attended_fraction: float
    violation_rate: float        # fraction of outputs with rel. error > epsilon (vAttention's (eps, delta) check)
    outputs: int                 # outputs measured (steps x requests x query heads)

    def row(self) -> dict:
        return dict(self.__dict__)


def relative_l2(o: torch.Tensor, o_ref: torch.Tensor) -> torch.Tensor:
    """``||o - o_ref|| / ||o_ref||`` over the last dimension (float32)."""
    o, o_ref = o.float(), o_ref.float()
    return (o - o_ref).norm(dim=-1) / o_ref.norm(dim=-1).clamp_min(1e-30)


def dense_attention(q, k_cache, v_cache, batch: DecodeBatch, sm_scale: float) -> torch.Tensor:
    """Exact attention over every token of every request, float32 math, output in q's dtype."""
    rows, counts = all_token_rows(batch, k_cache.shape[1])
    return attend_rows_reference(q, k_cache, v_cache, rows, counts, sm_scale, False)


def fidelity_of(config: SparseConfig, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                batch: DecodeBatch, metadata: SparseKVMetadata, *, layer: int | None = None,
                backend: str = "reference", operator=None, seeds: torch.Tensor | None = None,
                sm_scale: float | None = None):
    """One layer's sparse output vs dense on given tensors: ``(rel_l2 [B, HQ], attended counts [B, HK])``.

    ``metadata`` must be up to date for ``layer`` (default: the first sparse layer). With ``backend="gpu"`` an
    already planned :class:`~sgl_sparse.decode.SparseDecodeOperator` is used.
    Steps repeat the same query: deterministic methods give the same error each step, vAttention a new sample.
    """
    D = q.shape[-1]
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    layer = config.dense_layers if layer is None else layer
    dense = dense_attention(q, k_cache, v_cache, batch, sm_scale)
    if backend == "reference":
        out, counts = reference_decode(config, layer, q, k_cache, v_cache, batch, metadata, sm_scale, seeds)
    elif backend == "gpu":
        out = operator.run(layer, q, k_cache, v_cache, metadata)
        # a dense step (no request needs a selection) attends every token
        counts = operator.last_counts if operator.path != "dense" else all_token_rows(batch, k_cache.shape[1])[1]
    else:
        raise ValueError(f"backend must be 'reference' or 'gpu', got {backend!r}")
    return relative_l2(out, dense), counts


def attention_fidelity(config: SparseConfig, *, kind: str, context: int, batch_size: int = 2, num_kv_heads: int = 2,
                       group: int = 4, head_dim: int = 64, steps: int = 4, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                       backend: str = "reference") -> FidelityResult:
    """Fidelity of ``config`` on synthetic ``kind`` attention (``peaked``, ``heavy_tailed``, ``flat``)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [context - i for i in range(batch_size)]
    pool = make_pool(lens, num_kv_heads, head_dim, config.page_size, dtype, device, gen)
    HQ = num_kv_heads * group
    layer = config.dense_layers
    meta = SparseKVMetadata(config, num_layers=layer + 1, num_slots=pool.k_cache.shape[0],
                            num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=device)
    max_pages = -(-(context + steps) // config.page_size)
    batch = DecodeBatch(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, max_pages)
    op = None
    if backend == "gpu":
        from .decode import SparseDecodeOperator

        op = SparseDecodeOperator(config, num_qo_heads=HQ, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                  num_layers=layer + 1, max_batch=batch_size, max_context=context + steps,
                                  dtype=dtype, device=device)
    q = torch.randn((batch_size, HQ, head_dim), generator=gen).to(dtype).to(device)
    q = shape_attention(pool, q, kind, gen)
    meta.update_reference(layer, pool.k_cache, pool.written_slots)
    errors, fractions = [], []
    for step in range(steps):   # same query; vAttention draws a new sample each step
        seeds = None
        if backend == "gpu":
            op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
        else:
            seeds = policies.vattention_seeds(config.seed, torch.full((1,), step + 1, dtype=torch.int64,
                                                                        device=device), layer, batch_size)
        err, counts = fidelity_of(config, q, pool.k_cache, pool.v_cache, batch, meta, layer=layer,
                                  backend=backend, operator=op, seeds=seeds)
        errors.append(err.flatten())
        fractions.append((counts.float().sum(1) / (num_kv_heads * pool.seq_lens.float())).flatten())
    e = torch.cat(errors).float().cpu()
    return FidelityResult(
        method=config.method, kind=kind, context=context, token_budget=config.token_budget,
        rel_l2_mean=float(e.mean()), rel_l2_max=float(e.max()),
        attended_fraction=float(torch.cat(fractions).mean()),
        violation_rate=float((e > config.epsilon).float().mean()), outputs=e.numel())
