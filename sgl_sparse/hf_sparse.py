"""The CPU path: Hugging Face transformers with the sparse methods' torch reference in decode attention.

For machines without a GPU (and as a cross-check of the GPU path), a transformers model runs its prefill with
dense SDPA and every decode step through :func:`sgl_sparse.decode.reference_decode` — the same policies and
configs as the GPU operator, with the reference kernels. The request's KV cache is viewed as an SGLang pool
(one request on consecutive slots, ``req_to_token = arange``) and the page metadata and int4 keys are rebuilt
from it at each step (exact, O(context) per layer; fine at CPU speeds).

    model, tok = sgl_sparse.models.load_model("smollm2")
    with sparse_attention(model, SparseConfig.load("quest").replace(token_budget=512)) as stats:
        text = sgl_sparse.models.greedy(model, tok, prompt)
    stats.attended_fraction     # mean fraction of the context attended per KV head in sparse layers

Batch size 1 (no padding) only. ``sparse_attention(..., observer=f)`` calls ``f`` with a :class:`SelectionEvent`
at every sparse layer's page selection (what it ranked and kept, and the q and K it saw), for diagnostics such as
``launch/selection_trace.py``; without an observer nothing is recorded or computed for it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import policies
from .config import SparseConfig
from .decode import reference_decode
from .metadata import SparseKVMetadata
from .policies import DecodeBatch

ATTN_NAME = "sgl_sparse"


@dataclass
class SelectionEvent:
    """One sparse layer's page selection at one decode step, as the torch reference made it (batch size 1).

    The tensors are the step's own (views, valid during the call only): copy what you keep, modify nothing.
    """

    step: int                   # decode step: 1 for the forward after the prefill (it yields generated token 1)
    layer: int
    q: torch.Tensor             # [HQ, D] the decode query the selection ranked pages for
    keys: torch.Tensor          # [L, HK, D] the keys of the context, the token being decoded included
    scale: float                # softmax scale of the attention logits
    page_size: int              # P: page j holds positions j*P .. j*P+P-1
    page_scores: torch.Tensor   # [HK, n] Quest's bound per page (n = ceil(L / P)); -inf where not scored
    selected: torch.Tensor      # [HK, W] int32 selected pages, ascending, -1 past num_selected
    num_selected: torch.Tensor  # [HK] int32
    config: SparseConfig


@dataclass
class SparseStats:
    config: SparseConfig
    measure_error: bool = False
    step: int = 0
    attended: list[float] = field(default_factory=list)   # per (step, sparse layer): fraction attended
    errors: list[torch.Tensor] = field(default_factory=list)  # per (step, sparse layer): rel. L2 error [HQ]
    reuse: policies.SelectionReuse | None = None   # kept selections (config.reselect_every > 1)
    reuse_from: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int32))
    planned_reuses: int = 0     # (step, sparse layer) pairs whose plan reused a kept selection
    drift_selections: int = 0   # ... of which the drift test made the layer select again
    observer: Callable[[SelectionEvent], None] | None = None   # sparse_attention(observer=...)

    @property
    def violation_rate(self) -> float:
        """Fraction of (step, sparse layer, query head) outputs whose relative error vs dense exceeds epsilon."""
        if not self.errors:
            return 0.0
        e = torch.cat(self.errors)
        return float((e > self.config.epsilon).float().mean())

    @property
    def mean_error(self) -> float:
        """Mean relative L2 error of the sparse outputs vs dense over (step, sparse layer, query head)."""
        return float(torch.cat(self.errors).mean()) if self.errors else 0.0

    @property
    def attended_fraction(self) -> float:
        return sum(self.attended) / len(self.attended) if self.attended else 1.0


def _sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    stats: SparseStats | None = getattr(module.config, "_sgl_sparse_stats", None)
    if stats is not None and stats.reuse is not None and query.shape[2] != 1:
        stats.reuse.forget(torch.zeros(1, dtype=torch.long))      # a prefill: a new request selects afresh
    if stats is None or query.shape[2] != 1 or not stats.config.is_sparse:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("the sgl_sparse CPU path decodes one request at a time (batch size 1)")
    cfg = stats.config
    layer = module.layer_idx
    _, HQ, _, D = query.shape
    HK, L = key.shape[1], key.shape[2]
    P = cfg.page_size
    page = cfg.sglang_page_size                                 # whole coarse pages in the pool
    slots = -(-L // page) * page
    k_cache = torch.zeros((slots, HK, D), dtype=key.dtype)
    v_cache = torch.zeros((slots, HK, D), dtype=value.dtype)
    k_cache[:L] = key[0].transpose(0, 1)
    v_cache[:L] = value[0].transpose(0, 1)
    meta = SparseKVMetadata(cfg, num_layers=layer + 1, num_slots=slots, num_kv_heads=HK, head_dim=D,
                            dtype=key.dtype, device="cpu")
    meta.update_reference(layer, k_cache, torch.arange(L))
    batch = DecodeBatch(torch.arange(slots, dtype=torch.int32)[None], torch.zeros(1, dtype=torch.long),
                        torch.tensor([L]), slots // P)
    if layer == 0:
        stats.step += 1
        if stats.reuse is not None:
            stats.reuse.plan(batch, out=stats.reuse_from)
    kept = kept_query = None
    if stats.reuse is not None and layer >= cfg.dense_layers:
        batch.reuse_from = stats.reuse_from
        kept = stats.reuse.layer(layer - cfg.dense_layers)
        kept_query = stats.reuse.layer_queries(layer - cfg.dense_layers)
    seeds = policies.vattention_seeds(cfg.seed, torch.tensor([stats.step]), layer, 1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    before = kept_query[0].clone() if kept_query is not None and int(batch.reuse_from[0]) > 0 else None
    observe = None
    if stats.observer is not None:
        observe = _observe(stats.observer, stats.step, layer, query[0, :, 0], k_cache[:L], scale, cfg, L)
    out, counts = reference_decode(cfg, layer, query[:, :, 0], k_cache, v_cache, batch, meta, scale, seeds, kept,
                                   kept_query, observe)
    if kept is not None and int(batch.reuse_from[0]) > 0:
        stats.planned_reuses += 1
        stats.drift_selections += before is not None and not torch.equal(before, kept_query[0])
    if layer >= cfg.dense_layers:
        stats.attended.append(float(counts.float().mean()) / L)
        if stats.measure_error:
            from .fidelity import dense_attention, relative_l2

            dense = dense_attention(query[:, :, 0], k_cache, v_cache, batch, scale)
            stats.errors.append(relative_l2(out, dense).flatten())
    return out.view(1, 1, HQ, D), None


def _observe(observer, step, layer, q, keys, scale, cfg, L):
    """The :class:`policies.SelectionObserver` that hands ``observer`` a :class:`SelectionEvent`."""
    n = -(-L // cfg.page_size)

    def observe(page_scores, selected, num_selected):
        observer(SelectionEvent(step, layer, q, keys, scale, cfg.page_size, page_scores[0, :, :n], selected[0],
                                num_selected[0], cfg))

    return observe


def register() -> None:
    """Make ``attn_implementation="sgl_sparse"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _sparse_attention_forward)


@contextlib.contextmanager
def sparse_attention(model, config: SparseConfig, measure_error: bool = False,
                     observer: Callable[[SelectionEvent], None] | None = None):
    """Run ``model``'s decode attention through ``config`` inside the block; yields :class:`SparseStats`.

    With ``measure_error`` every sparse decode attention is also computed densely on the same (real) q/k/v and
    its relative L2 error recorded: ``stats.violation_rate`` is vAttention's measured P(error > epsilon).
    ``observer`` is called with a :class:`SelectionEvent` at each sparse layer's page selection of each decode
    step (Twilight's candidates and vAttention's deterministic part are such selections too); it changes nothing
    the model computes.
    """
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    stats = SparseStats(config, measure_error, observer=observer)
    if config.is_sparse and config.reselect_every > 1 and model.config.num_hidden_layers > config.dense_layers:
        head_dim = getattr(model.config, "head_dim", None) or \
            model.config.hidden_size // model.config.num_attention_heads
        stats.reuse = policies.SelectionReuse(config, model.config.num_hidden_layers - config.dense_layers, 1,
                                              model.config.num_key_value_heads, "cpu", head_dim, model.dtype)
    model.config._sgl_sparse_stats = stats
    try:
        yield stats
    finally:
        model.config._sgl_sparse_stats = None
        model.set_attn_implementation(previous)
