"""vAttention's merge of the deterministic and the importance-weighted sample attention.

Spec: :func:`cupy_kernels.reference.vattention_merge`. Kernel: ``vattn_merge.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_group, check_tensor, kernel, launch


def vattention_merge(o_det: torch.Tensor, lse_det: torch.Tensor, o_s: torch.Tensor, lse_s: torch.Tensor,
                     s_counts: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge the two partial attentions of every query head by their base-2 LSEs.

    Args:
        o_det: ``[B, HQ, D]`` fp16/bf16, attention over the deterministic set; lse_det: ``[B, HQ]`` float32 (base 2).
        o_s: ``[B, HQ, D]`` (dtype of o_det), attention over the sample, unweighted; lse_s: ``[B, HQ]`` float32.
        s_counts: ``[B, HK]`` int32 sampled tokens per KV head (0: the head's sample is ignored, o_s/lse_s unread).
        weight: ``[B, HK]`` float32, how many residual tokens each sampled token stands for (log2 is added to
            lse_s, clamped at 1e-30).
        out: optional ``[B, HQ, D]`` buffer (dtype of o_det).
    Returns:
        ``[B, HQ, D]`` merged output in o_det's dtype.
    """
    check_tensor(o_det, "o_det", dtypes=list(KV_DTYPES), ndim=3)
    dev = o_det.device
    B, HQ, D = o_det.shape
    check_tensor(o_s, "o_s", dtypes=[o_det.dtype], ndim=3, device=dev)
    check(tuple(o_s.shape) == (B, HQ, D), f"o_s must be {(B, HQ, D)}, got {tuple(o_s.shape)}")
    for name, t in (("lse_det", lse_det), ("lse_s", lse_s)):
        check_tensor(t, name, dtypes=[torch.float32], ndim=2, device=dev)
        check(tuple(t.shape) == (B, HQ), f"{name} must be {(B, HQ)}, got {tuple(t.shape)}")
    check_tensor(s_counts, "s_counts", dtypes=[torch.int32], ndim=2, device=dev)
    check_tensor(weight, "weight", dtypes=[torch.float32], ndim=2, device=dev)
    HK = s_counts.shape[1]
    check(s_counts.shape[0] == B and tuple(weight.shape) == (B, HK),
          f"s_counts and weight must be [B, HK] = [{B}, HK], got {tuple(s_counts.shape)} and {tuple(weight.shape)}")
    G = check_group(HQ, HK)
    check(D % 8 == 0 and D <= 256, f"head_dim must be a multiple of 8 up to 256, got {D}")
    if out is None:
        out = torch.empty_like(o_det)
    check_tensor(out, "out", dtypes=[o_det.dtype], ndim=3, device=dev)
    check(tuple(out.shape) == (B, HQ, D), f"out must be {(B, HQ, D)}, got {tuple(out.shape)}")
    if B == 0:
        return out
    fn = kernel("vattn_merge.cu", "vattention_merge", dev, KV_BF16=KV_DTYPES[o_det.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, GROUP=G)
    launch(fn, (HQ, B), (D // 8,), (o_det, lse_det, o_s, lse_s, s_counts, weight, out), dev)
    return out
