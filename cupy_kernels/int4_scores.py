"""int4 candidate scores: approximate logits of candidate tokens from the int4 keys, and the group-mean softmax.

Spec: :func:`cupy_kernels.reference.int4_candidate_scores`. Kernel: ``int4_scores.cu`` (int8 query, dp4a).
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_group, check_tensor, f32, i32, kernel, launch, num_sms


def chunk_size(C: int, rows: int, sms: int) -> int:
    """Candidates per block: about two blocks per SM, 512..4096 candidates each (amortizes the query set-up)."""
    want = -(-C * rows // (2 * sms))
    return max(512, min(4096, -(-want // 512) * 512))


def int4_candidate_scores(q: torch.Tensor, key_int4: torch.Tensor, key_scale_zero: torch.Tensor,
                          candidates: torch.Tensor, num_candidates: torch.Tensor, sm_scale: float,
                          out: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``sm_scale * q~_g . k^_t`` of each candidate for the G query heads, and ``mean_g softmax_g``.

    Args:
        q: ``[B, HQ, D]`` fp16/bf16.
        key_int4: ``[num_slots, HK, D // 2]`` uint8; key_scale_zero: ``[num_slots, HK, D // group, 2]`` float32.
        candidates: ``[B, HK, C]`` int32 kv indices (``slot * HK + h``); num_candidates: ``[B, HK]`` int32.
        sm_scale: softmax scale.
        out: optional (logits ``[B, HK, G, C]``, probs ``[B, HK, C]``) float32 buffers.

    Returns:
        logits and probs (entries past each row's count are not written).
    """
    check_tensor(q, "q", dtypes=list(KV_DTYPES), ndim=3)
    dev = q.device
    B, HQ, D = q.shape
    check_tensor(key_int4, "key_int4", dtypes=[torch.uint8], ndim=3, device=dev)
    S, HK, Dh = key_int4.shape
    check(Dh * 2 == D and D in (64, 128), f"key_int4 must be [slots, HK, {D // 2}] with head_dim 64 or 128")
    check_tensor(key_scale_zero, "key_scale_zero", dtypes=[torch.float32], ndim=4, device=dev)
    ng = key_scale_zero.shape[2]
    check(tuple(key_scale_zero.shape) == (S, HK, ng, 2) and D % ng == 0 and D // ng in (32, 64, 128),
          f"key_scale_zero must be [slots, HK, D // group, 2] with group 32, 64 or 128, got "
          f"{tuple(key_scale_zero.shape)}")
    G = check_group(HQ, HK)
    check_tensor(candidates, "candidates", dtypes=[torch.int32], ndim=3, device=dev)
    C = candidates.shape[2]
    check(tuple(candidates.shape[:2]) == (B, HK), f"candidates must be [{B}, {HK}, C], got {tuple(candidates.shape)}")
    check_tensor(num_candidates, "num_candidates", dtypes=[torch.int32], ndim=2, device=dev)
    if out is None:
        out = (torch.empty((B, HK, G, C), dtype=torch.float32, device=dev),
               torch.empty((B, HK, C), dtype=torch.float32, device=dev))
    logits, probs = out
    check_tensor(logits, "logits", dtypes=[torch.float32], ndim=4, device=dev)
    check_tensor(probs, "probs", dtypes=[torch.float32], ndim=3, device=dev)
    check(tuple(logits.shape) == (B, HK, G, C) and tuple(probs.shape) == (B, HK, C),
          f"out buffers must be {(B, HK, G, C)} and {(B, HK, C)}")
    if B == 0 or C == 0:
        return logits, probs
    defines = dict(KV_BF16=KV_DTYPES[q.dtype], HEAD_DIM=D, NUM_KV_HEADS=HK, GROUP=G, GROUP_SIZE=D // ng)
    chunk = chunk_size(C, B * HK, num_sms(dev.index or 0))
    chunks = -(-C // chunk)
    partials = torch.empty((B, HK, chunks, G, 2), dtype=torch.float32, device=dev)
    grid = (chunks, HK, B)
    launch(kernel("int4_scores.cu", "int4_candidate_logits", dev, **defines), grid, (256,),
           (q, key_int4, key_scale_zero, candidates, num_candidates, logits, partials, i32(C), i32(chunk),
            f32(sm_scale)), dev)
    launch(kernel("int4_scores.cu", "int4_candidate_probs", dev, **defines), grid, (256,),
           (logits, partials, num_candidates, probs, i32(C), i32(chunk)), dev)
    return logits, probs
