"""Compile the sparse decode path for a model before serving it, so servers start without compiling.

    python -m sgl_sparse.warmup --model-path MODEL_DIR [--tp 2] [--sparse-config quest twilight vattention]

The CuPy kernels are compiled per attention shape (head_dim, KV heads and query heads per rank, page size, KV
dtype, int4 group) and FlashInfer JIT-compiles the per-KV-head decode it is called with; both cache on disk
(``~/.cupy/kernel_cache``, ``~/.cache/flashinfer``). A server compiles them while it captures its CUDA graphs, and
several servers or TP ranks starting at once on a cold cache compile the same kernels side by side (minutes). This
runs every method's metadata update (prefill and decode slots, int64 like SGLang's ``out_cache_loc``) and one
decode step of the operator at the model's per-rank shape on a tiny synthetic pool, once, in one process.
Needs a GPU; prints what it compiled and how long it took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import SparseConfig

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


def attention_shape(model_dir: str | Path, tp: int = 1) -> dict:
    """Per-rank attention shape of a Hugging Face ``config.json``: query heads, KV heads (replicated when fewer
    than ``tp``, as SGLang does), head_dim, and the checkpoint's dtype name."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {model_dir}: pass the model's directory (as for --model-path)")
    cfg = json.loads(path.read_text())
    if "num_attention_heads" not in cfg:
        raise ValueError(f"{path} has no num_attention_heads: not a decoder model config sgl-sparse can serve")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if heads % tp:
        raise ValueError(f"{heads} attention heads do not divide over --tp {tp}")
    return dict(num_qo_heads=heads // tp, num_kv_heads=max(1, kv_heads // tp), head_dim=head_dim,
                dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")


def warm(config: SparseConfig, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype, device="cuda") -> None:
    """One prefill metadata update, one decode metadata update and one decode step of ``config`` (every layer
    kind: dense and sparse) at this shape; compiles whatever is not cached yet."""
    import torch

    from .decode import SparseDecodeOperator
    from .metadata import SparseKVMetadata
    from .synthetic import make_pool

    cfg = config.replace(dense_layers=1 if config.is_sparse else 0, min_context=0, min_batch_tokens=0)
    P = cfg.sglang_page_size                                      # SGLang's page: coarse pages are whole pages
    lens = [max(4 * cfg.token_budget, 64 * P) + 3, P + 1]          # one sparse request, one dense fallback
    gen = torch.Generator().manual_seed(0)
    pool = make_pool(lens, num_kv_heads, head_dim, P, dtype, device, gen)
    meta = SparseKVMetadata(cfg, num_layers=2, num_slots=pool.k_cache.shape[0], num_kv_heads=num_kv_heads,
                            head_dim=head_dim, dtype=dtype, device=device)
    op = SparseDecodeOperator(cfg, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              num_layers=2, max_batch=len(lens), max_context=max(lens) + 2 * P, dtype=dtype,
                              device=device)
    q = torch.randn((len(lens), num_qo_heads, head_dim), generator=gen).to(dtype).to(device)
    new_slots = pool.last_slots
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    for layer in range(2):
        if cfg.is_sparse:
            meta.update(layer, pool.k_cache, pool.written_slots)
            meta.update(layer, pool.k_cache, new_slots)
        op.run(layer, q, pool.k_cache, pool.v_cache, meta)
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sgl_sparse.warmup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="model directory with its config.json")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size the server will use (shape per rank)")
    ap.add_argument("--sparse-config", nargs="+", default=["quest", "twilight", "vattention"],
                    help="presets or YAML files, as for launch_server's --sparse-config")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16"],
                    help="KV dtype (auto: the checkpoint's, as SGLang's --dtype auto)")
    args = ap.parse_args(argv)
    import torch

    try:
        shape = attention_shape(args.model_path, args.tp)
    except ValueError as e:
        print(f"sgl_sparse.warmup: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("sgl_sparse.warmup needs a CUDA GPU (it compiles for the GPU it runs on)", file=sys.stderr)
        return 2
    checkpoint_dtype = shape.pop("dtype")
    name = args.dtype if args.dtype != "auto" else DTYPES.get(str(checkpoint_dtype))
    if name is None:
        print("note: the checkpoint's dtype is not fp16/bf16; warming bfloat16 (pass --dtype to choose)")
        name = "bfloat16"
    dtype = getattr(torch, name)
    print(f"per-rank shape (--tp {args.tp}): {shape}, {name}", flush=True)
    for spec in args.sparse_config:
        config = SparseConfig.load(spec)
        t0 = time.time()
        warm(config, dtype=dtype, **shape)
        print(f"{spec}: ready in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
