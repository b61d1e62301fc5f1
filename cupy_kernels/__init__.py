"""CUDA kernel layer of sgl-sparse: CuPy RawKernels on torch tensors.

Each kernel is one ``.cu`` source, one thin wrapper module of the same name (torch tensors in and out, zero-copy,
launched on torch's current stream, no host synchronisation, capturable in a CUDA graph) and one
pure-torch function of the same name in :mod:`cupy_kernels.reference`, which is its specification.

Importing this package needs no GPU and no CuPy: kernels compile on first use.

=========================  ==================================================================
kernel                     what it computes
=========================  ==================================================================
page_bounds_update         per page and KV head, channel-wise min/max of K (Quest metadata)
page_bounds_update_layers  the same for every layer in one launch (once per decode step)
quest_page_scores          upper-bound page scores, max over the GQA group
quest_refine_scores        the same for the pages inside kept coarse pages (coarse-to-fine)
topk_pages                 k best pages per (request, KV head), sinks and local window forced
reuse_drift                per (layer, request): reuse a kept selection while the query has not moved
pages_to_kv_indices        selected pages -> FlashInfer kv indices of their tokens
compact_kv_rows            fixed-capacity index rows -> FlashInfer CSR (indptr + packed indices)
page_rows                  selected pages -> FlashInfer per-head paged rows (indptr + page indices)
token_rows                 every token of every request -> FlashInfer token rows (the dense pass)
quantize_keys_int4         packed int4 K copy with per-token (scale, zero)
int4_candidate_scores      int4 logits of candidate tokens and their group-mean softmax
top_p_select               top-p pruning by parallel binary search (Twilight)
vattention_sample          vAttention's (epsilon, delta)-sized residual sample and weight
vattention_merge           deterministic + importance-weighted sample attention, merged by LSE
=========================  ==================================================================
"""

from . import reference
from .compact_rows import compact_kv_rows
from .int4_keys import quantize_keys_int4
from .int4_scores import int4_candidate_scores
from .page_bounds import LayerTables, page_bounds_update, page_bounds_update_layers
from .page_rows import page_rows
from .pages_to_kv import pages_to_kv_indices
from .quest_refine import quest_refine_scores
from .quest_scores import quest_page_scores
from .reuse_drift import reuse_drift
from .token_rows import token_rows
from .top_p import top_p_select
from .topk_pages import topk_pages
from .vattn_merge import vattention_merge
from .vattn_sample import vattention_sample

__all__ = [
    "reference",
    "page_bounds_update",
    "page_bounds_update_layers",
    "LayerTables",
    "quest_page_scores",
    "quest_refine_scores",
    "topk_pages",
    "reuse_drift",
    "pages_to_kv_indices",
    "compact_kv_rows",
    "page_rows",
    "token_rows",
    "quantize_keys_int4",
    "int4_candidate_scores",
    "top_p_select",
    "vattention_sample",
    "vattention_merge",
]
