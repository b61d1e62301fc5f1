"""vAttention adaptive sampling: a uniform sample of the residual tokens sized by (epsilon, delta).

Spec: :func:`cupy_kernels.reference.vattention_sample` (the estimator and the bound are documented there).
Kernel: ``vattn_sample.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import (KV_DTYPES, check, check_batch, check_group, check_tensor, f32, f64, i32, kernel, launch,
                    set_max_dynamic_smem)
from .reference import vattention_eps, vattention_z

SLOT_CACHE = 4096   # base draws whose slots the kernel keeps in shared memory (a -D define of vattn_sample.cu)


def check_vattention_params(epsilon: float, delta: float, base_rate: float) -> None:
    check(0 < epsilon < 1, f"vAttention epsilon must be in (0, 1), got {epsilon}")
    check(0 < delta < 1, f"vAttention delta must be in (0, 1), got {delta}")
    check(0 < base_rate < 1 or (base_rate >= 1 and float(base_rate).is_integer()),
          f"vAttention base_rate must be a fraction in (0, 1) or a whole number of draws >= 1, got {base_rate}")


def vattention_sample(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, selected_pages: torch.Tensor,
                      num_selected: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                      seq_lens: torch.Tensor, seeds: torch.Tensor, lse_det: torch.Tensor, o_det: torch.Tensor,
                      page_size: int, sm_scale: float, epsilon: float, delta: float, base_rate: float,
                      capacity: int, out: tuple[torch.Tensor, ...] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the adaptive residual sample of every (request, KV head).

    Args:
        q: ``[B, HQ, D]``; k_cache, v_cache: ``[num_slots, HK, D]`` (dtype of q).
        selected_pages ``[B, HK, K]`` int32 ascending (must include the last page), num_selected ``[B, HK]``.
        req_to_token ``[max_reqs, max_ctx]`` int32; req_pool_indices, seq_lens ``[B]``.
        seeds: ``[B]`` int64 RNG seed per row (change it per step and layer; it is read on the device, so a
            captured graph draws new samples when the buffer changes).
        lse_det: ``[B, HQ]`` float32 base-2 LSE of the deterministic attention; o_det: ``[B, HQ, D]`` (dtype of q).
        epsilon, delta: output error target; base_rate: base sample, a fraction of the residual in (0, 1) or a
            whole number of draws (>= 1).
        capacity: sample columns.
        out: optional (kv ``[B, HK, capacity]`` int32, count int32, weight float32, required int32) buffers.

    Returns:
        sample_kv_indices, num_sampled, sample_weight, required (see the reference).
    """
    check_vattention_params(epsilon, delta, base_rate)
    check_tensor(q, "q", dtypes=list(KV_DTYPES), ndim=3)
    dev = q.device
    B, HQ, D = q.shape
    check(D in (64, 128), f"vattention_sample supports head_dim 64 or 128, got {D}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, dtypes=[q.dtype], ndim=3, device=dev)
    HK = k_cache.shape[1]
    check(k_cache.shape == v_cache.shape and k_cache.shape[2] == D, "k_cache and v_cache must be [slots, HK, D]")
    G = check_group(HQ, HK)
    check_tensor(selected_pages, "selected_pages", dtypes=[torch.int32], ndim=3, device=dev)
    K = selected_pages.shape[2]
    check(tuple(selected_pages.shape[:2]) == (B, HK), f"selected_pages must be [{B}, {HK}, K]")
    check(K <= 4096, f"vattention_sample supports at most 4096 selected pages, got {K}")
    check_tensor(num_selected, "num_selected", dtypes=[torch.int32], ndim=2, device=dev)
    r2t, rpi, sl = check_batch(req_to_token, req_pool_indices, seq_lens, dev)
    check_tensor(seeds, "seeds", dtypes=[torch.int64], ndim=1, device=dev)
    check_tensor(lse_det, "lse_det", dtypes=[torch.float32], ndim=2, device=dev)
    check_tensor(o_det, "o_det", dtypes=[q.dtype], ndim=3, device=dev)
    check(seeds.shape[0] == B and tuple(lse_det.shape) == (B, HQ) and tuple(o_det.shape) == (B, HQ, D),
          "seeds [B], lse_det [B, HQ] and o_det [B, HQ, D] must match q")
    check(capacity >= 2, f"capacity must be >= 2, got {capacity}")
    if out is None:
        out = (torch.empty((B, HK, capacity), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.float32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
    kv, cnt, weight, required = out
    check(tuple(kv.shape) == (B, HK, capacity), f"sample buffer must be {(B, HK, capacity)}")
    if B == 0:
        return kv, cnt, weight, required
    fn = kernel("vattn_sample.cu", "vattention_sample", dev, KV_BF16=KV_DTYPES[q.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, GROUP=G, PAGE_SIZE=page_size, SLOT_CACHE=SLOT_CACHE)
    smem = (K + min(capacity, SLOT_CACHE)) * 4         # selected pages, then the cached slots of the base draws
    set_max_dynamic_smem(fn, smem)
    launch(fn, (HK, B), (512,),
           (q, k_cache, v_cache, selected_pages, num_selected, r2t, rpi, sl, seeds, lse_det, o_det,
            kv, cnt, weight, required, i32(K), i32(r2t.shape[1]), i32(capacity), f32(sm_scale), f64(base_rate),
            f64(vattention_z(delta)), f64(vattention_eps(epsilon))), dev, shared_mem=smem)
    return kv, cnt, weight, required
