"""Fixed-capacity rows -> FlashInfer CSR (indptr + back-to-back indices), inside a CUDA graph.

Spec: :func:`cupy_kernels.reference.compact_kv_rows`. Kernel: ``compact_rows.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import check, check_tensor, i32, kernel, launch


def compact_kv_rows(rows: torch.Tensor, counts: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the first ``counts[r]`` entries of every row back to back.

    Args:
        rows: ``[R, cap]`` (or ``[B, HK, cap]``) int32; counts: ``[R]`` (or ``[B, HK]``) int32, ``<= cap``.
        out: optional (indptr ``[R + 1]`` int32, flat ``[>= R * cap]`` int32) buffers, e.g. a FlashInfer wrapper's
            ``paged_kv_indptr_buffer`` and ``paged_kv_indices_buffer``.

    Returns:
        indptr (``indptr[r] = sum(counts[:r])``) and flat (valid up to ``indptr[R]``).
    """
    check_tensor(rows, "rows", dtypes=[torch.int32])
    dev = rows.device
    cap = rows.shape[-1]
    R = rows.numel() // cap if cap else 0
    check_tensor(counts, "counts", dtypes=[torch.int32], device=dev)
    check(counts.numel() == R, f"counts has {counts.numel()} entries for {R} rows")
    if out is None:
        out = (torch.empty(R + 1, dtype=torch.int32, device=dev), torch.empty(max(R * cap, 1), dtype=torch.int32,
                                                                            device=dev))
    indptr, flat = out
    check_tensor(indptr, "indptr", dtypes=[torch.int32], ndim=1, device=dev)
    check_tensor(flat, "flat", dtypes=[torch.int32], ndim=1, device=dev)
    check(indptr.numel() == R + 1 and flat.numel() >= R * cap,
          f"indptr must have {R + 1} entries and flat at least {R * cap}")
    if R == 0:
        indptr.zero_()
        return indptr, flat
    fn = kernel("compact_rows.cu", "compact_kv_rows", dev)
    launch(fn, (R, max(1, -(-cap // 256))), (256,), (rows, counts, indptr, flat, i32(cap)), dev)
    return indptr, flat
