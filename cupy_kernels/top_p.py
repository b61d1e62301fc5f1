"""Top-p pruning by parallel binary search (Twilight): per row, the smallest set holding ``top_p`` of the mass.

Spec: :func:`cupy_kernels.reference.top_p_select`. Kernel: ``top_p.cu`` (bisection on the threshold's bits).
"""

from __future__ import annotations

import torch

from ._cuda import check, check_tensor, f32, i32, kernel, launch, set_max_dynamic_smem, u64

MAX_SMEM_BYTES = 200 * 1024


def top_p_select(probs: torch.Tensor, num_candidates: torch.Tensor, top_p: float,
                 candidate_ids: torch.Tensor | None = None, keep_all: torch.Tensor | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the candidates whose probability is at least the top-p threshold.

    Args:
        probs: ``[B, HK, C]`` float32, non-negative; num_candidates: ``[B, HK]`` int32.
        top_p: in (0, 1]; the kept mass is ``>= top_p * sum(probs)`` and the set is the smallest such
            threshold set (ties at the threshold all kept). ``top_p >= 1`` keeps everything.
        candidate_ids: optional ``[B, HK, C]`` int32 emitted instead of positions (e.g. kv indices).
        keep_all: optional ``[B]`` bool: requests whose rows keep every candidate (no pruning).
        out: optional (kept ``[B, HK, C]`` int32, num_kept ``[B, HK]`` int32) buffers.

    Returns:
        kept (ascending position order; entries past the count not written) and num_kept.
    """
    check(top_p > 0, f"top_p must be in (0, 1], got {top_p}")
    check_tensor(probs, "probs", dtypes=[torch.float32], ndim=3)
    dev = probs.device
    B, HK, C = probs.shape
    check_tensor(num_candidates, "num_candidates", dtypes=[torch.int32], ndim=2, device=dev)
    check(C * 4 <= MAX_SMEM_BYTES, f"top_p_select holds a row in shared memory: at most {MAX_SMEM_BYTES // 4} "
          f"candidates per row, got {C}; lower the candidate budget")
    if candidate_ids is not None:
        check_tensor(candidate_ids, "candidate_ids", dtypes=[torch.int32], ndim=3, device=dev)
        check(tuple(candidate_ids.shape) == (B, HK, C), f"candidate_ids must be {(B, HK, C)}")
    if keep_all is not None:
        check_tensor(keep_all, "keep_all", dtypes=[torch.bool], ndim=1, device=dev)
        check(keep_all.shape[0] == B, f"keep_all has {keep_all.shape[0]} entries for a batch of {B}")
    if out is None:
        out = (torch.empty((B, HK, C), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
    kept, cnt = out
    check_tensor(kept, "kept", dtypes=[torch.int32], ndim=3, device=dev)
    check(tuple(kept.shape) == (B, HK, C) and tuple(cnt.shape) == (B, HK),
          f"out buffers must be {(B, HK, C)} and {(B, HK)}")
    if B * HK == 0 or C == 0:
        if C == 0:
            cnt.zero_()
        return kept, cnt
    fn = kernel("top_p.cu", "top_p_select", dev)
    smem = C * 4
    set_max_dynamic_smem(fn, smem)
    ids = candidate_ids if candidate_ids is not None else u64(0)
    flags = keep_all if keep_all is not None else u64(0)
    launch(fn, (B * HK,), (512,), (probs, num_candidates, ids, flags, kept, cnt, i32(C), f32(min(top_p, 1.0)),
                                   i32(HK)), dev, shared_mem=smem)
    return kept, cnt
