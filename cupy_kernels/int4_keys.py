"""int4 key quantization: packed asymmetric int4 copy of K per slot and KV head (Twilight's key copy).

Spec: :func:`cupy_kernels.reference.quantize_keys_int4` (and ``dequantize_keys_int4``). Kernel: ``int4_keys.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import KV_DTYPES, check, check_tensor, i32, kernel, launch

GROUP_SIZES = (32, 64, 128)


def check_group_size(group_size: int, head_dim: int) -> None:
    check(group_size in GROUP_SIZES and head_dim % group_size == 0,
          f"int4 group_size must be one of {GROUP_SIZES} and divide head_dim ({head_dim}), got {group_size}")


def quantize_keys_int4(k_cache: torch.Tensor, written_slots: torch.Tensor, key_int4: torch.Tensor,
                       key_scale_zero: torch.Tensor, group_size: int | None = None) -> None:
    """Write the int4 copy of K for ``written_slots`` (in place).

    Args:
        k_cache: ``[num_slots, HK, D]`` fp16/bf16.
        written_slots: ``[N]`` int32/int64.
        key_int4: ``[num_slots, HK, D // 2]`` uint8 (channel 2i low nibble, 2i+1 high nibble of byte i).
        key_scale_zero: ``[num_slots, HK, D // group_size, 2]`` float32 (scale, zero).
        group_size: channels per quantization group (32, 64 or 128; default D).
    """
    check_tensor(k_cache, "k_cache", dtypes=list(KV_DTYPES), ndim=3)
    S, HK, D = k_cache.shape
    dev = k_cache.device
    group_size = D if group_size is None else group_size
    check(D in (64, 128), f"int4 keys support head_dim 64 or 128, got {D}")
    check_group_size(group_size, D)
    check_tensor(written_slots, "written_slots", dtypes=[torch.int32, torch.int64], ndim=1, device=dev)
    check_tensor(key_int4, "key_int4", dtypes=[torch.uint8], ndim=3, device=dev)
    check(tuple(key_int4.shape) == (S, HK, D // 2), f"key_int4 must be {(S, HK, D // 2)}, got {tuple(key_int4.shape)}")
    check_tensor(key_scale_zero, "key_scale_zero", dtypes=[torch.float32], ndim=4, device=dev)
    check(tuple(key_scale_zero.shape) == (S, HK, D // group_size, 2),
          f"key_scale_zero must be {(S, HK, D // group_size, 2)}, got {tuple(key_scale_zero.shape)}")
    n = written_slots.numel()
    if n == 0:
        return
    fn = kernel("int4_keys.cu", "quantize_keys_int4", dev, KV_BF16=KV_DTYPES[k_cache.dtype], HEAD_DIM=D,
                NUM_KV_HEADS=HK, GROUP_SIZE=group_size, SLOTS_I64=int(written_slots.dtype == torch.int64))
    launch(fn, (n,), (32 * min(HK, 16),), (k_cache, written_slots, key_int4, key_scale_zero, i32(n)), dev)
