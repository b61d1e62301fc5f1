"""Every token of every request as FlashInfer's token rows (the dense decode pass's indices, page size 1).

Spec: :func:`cupy_kernels.reference.token_rows`. Kernel: ``token_rows.cu``.
"""

from __future__ import annotations

import torch

from ._cuda import check, check_batch, check_tensor, i32, kernel, launch

CHUNK = 4096           # positions per block (token_rows.cu)


def token_rows(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
               max_tokens: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate ``req_to_token[req_pool_indices[b], :seq_lens[b]]`` over the batch.

    Args:
        req_to_token: ``[max_reqs, max_ctx]`` int32; req_pool_indices, seq_lens: ``[B]`` int32/int64 (device).
        max_tokens: the longest request's length (host int, ``>= max(seq_lens)``): sizes the grid, so no host
            sync reads it from the device.
        out: optional int32 buffer of ``>= sum(seq_lens)`` entries (e.g. a FlashInfer wrapper's
            ``paged_kv_indices_buffer``); the entries past the sum keep what they held, and nothing is written
            past its end (a shorter buffer gets the first ``out.numel()`` entries).

    Returns:
        ``out`` (or a new ``[sum(seq_lens)]`` tensor, which needs ``sum(seq_lens)`` from the host: pass ``out``
        on a hot path).
    """
    dev = req_to_token.device
    r2t, rpi, sl = check_batch(req_to_token, req_pool_indices, seq_lens, dev)
    check(max_tokens >= 0, f"max_tokens must be >= 0, got {max_tokens}")
    if out is None:
        out = torch.empty(int(sl.long().sum()), dtype=torch.int32, device=dev)
    check_tensor(out, "out", dtypes=[torch.int32], ndim=1, device=dev)
    B = sl.shape[0]
    if B == 0 or max_tokens == 0:
        return out
    fn = kernel("token_rows.cu", "token_rows", dev)
    launch(fn, (B, -(-max_tokens // CHUNK)), (256,), (r2t, rpi, sl, out, i32(r2t.shape[1]), i32(out.numel())), dev)
    return out
