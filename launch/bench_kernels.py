#!/usr/bin/env python3
"""Time every cupy_kernels kernel at the Llama-3.1-8B attention shape and compare it with the GPU's HBM peak.

Shape: 32 query heads, 8 KV heads, head_dim 128, bf16 KV cache, page size 16 (SGLang's MHA pool of one layer,
``k_cache [slots, HK, D]``, ``req_to_token [max_reqs, max_ctx]`` int32, kv index = ``slot * HK + h``).
For every (batch, context) pair (default 1 and 32 x 32K and 128K) the script builds one random pool (requests on
shuffled physical pages), fills the Quest page bounds and the int4 key copy with the kernels themselves (a
prefill over every slot), and then times, in pipeline order, on real data:

    page_bounds_update     decode (one token per request) and, once per run, a prefill of a 32K-token prompt
    quest_page_scores      every page of every request, from bf16 bounds and from int8 bounds rows
    topk_pages             top_k = 128 pages (2048 tokens) and 512 pages (8192 tokens), n_sink=1, n_local=2
    topk_pages_radix4      the same on the same scores by the previous kernel (benchmark baseline only), checked
                           equal to topk_pages: `--kernels topk_pages,topk_pages_radix4` is the A/B
    pages_to_kv_indices    the pages selected by each topk_pages row
    compact_kv_rows        (if cupy_kernels exports it) those kv rows, and top-p's kept rows, into FlashInfer CSR
    quantize_keys_int4     decode (B tokens) and, once per run, a 32K-token prefill
    int4_candidate_scores  8192 candidate tokens per (request, KV head): the tokens of 512 random pages
    top_p_select           on those probabilities, p = 0.95, emitting kv indices
    vattention_sample      deterministic set 128 pages (2048 tokens, sinks and local included) from Quest;
                           residual = the rest; base_rate 0.02, epsilon 0.05, delta 0.05

Timing: after warm-up (the first call compiles), each kernel is timed eagerly and as a replayed
``torch.cuda.CUDAGraph`` holding that one launch. Each repetition first overwrites a 256 MiB buffer (so the
kernel starts with a cold L2, unless --no-flush) and then enqueues ``torch.cuda._sleep`` long enough to cover the
host's launch overhead, so the CUDA events around the launch measure device time only; the host time of one
eager wrapper call (argument checks, DLPack, launch) is reported apart. Median of --reps repetitions. The run
also times a 1-element torch add the same way (the "timing floor", about 4 us on an H200 with the L2 flushed):
kernels near it are latency bound and their GB/s says little.

Bytes: each case counts the fewest bytes the kernel must move through HBM (each input read once, each output
written once; the formulas are the ``bytes_*`` functions below). Data-dependent counts (kept candidates,
samples drawn, distinct req_to_token entries) are read back from the kernel's outputs after the warm-up.
GB/s = bytes / graph time (eager time where no graph was timed); % of peak = GB/s over the device-to-device copy
bandwidth measured at the start of the same run (bytes read + written).

Output: one progress line per case on stderr, a table on stdout, and a JSON file (--out).
Needs torch, CuPy and an NVIDIA GPU; ``--dry-run`` prints the byte model and memory plan without either.

    python launch/bench_kernels.py                      # full run: 1 and 32 x 32K and 128K
    python launch/bench_kernels.py --quick              # one small case per kernel (smoke run)
    python launch/bench_kernels.py --contexts 32K --batches 1,8,32 --reps 50 --out out/b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from cupy_kernels.reference import int8_bounds_row_bytes  # noqa: E402

# ----------------------------------------------------------------------------- shape (Llama-3.1-8B attention)

HQ = 32                      # query heads
HK = 8                       # KV heads
D = 128                      # head_dim
G = HQ // HK                 # GQA group
P = 16                       # page size
INT4_GROUP = D               # int4 quantization group (the kernels' default: one group per head)
KV_DTYPE = torch.bfloat16
SM_SCALE = 1.0 / math.sqrt(D)

BF16, I32, I64, F32 = 2, 4, 8, 4   # element sizes in bytes
INT8_ROW_BYTES = int8_bounds_row_bytes(D)    # an int8 bounds row: 2*D codes, fp32 lo and scale

DEFAULT_CONTEXTS = (32768, 131072)
DEFAULT_BATCHES = (1, 32)
DEFAULT_TOPK = (128, 512)            # pages: 2048 and 8192 tokens
N_SINK, N_LOCAL = 1, 2
CANDIDATE_TOKENS = 8192              # Twilight's loose Quest budget per (request, KV head)
TOP_P = 0.95
VATTN_DET_TOKENS = 2048              # deterministic budget (128 pages incl. sinks / local window)
VATTN = dict(base_rate=0.02, epsilon=0.05, delta=0.05)
VATTN_CAPACITY = 8192                # sample columns per (request, KV head)
PREFILL_TOKENS = 32768

KERNELS = ("page_bounds_update", "quest_page_scores", "topk_pages", "topk_pages_radix4",
           "pages_to_kv_indices", "compact_kv_rows", "quantize_keys_int4", "int4_candidate_scores", "top_p_select",
           "vattention_sample")
OPTIONAL_KERNELS = ("compact_kv_rows",)   # timed only where cupy_kernels exports them

GiB = float(1 << 30)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- minimum bytes per kernel
# Each function returns the fewest bytes the kernel must move through device memory: every input it needs
# read once, every output written once (re-reads that hit L2 and index arithmetic are not counted).


def bytes_page_bounds_update(n_slots: int, tokens_read: int, pages_written: int) -> int:
    """page_bounds_update: reads ``written_slots`` (int32 each) and, for every page touched, the K rows of
    offsets 0..o (o = the last offset written there; HK*D bf16 a token); writes min and max (2*D bf16) per
    (page, KV head).

    decode: n_slots = B, tokens_read = B * ((L - 1) % P + 1), pages_written = B.
    prefill of N tokens: n_slots = tokens_read = N, pages_written = ceil(N / P): one pass over K.
    """
    return n_slots * I32 + tokens_read * HK * D * BF16 + pages_written * HK * 2 * D * BF16


def bytes_quest_page_scores(batch: int, n_pages: int, row_bytes: int = 2 * D * BF16) -> int:
    """quest_page_scores: reads q (B*HQ*D bf16), req_pool_indices and seq_lens (int32), one req_to_token entry
    per (request, page) (int32, shared by the HK heads) and per (request, KV head, page) the bounds row
    (``row_bytes``: 2*D bf16, or an int8 row's 2*D codes and fp32 lo and scale); writes one float32 score per
    (request, KV head, page)."""
    return (batch * HQ * D * BF16 + 2 * batch * I32 + batch * n_pages * I32
            + batch * HK * n_pages * (row_bytes + F32))


def bytes_topk_pages(batch: int, n_pages: int, top_k: int) -> int:
    """topk_pages: reads seq_lens and every score once (float32 per (request, KV head, page)); writes top_k
    int32 pages and one int32 count per (request, KV head)."""
    return batch * I32 + batch * HK * n_pages * F32 + batch * HK * (top_k + 1) * I32


def bytes_pages_to_kv_indices(batch: int, top_k: int, n_kv_total: int, r2t_entries: int) -> int:
    """pages_to_kv_indices: reads the selected pages and counts (int32), req_pool_indices and seq_lens, and the
    req_to_token entries of the distinct pages selected in each request (``r2t_entries`` int32: P per page,
    shared by the heads that chose it); writes the ``n_kv_total`` int32 kv indices (the budget's tokens) and
    one count per (request, KV head)."""
    return (batch * HK * (top_k + 1) * I32 + 2 * batch * I32 + r2t_entries * I32
            + n_kv_total * I32 + batch * HK * I32)


def bytes_compact_kv_rows(rows: int, n_valid_total: int) -> int:
    """compact_kv_rows: reads the counts (int32 per row, once) and the valid entries of every row (int32);
    writes them back to back (int32) and the indptr (rows + 1 int32)."""
    return rows * I32 + n_valid_total * I32 + n_valid_total * I32 + (rows + 1) * I32


def bytes_quantize_keys_int4(n_tokens: int, group_size: int = INT4_GROUP) -> int:
    """quantize_keys_int4: reads the written slot (int32) and its K row (HK*D bf16) per token; writes per
    (token, KV head) D/2 bytes of packed codes and a float32 (scale, zero) per group of channels."""
    return n_tokens * (I32 + HK * D * BF16) + n_tokens * HK * (D // 2 + (D // group_size) * 2 * F32)


def bytes_int4_candidate_scores(batch: int, n_candidates_total: int, group_size: int = INT4_GROUP) -> int:
    """int4_candidate_scores: reads q (bf16), num_candidates (int32 per (request, KV head)) and per candidate
    its kv index (int32), D/2 code bytes and the float32 (scale, zero) of each group; writes per candidate G
    float32 logits and one float32 group-mean probability."""
    per_candidate = I32 + D // 2 + (D // group_size) * 2 * F32 + G * F32 + F32
    return batch * HQ * D * BF16 + batch * HK * I32 + n_candidates_total * per_candidate


def bytes_top_p_select(batch: int, n_candidates_total: int, n_kept_total: int, with_ids: bool = True) -> int:
    """top_p_select: reads num_candidates, each candidate's probability once (float32) and, with
    candidate_ids, the id of every kept candidate (int32); writes the kept ids (int32) and the counts."""
    return (batch * HK * I32 + n_candidates_total * F32 + n_kept_total * I32 * (2 if with_ids else 1)
            + batch * HK * I32)


def vattn_n_base(n_s: int, base_rate: float, capacity: int) -> int:
    """Base-sample draws of one (request, KV head) that read K and V (0 when every residual token is taken
    without estimating), as in reference.vattention_sample."""
    if n_s <= 0:
        return 0
    n_base = min(max(2, math.ceil(base_rate * n_s)), capacity)
    return 0 if n_s <= n_base else n_base


def bytes_vattention_sample(batch: int, top_k: int, n_base_total: int, n_draw_total: int,
                            n_take_total: int) -> int:
    """vattention_sample: reads the selected pages and counts (int32), req_pool_indices and seq_lens (int32),
    seeds (int64), q and o_det (B*HQ*D bf16 each), lse_det (float32 per query head); per base-sample draw the
    K and V rows of its token in that head (2*D bf16); per distinct draw (max(n_base, n_take) a row) one
    req_to_token entry; writes the n_take sampled kv indices (int32) and per (request, KV head) the count,
    the weight and the required size."""
    return (batch * HK * (top_k + 1) * I32 + 2 * batch * I32 + batch * I64 + 2 * batch * HQ * D * BF16
            + batch * HQ * F32 + n_base_total * 2 * D * BF16 + n_draw_total * I32 + n_take_total * I32
            + batch * HK * 3 * 4)


def bytes_peak_copy(n: int) -> int:
    """dst.copy_(src) of n bytes: n read + n written."""
    return 2 * n


# ----------------------------------------------------------------------------- memory plan


def pool_geometry(batch: int, context: int) -> dict:
    """Physical pages and slots of the pool of one (batch, context) case: page 0 reserved (as SGLang's), the
    requests' pages, plus 1% (at least 64 pages) of spare pages."""
    pages_per_req = ceil_div(context, P)
    spare = max(64, batch * pages_per_req // 100)
    total_pages = 1 + batch * pages_per_req + spare
    return dict(pages_per_req=pages_per_req, total_pages=total_pages, slots=total_pages * P,
                max_ctx=pages_per_req * P + 2 * P, rows=batch + 3)


def estimate_case_memory(batch: int, context: int, topks: tuple[int, ...], candidate_tokens: int,
                         capacity: int, det_tokens: int) -> int:
    """Bytes of device memory one (batch, context) case allocates at its high-water mark (+10% and 512 MiB)."""
    geo = pool_geometry(batch, context)
    S, npr = geo["slots"], geo["pages_per_req"]
    C = min(candidate_tokens, (context // P) * P)
    total = 2 * S * HK * D * BF16                                  # K and V pools
    total += (S // P) * HK * (2 * D * BF16 + INT8_ROW_BYTES)       # page bounds, bf16 and int8
    total += S * HK * (D // 2 + (D // INT4_GROUP) * 2 * F32)       # int4 keys + (scale, zero)
    total += geo["rows"] * geo["max_ctx"] * I32                    # req_to_token
    total += batch * context * (I64 + I32)                         # slot map + every slot (prefill list)
    total += batch * HK * npr * (F32 + I64)                        # scores, random keys for candidate pages
    for k in topks:
        total += batch * HK * (k + k * P) * I32                    # selection + kv indices
    total += batch * HK * C * (I32 * 2 + G * F32 + F32 + I64 * 2)  # candidates, kept, logits, probs, temps
    total += batch * HK * det_tokens * D * (BF16 * 2 + F32 * 2)    # deterministic K/V rows for o_det / lse_det
    total += batch * HK * G * det_tokens * F32 * 3                 # their logits and softmax
    total += batch * HK * capacity * I32                           # vAttention sample
    return int(total * 1.10) + (512 << 20)


# ----------------------------------------------------------------------------- table


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(rows: list[dict], peak_gbps: float | None) -> str:
    """Fixed-width table of the result rows (skipped / failed rows say why)."""
    head = (f"{'kernel':<22} {'case':<22} {'B':>3} {'context':>7} {'eager us':>9} {'graph us':>9} "
            f"{'host us':>8} {'MB':>9} {'GB/s':>8} {'% peak':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['kernel']:<22} {r['case']:<22} {r['batch']:>3} {r['context']:>7}"
        if r["status"] != "ok":
            lines.append(f"{left} {r['status']}")
            continue
        mb = r["bytes"] / 1e6 if r.get("bytes") is not None else None
        pct = r.get("pct_peak")
        line = (f"{left} {fmt_num(r.get('eager_us'), 2):>9} {fmt_num(r.get('graph_us'), 2):>9} "
                f"{fmt_num(r.get('host_us'), 1):>8} {fmt_num(mb, 3):>9} {fmt_num(r.get('gbps'), 1):>8} "
                f"{fmt_num(pct, 1):>7}")
        if r.get("check", "ok") != "ok":
            line += f"  !! {r['check']}"
        lines.append(line)
    if peak_gbps:
        lines.append(f"% peak: against the device-to-device copy, {peak_gbps:.1f} GB/s (read + written).")
    lines.append("eager / graph: median device time of one launch (events; host launch hidden by a sleep "
                 "kernel); host: median CPU time of one eager wrapper call; GB/s from graph time.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- arguments


def parse_size_list(text: str) -> list[int]:
    """'32K,128K' or '32768,131072' -> [32768, 131072] (K = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            mult, part = 1024, part[:-1]
        elif part.endswith("m"):
            mult, part = 1 << 20, part[:-1]
        try:
            value = int(part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {part!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def parse_kernel_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in KERNELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kernels {bad}; choose from {', '.join(KERNELS)}")
    return names


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the ones resolved later (None)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time the cupy_kernels kernels at the Llama-3.1-8B attention shape (32 q heads, 8 KV heads, "
                    "head_dim 128, bf16, page 16): median device time eager and CUDA-graph-replayed, achieved "
                    "GB/s and % of the HBM peak measured in the same run.",
        formatter_class=_HelpFormatter)
    ap.add_argument("--contexts", type=parse_size_list, default=list(DEFAULT_CONTEXTS),
                    help="context lengths in tokens, comma separated (K suffix = 1024)")
    ap.add_argument("--batches", type=parse_size_list, default=list(DEFAULT_BATCHES),
                    help="batch sizes, comma separated")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median; default 30, "
                    "10 with --quick)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (the first compiles)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one small case per kernel (context 16K, batch 1, top_k 128 only, small "
                         "prefill and peak copy) unless --contexts / --batches are given too")
    ap.add_argument("--out", default=None,
                    help="JSON result file, written after every (batch, context) case and at the end "
                         "(default: out/bench_kernels.json under the repo root; out/bench_kernels_quick.json "
                         "with --quick)")
    ap.add_argument("--kernels", type=parse_kernel_list, default=list(KERNELS),
                    help="kernels to time (the others still run once where later kernels need their output)")
    ap.add_argument("--topk", type=parse_size_list, default=list(DEFAULT_TOPK), help="top_k rows, in pages")
    ap.add_argument("--score-columns", type=int, default=0,
                    help="columns of the page-score rows (max_pages), when wider than the context's pages: the "
                         "product sizes them for the model's max context (8192 at 128K), which picks topk_pages' "
                         "KEYS_PER_THREAD; 0 = the context's pages")
    ap.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS,
                    help="prompt length of the prefill rows (page_bounds_update, quantize_keys_int4); run once, "
                         "in the first case that fits; 0 = no prefill rows")
    ap.add_argument("--candidate-tokens", type=int, default=CANDIDATE_TOKENS,
                    help="int4 candidates per (request, KV head) (the tokens of random pages)")
    ap.add_argument("--vattn-capacity", type=int, default=VATTN_CAPACITY,
                    help="vattention_sample sample columns per (request, KV head)")
    ap.add_argument("--peak-gib", type=float, default=2.0,
                    help="size of the device-to-device copy that measures the HBM peak (source size)")
    ap.add_argument("--flush-mib", type=int, default=256,
                    help="buffer overwritten before every timed launch to empty the L2 (0 = no flush)")
    ap.add_argument("--no-flush", action="store_true", help="same as --flush-mib 0 (warm-L2 timings)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA graph timings")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: print the cases, their byte model (data-dependent counts estimated) "
                         "and the memory plan, then exit")
    args = ap.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        if "--contexts" not in given:
            args.contexts = [16384]
        if "--batches" not in given:
            args.batches = [1]
        if "--topk" not in given:
            args.topk = [128]
        if "--prefill-tokens" not in given:
            args.prefill_tokens = 8192
        if "--peak-gib" not in given:
            args.peak_gib = 0.5
    if args.out is None:
        args.out = str(REPO_ROOT / "out" / ("bench_kernels_quick.json" if args.quick else "bench_kernels.json"))
    if args.reps is None:
        args.reps = 10 if args.quick else 30
    if args.no_flush:
        args.flush_mib = 0
    if args.reps < 1 or args.warmup < 1:
        ap.error("--reps and --warmup must be >= 1")
    det_pages = VATTN_DET_TOKENS // P
    for k in args.topk:
        if k < N_SINK + N_LOCAL:
            ap.error(f"--topk values must be >= n_sink + n_local = {N_SINK + N_LOCAL}")
    if args.candidate_tokens < P or args.candidate_tokens * 4 > 200 * 1024:
        ap.error("--candidate-tokens must be in [16, 51200] (top_p_select keeps a row in shared memory)")
    if args.vattn_capacity < 2:
        ap.error("--vattn-capacity must be >= 2")
    if args.score_columns < 0:
        ap.error("--score-columns must be >= 0")
    for ctx in args.contexts:
        if ctx < 2 * VATTN_DET_TOKENS:
            ap.error(f"contexts must be >= {2 * VATTN_DET_TOKENS} tokens (the vAttention case keeps "
                     f"{det_pages} pages deterministic)")
    return args


# ----------------------------------------------------------------------------- dry run (no GPU)


def _exports_compact() -> bool:
    try:
        import cupy_kernels
    except Exception:  # noqa: BLE001
        return False
    return hasattr(cupy_kernels, "compact_kv_rows")


def planned_rows(args) -> list[dict]:
    """The cases of a run with their byte counts; data-dependent counts estimated (kept = 90% of the
    candidates, n_take = capacity, distinct req_to_token entries = min(pages, HK * top_k) pages a request)."""
    rows = []
    prefill_done = args.prefill_tokens <= 0
    with_compact = _exports_compact()

    def row(kernel, case, b, ctx, nbytes):
        rows.append(dict(kernel=kernel, case=case, batch=b, context=ctx, status="ok", bytes=nbytes))

    for ctx in args.contexts:
        for b in args.batches:
            npr = ceil_div(ctx, P)
            row("page_bounds_update", "decode", b, ctx, bytes_page_bounds_update(b, b * ((ctx - 1) % P + 1), b))
            if not prefill_done:
                n = min(args.prefill_tokens, ctx)
                row("page_bounds_update", f"prefill {n} tok", 1, n, bytes_page_bounds_update(n, n, ceil_div(n, P)))
            row("quest_page_scores", "all pages", b, ctx, bytes_quest_page_scores(b, npr))
            row("quest_page_scores", "int8 all pages", b, ctx, bytes_quest_page_scores(b, npr, INT8_ROW_BYTES))
            for k in args.topk:
                row("topk_pages", f"top_k={k}", b, ctx, bytes_topk_pages(b, npr, k))
            if "topk_pages_radix4" in args.kernels:
                for k in args.topk:
                    row("topk_pages_radix4", f"top_k={k}", b, ctx, bytes_topk_pages(b, npr, k))
            for k in args.topk:
                kk = min(k, npr)
                n_kv = b * HK * min(kk * P, ctx)
                r2t = b * min(npr, HK * kk) * P
                row("pages_to_kv_indices", f"top_k={k}", b, ctx, bytes_pages_to_kv_indices(b, k, n_kv, r2t))
            if with_compact:
                for k in args.topk:
                    row("compact_kv_rows", f"kv rows top_k={k}", b, ctx,
                        bytes_compact_kv_rows(b * HK, b * HK * min(k * P, ctx)))
            row("quantize_keys_int4", "decode", b, ctx, bytes_quantize_keys_int4(b))
            if not prefill_done:
                n = min(args.prefill_tokens, ctx)
                row("quantize_keys_int4", f"prefill {n} tok", 1, n, bytes_quantize_keys_int4(n))
                prefill_done = True
            c = min(args.candidate_tokens, (ctx // P) * P)
            row("int4_candidate_scores", f"C={c}", b, ctx, bytes_int4_candidate_scores(b, b * HK * c))
            row("top_p_select", f"C={c} p={TOP_P}", b, ctx,
                bytes_top_p_select(b, b * HK * c, int(0.9 * b * HK * c)))
            if with_compact:
                row("compact_kv_rows", "top-p kept rows", b, ctx, bytes_compact_kv_rows(b * HK, int(0.9 * b * HK * c)))
            k = VATTN_DET_TOKENS // P
            n_s = ctx - VATTN_DET_TOKENS
            nb = vattn_n_base(n_s, VATTN["base_rate"], args.vattn_capacity)
            n_take = min(args.vattn_capacity, n_s)
            row("vattention_sample", f"det={k}p cap={args.vattn_capacity}", b, ctx,
                bytes_vattention_sample(b, k, b * HK * nb, b * HK * max(nb, n_take), b * HK * n_take))
    return rows


def dry_run(args) -> int:
    rows = planned_rows(args)
    print("dry run: cases and the minimum bytes each must move (no timings; data-dependent counts estimated)")
    print(format_table(rows, None))
    print("\nmemory plan per (batch, context) case:")
    for ctx in args.contexts:
        for b in args.batches:
            need = estimate_case_memory(b, ctx, tuple(args.topk), args.candidate_tokens, args.vattn_capacity,
                                        VATTN_DET_TOKENS)
            geo = pool_geometry(b, ctx)
            print(f"  B={b:>3} context={ctx:>7}: {geo['slots']} slots, K+V pool "
                  f"{2 * geo['slots'] * HK * D * BF16 / GiB:.2f} GiB, about {need / GiB:.2f} GiB in all")
    return 0


# ----------------------------------------------------------------------------- timing


class Timer:
    """Device time of one launch by CUDA events, host launch overhead hidden behind a sleep kernel.

    Per repetition: overwrite the flush buffer (cold L2), enqueue ``torch.cuda._sleep`` for longer than the
    host needs to enqueue the launch, record the start event, launch, record the end event. All repetitions
    are enqueued before one synchronisation.
    """

    def __init__(self, device: torch.device, reps: int, flush_mib: int):
        self.reps = reps
        self.flush = torch.empty(flush_mib << 20, dtype=torch.uint8, device=device) if flush_mib > 0 else None
        self.cycles_per_us = self._calibrate_sleep()
        self.capture_stream = torch.cuda.Stream(device)

    @staticmethod
    def _calibrate_sleep() -> float | None:
        if not hasattr(torch.cuda, "_sleep"):
            return None
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        vals = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch.cuda._sleep(1_000_000)
            e.record()
            e.synchronize()
            vals.append(1_000_000 / (s.elapsed_time(e) * 1e3))
        return min(vals)   # fewest cycles per µs: sleeps come out at least as long as asked

    @property
    def hides_host(self) -> bool:
        return self.cycles_per_us is not None

    def run(self, fn: Callable[[], object], host_us_hint: float) -> tuple[list[float], list[float], int]:
        """(device µs per launch, host µs per call, calls whose host time outlasted the sleep: their device
        time may include an idle gap)."""
        sleep_us = min(20000.0, 4.0 * host_us_hint + 200.0)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        host = []
        for i in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()
            if self.cycles_per_us:
                torch.cuda._sleep(int(sleep_us * self.cycles_per_us))
            starts[i].record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            ends[i].record()
        torch.cuda.synchronize()
        unhidden = sum(h > sleep_us for h in host) if self.cycles_per_us else len(host)
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)], host, unhidden


def measure_peak(device: torch.device, gib: float, reps: int = 10) -> dict:
    """Device-to-device copy bandwidth: dst.copy_(src) of random bytes, (read + written) / median time."""
    n = int(gib * GiB) // 16 * 16
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    ok = bool(torch.equal(dst[: 1 << 20], src[: 1 << 20])) and bool(torch.equal(dst[-(1 << 20):], src[-(1 << 20):]))
    med = statistics.median(times)
    nbytes = bytes_peak_copy(n)
    del src, dst
    torch.cuda.empty_cache()
    return dict(copy_bytes=n, bytes_moved=nbytes, median_us=med, samples_us=[round(t, 2) for t in times],
                gbps=nbytes / (med * 1e-6) / 1e9, copy_verified=ok)


def measure_floor(device: torch.device, timer: "Timer") -> dict:
    """The timing floor: one trivial torch kernel (add 1 to 1-element tensor) timed like the kernels, eager and
    as a graph replay. Kernels near this time are latency bound; their GB/s says little."""
    x = torch.ones(1, device=device)
    fn = lambda: x.add_(1.0)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    eager, _, _ = timer.run(fn, 20.0)
    out = dict(eager_us=statistics.median(eager), graph_us=None)
    try:
        stream = timer.capture_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        g, _, _ = timer.run(graph.replay, 10.0)
        out["graph_us"] = statistics.median(g)
        del graph
    except Exception as e:  # noqa: BLE001
        out["graph_error"] = f"{type(e).__name__}: {e}"
    return out


def spec_peak_gbps(device_index: int) -> float | None:
    """Datasheet-style peak from the memory clock and bus width (DDR), when the runtime reports them."""
    try:
        import cupy
        rt = cupy.cuda.runtime
        clock_khz = rt.deviceGetAttribute(36, device_index)     # cudaDevAttrMemoryClockRate
        bus_bits = rt.deviceGetAttribute(37, device_index)      # cudaDevAttrGlobalMemoryBusWidth
        if clock_khz > 0 and bus_bits > 0:
            return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    except Exception:  # noqa: BLE001 - best effort only
        pass
    return None


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    kernel: str
    case: str
    batch: int
    context: int
    fn: Callable[[], object]                       # one launch on preallocated buffers
    outputs: Callable[[], list[torch.Tensor]]      # what the launch writes (copies / views)
    clobber: Callable[[], None]                    # overwrite those outputs (to prove a replay rewrites them)
    sanity: Callable[[], str | None]               # None if the outputs look like real work, else the problem
    nbytes: Callable[[], tuple[int, dict]]         # (minimum bytes, extra facts), after the warm-up
    formula: str
    params: dict = dataclasses.field(default_factory=dict)
    prefix: dict = dataclasses.field(default_factory=dict)   # output index -> index of its count output


def outputs_equal(snap: list[torch.Tensor], now: list[torch.Tensor], prefix: dict) -> bool:
    for i, (a, b) in enumerate(zip(snap, now)):
        if i in prefix:
            cnt = snap[prefix[i]].long()
            mask = torch.arange(a.shape[-1], device=a.device) < cnt[..., None]
            a, b = a[mask], b[mask]
        if a.shape != b.shape or not torch.equal(a, b):
            return False
    return True


def base_row(case: Case) -> dict:
    return dict(kernel=case.kernel, case=case.case, batch=case.batch, context=case.context, status="ok",
                params=case.params, formula=case.formula)


def run_case(case: Case, args, timer: Timer, peak_gbps: float, timed: bool) -> dict | None:
    """Warm up (always: later cases read this one's outputs), then time eagerly and as a graph replay."""
    host = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        case.fn()
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    if not timed:
        return None
    row = base_row(case)
    problems = []
    bad = case.sanity()
    if bad:
        problems.append(bad)
    snap = [t.clone() for t in case.outputs()]
    nbytes, extra = case.nbytes()
    row["bytes"] = int(nbytes)
    row["extra"] = extra
    host_hint = min(host[1:]) if len(host) > 1 else host[0]

    dev_us, host_us, unhidden = timer.run(case.fn, host_hint)
    torch.cuda.synchronize()
    if not outputs_equal(snap, [t.clone() for t in case.outputs()], case.prefix):
        problems.append("eager repeat changed the outputs")
    row["eager_us"] = statistics.median(dev_us)
    row["eager_samples_us"] = [round(t, 2) for t in dev_us]
    row["host_us"] = statistics.median(host_us)
    row["eager_reps_host_not_hidden"] = unhidden
    if timer.hides_host and unhidden > len(host_us) // 4:
        problems.append(f"eager: host call outlasted the sleep in {unhidden}/{len(host_us)} reps")

    row["graph_us"] = None
    if not args.no_graph:
        graph = None
        try:
            # one untimed launch on the capture stream first (the CuPy wrapper of a stream is made outside capture)
            stream = timer.capture_stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                case.fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                case.fn()
            # prove that a replay rewrites the outputs: poison them, replay once, compare with the eager ones
            case.clobber()
            t0 = time.perf_counter()
            graph.replay()
            replay_host = (time.perf_counter() - t0) * 1e6
            torch.cuda.synchronize()
            if not outputs_equal(snap, [t.clone() for t in case.outputs()], case.prefix):
                problems.append("graph replay did not reproduce the eager outputs")
            g_us, g_host, _ = timer.run(graph.replay, max(replay_host, 10.0))
            row["graph_us"] = statistics.median(g_us)
            row["graph_samples_us"] = [round(t, 2) for t in g_us]
            row["graph_host_us"] = statistics.median(g_host)
        except Exception as e:  # noqa: BLE001 - report and go on with eager numbers
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            problems.append(f"graph: {type(e).__name__}: {e}".splitlines()[0][:160])
        finally:
            del graph
    basis = row["graph_us"] if row["graph_us"] is not None else row["eager_us"]
    row["time_basis"] = "graph" if row["graph_us"] is not None else "eager"
    if basis < 1.0:
        problems.append(f"suspiciously short ({basis:.2f} us): did the kernel run?")
    row["gbps"] = nbytes / (basis * 1e-6) / 1e9
    row["pct_peak"] = 100.0 * row["gbps"] / peak_gbps if peak_gbps else None
    row["check"] = "ok" if not problems else "; ".join(problems)
    return row


def progress(i: int, row: dict) -> None:
    tag = f"[{i}] {row['kernel']} ({row['case']}) B={row['batch']} ctx={row['context']}"
    if row["status"] != "ok":
        log(f"{tag}: {row['status']}")
        return
    g = f"{row['graph_us']:.2f}" if row.get("graph_us") is not None else "-"
    pct = f"{row['pct_peak']:.1f}%" if row.get("pct_peak") is not None else "-"
    msg = (f"{tag}: eager {row['eager_us']:.2f} us, graph {g} us, host {row['host_us']:.1f} us, "
           f"{row['bytes'] / 1e6:.3f} MB, {row['gbps']:.1f} GB/s ({pct} of peak)")
    if row["check"] != "ok":
        msg += f"  !! {row['check']}"
    log(msg)


class Config:
    """One (batch, context) pool and the cases timed on it, built in pipeline order."""

    def __init__(self, ck, batch: int, context: int, args, device: torch.device):
        self.ck, self.B, self.L, self.args, self.dev = ck, batch, context, args, device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(args.seed * 1_000_003 + batch * 7919 + context)
        geo = pool_geometry(batch, context)
        self.geo = geo
        self.npr = geo["pages_per_req"]
        B, L, S = batch, context, geo["slots"]
        perm = torch.randperm(geo["total_pages"] - 1, generator=self.gen, device=device) + 1
        self.req_pages = perm[: B * self.npr].view(B, self.npr)                   # physical pages, int64
        self.rows = torch.randperm(geo["rows"], generator=self.gen, device=device)[:B]
        pos = torch.arange(L, device=device)
        self.slot_map = self.req_pages[:, pos // P] * P + pos % P                 # [B, L] int64
        self.r2t = torch.zeros((geo["rows"], geo["max_ctx"]), dtype=torch.int32, device=device)
        self.r2t[self.rows, :L] = self.slot_map.to(torch.int32)
        self.rpi = self.rows.to(torch.int32)
        self.seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
        self.k_cache = torch.randn((S, HK, D), generator=self.gen, device=device, dtype=KV_DTYPE)
        self.v_cache = torch.randn((S, HK, D), generator=self.gen, device=device, dtype=KV_DTYPE)
        self.q = torch.randn((B, HQ, D), generator=self.gen, device=device, dtype=KV_DTYPE)
        self.bounds = torch.zeros((S // P, HK, 2, D), dtype=KV_DTYPE, device=device)
        self.key_int4 = torch.zeros((S, HK, D // 2), dtype=torch.uint8, device=device)
        self.key_sz = torch.zeros((S, HK, D // INT4_GROUP, 2), dtype=torch.float32, device=device)
        # Prefill of every request (SGLang's out_cache_loc order: request by request, by position):
        # fills the Quest bounds and the int4 key copy before anything reads them.
        all_slots = self.slot_map.reshape(-1).to(torch.int32)
        ck.page_bounds_update(self.k_cache, all_slots, self.bounds, P)
        ck.quantize_keys_int4(self.k_cache, all_slots, self.key_int4, self.key_sz)
        del all_slots
        torch.cuda.synchronize()
        self.scores = None
        self.bounds_int8 = self.scores_int8 = None
        self.sel: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- helpers

    def _case(self, kernel, case, fn, outputs, clobber, sanity, nbytes, formula, batch=None, context=None,
              params=None, prefix=None) -> Case:
        return Case(kernel, case, self.B if batch is None else batch, self.L if context is None else context,
                    fn, outputs, clobber, sanity, nbytes, formula, params or {}, prefix or {})

    # -- 1. page bounds

    def page_bounds_decode(self) -> Case:
        ck, B, L = self.ck, self.B, self.L
        written = self.slot_map[:, L - 1].to(torch.int32).contiguous()   # the new token of each request
        pages = written.long() // P
        o = (L - 1) % P

        def sanity():
            b = self.bounds[pages].float()
            if not bool((b[:, :, 0] <= b[:, :, 1]).all()) or not bool((b[:, :, 1] > b[:, :, 0]).any()):
                return "page bounds look empty"
            return None

        return self._case(
            "page_bounds_update", "decode",
            lambda: ck.page_bounds_update(self.k_cache, written, self.bounds, P),
            lambda: [self.bounds[pages]], lambda: self.bounds.index_fill_(0, pages, 0), sanity,
            lambda: (bytes_page_bounds_update(B, B * (o + 1), B), {"tokens_read": B * (o + 1)}),
            "B*4 + B*((L-1)%P+1)*HK*D*2 + B*HK*2*D*2", params={"written_slots": B, "page_offset": o})

    def page_bounds_prefill(self, n: int) -> Case:
        ck = self.ck
        written = self.slot_map[0, :n].to(torch.int32).contiguous()
        pages = torch.unique(written.long() // P)

        def sanity():
            b = self.bounds[pages].float()
            return None if bool((b[:, :, 0] <= b[:, :, 1]).all()) and bool((b[:, :, 1] > b[:, :, 0]).any()) \
                else "page bounds look empty"

        return self._case(
            "page_bounds_update", f"prefill {n} tok",
            lambda: ck.page_bounds_update(self.k_cache, written, self.bounds, P),
            lambda: [self.bounds[pages]], lambda: self.bounds.index_fill_(0, pages, 0), sanity,
            lambda: (bytes_page_bounds_update(n, n, ceil_div(n, P)), {}),
            "N*4 + N*HK*D*2 + ceil(N/P)*HK*2*D*2", batch=1, context=n, params={"written_slots": n})

    # -- 2. Quest scores

    def _scores_case(self, label: str, bounds: torch.Tensor, out: torch.Tensor, sanity_of) -> Case:
        """quest_page_scores of every page from ``bounds`` (bf16 rows, or int8 rows: uint8) into ``out``; the
        case's sanity is ``sanity_of(written)``, written = the columns of the pages present."""
        ck, B = self.ck, self.B
        cols = out.shape[-1]
        int8 = bounds.dtype == torch.uint8
        fn = lambda: ck.quest_page_scores(self.q, bounds, self.r2t, self.rpi, self.seq_lens, P,  # noqa: E731
                                          cols, out=out)
        written = lambda: out[..., :self.npr]  # noqa: E731
        nbytes = bytes_quest_page_scores(B, self.npr, INT8_ROW_BYTES if int8 else 2 * D * BF16)
        formula = f"B*HQ*D*2 + 2*B*4 + B*np*4 + B*HK*np*({'2*D + 8' if int8 else '2*D*2'} + 4)"
        return self._case("quest_page_scores", label, fn, lambda: [written()], lambda: written().fill_(12345.0),
                          lambda: sanity_of(written()), lambda: (nbytes, {"pages_per_request": self.npr}), formula,
                          params={"max_pages": cols})

    def quest_scores(self) -> Case:
        cols = max(self.npr, self.args.score_columns)   # the product's rows are max_pages (capacity) wide
        self.scores = torch.empty((self.B, HK, cols), dtype=torch.float32, device=self.dev)
        return self._scores_case("all pages", self.bounds, self.scores,
                                 lambda w: None if bool(torch.isfinite(w).all()) else "non-finite page scores")

    def quest_scores_int8(self) -> Case:
        """The same scores from int8 bounds rows of the same pages (bounds_dtype int8), into their own buffer."""
        if self.bounds_int8 is None:
            from cupy_kernels.page_bounds import bounds_shape
            self.bounds_int8 = torch.zeros(bounds_shape(self.bounds.shape[0], HK, D, True), dtype=torch.uint8,
                                           device=self.dev)
            self.ck.page_bounds_update(self.k_cache, self.slot_map.reshape(-1).to(torch.int32), self.bounds_int8, P)
        self.scores_int8 = torch.empty_like(self.scores)

        def sanity(written):
            # outward-quantized bounds: every int8 score is at least the bf16 bounds' (up to float32 rounding)
            ref_scores = self.scores[..., :self.npr]
            slack = 1e-4 * ref_scores.abs().amax().item() + 1e-4
            return None if bool((written >= ref_scores - slack).all()) else "int8 scores below the bf16 scores"

        return self._scores_case("int8 all pages", self.bounds_int8, self.scores_int8, sanity)

    # -- 3. top-k

    def _topk_case(self, name: str, topk_fn, k: int, sanity_of, **params) -> tuple[tuple, Case]:
        """A top-k kernel (``topk_fn``, topk_pages's signature) on this case's scores into its own buffers; the
        case's sanity is ``sanity_of(out)``."""
        B = self.B
        out = (torch.empty((B, HK, k), dtype=torch.int32, device=self.dev),
               torch.empty((B, HK), dtype=torch.int32, device=self.dev))
        fn = lambda: topk_fn(self.scores, self.seq_lens, P, k, N_SINK, N_LOCAL, out=out)  # noqa: E731
        return out, self._case(
            name, f"top_k={k}", fn, lambda: list(out), lambda: (out[0].fill_(-5), out[1].fill_(-5)),
            lambda: sanity_of(out), lambda: (bytes_topk_pages(B, self.npr, k), {}),
            "B*4 + B*HK*np*4 + B*HK*(k+1)*4",
            params={"top_k": k, "n_sink": N_SINK, "n_local": N_LOCAL, **params}, prefix={0: 1})

    def topk(self, k: int) -> Case:
        expect = min(k, self.npr)

        def sanity(out):
            sel, cnt = out
            if not bool((cnt == expect).all()):
                return f"num_selected != {expect}"
            s = sel[..., :expect]
            if not bool((s[..., 1:] > s[..., :-1]).all()) or not bool((s[..., 0] == 0).all()) \
                    or not bool((s[..., -1] == self.npr - 1).all()):
                return "selection not ascending / sinks or local page missing"
            return None

        self.sel[k], case = self._topk_case("topk_pages", self.ck.topk_pages, k, sanity)
        return case

    def topk_baseline(self, k: int) -> Case:
        """The previous top-k kernel (topk_pages_radix4, the benchmark baseline) on the same scores, into its own
        buffers; its selection must equal topk_pages's (the case before it in the plan)."""
        from cupy_kernels.topk_pages import topk_pages_radix4

        new_sel, new_cnt = self.sel[k]

        def sanity(out):
            if not torch.equal(out[1], new_cnt):
                return "num_selected differs from topk_pages"
            valid = torch.arange(k, device=new_cnt.device) < new_cnt[..., None]
            return None if torch.equal(out[0][valid], new_sel[valid]) else "selection differs from topk_pages"

        return self._topk_case("topk_pages_radix4", topk_pages_radix4, k, sanity, baseline_of="topk_pages")[1]

    # -- 4. pages -> kv indices

    def pages_to_kv(self, k: int) -> Case:
        ck, B = self.ck, self.B
        sel, cnt = self.sel[k]
        cap = k * P
        out = (torch.empty((B, HK, cap), dtype=torch.int32, device=self.dev),
               torch.empty((B, HK), dtype=torch.int32, device=self.dev))
        self.kv[k] = out
        fn = lambda: ck.pages_to_kv_indices(sel, cnt, self.r2t, self.rpi, self.seq_lens, P, cap,  # noqa: E731
                                            out=out)

        def sanity():
            n = out[1]
            if not bool((n > 0).all()):
                return "empty kv index lists"
            return None

        def nbytes():
            n_kv = int(out[1].long().sum())
            # distinct (request, page) pairs over the KV heads: their req_to_token entries are read once
            mask = torch.zeros((B, self.npr), dtype=torch.bool, device=self.dev)
            valid = torch.arange(k, device=self.dev) < cnt[..., None]
            b_idx = torch.arange(B, device=self.dev)[:, None, None].expand(B, HK, k)
            mask[b_idx[valid], sel[valid].long()] = True
            full = int(mask.sum())
            r2t_entries = full * P - int(mask[:, -1].sum()) * (self.npr * P - self.L)
            return (bytes_pages_to_kv_indices(B, k, n_kv, r2t_entries),
                    {"kv_indices_written": n_kv, "distinct_pages": full})

        return self._case(
            "pages_to_kv_indices", f"top_k={k}", fn, lambda: list(out),
            lambda: (out[0].fill_(-5), out[1].fill_(-5)), sanity, nbytes,
            "B*HK*(k+1)*4 + 2*B*4 + distinct_pages*P*4 + n_kv*4 + B*HK*4",
            params={"top_k": k, "capacity": cap}, prefix={0: 1})

    # -- 4b. fixed-capacity rows -> FlashInfer CSR

    def compact(self, src: str) -> Case:
        ck, dev = self.ck, self.dev
        rows, cnt = self.kept if src == "top_p" else self.kv[int(src.split("=")[1])]
        R, cap = rows.shape[0] * rows.shape[1], rows.shape[-1]
        total = int(cnt.long().sum())
        out = (torch.empty(R + 1, dtype=torch.int32, device=dev), torch.empty(R * cap, dtype=torch.int32, device=dev))
        fn = lambda: ck.compact_kv_rows(rows, cnt, out=out)  # noqa: E731

        def sanity():
            indptr, flat = out
            if int(indptr[-1]) != total or not bool((flat[:total] >= 0).all()):
                return "CSR does not hold every valid entry"
            return None

        return self._case(
            "compact_kv_rows", "top-p kept rows" if src == "top_p" else f"kv rows {src}", fn,
            lambda: [out[0], out[1][:total]], lambda: (out[0].fill_(-5), out[1].fill_(-5)), sanity,
            lambda: (bytes_compact_kv_rows(R, total), {"valid_entries": total, "rows": R, "capacity": cap}),
            "R*4 + 2*n_valid*4 + (R+1)*4", params={"rows": R, "capacity": cap})

    # -- 5. int4 keys

    def quantize(self, n: int | None = None) -> Case:
        ck = self.ck
        if n is None:
            written = self.slot_map[:, self.L - 1].to(torch.int32).contiguous()
            label, batch, ctx = "decode", None, None
        else:
            written = self.slot_map[0, :n].to(torch.int32).contiguous()
            label, batch, ctx = f"prefill {n} tok", 1, n
        idx = written.long()
        ntok = written.numel()
        fn = lambda: ck.quantize_keys_int4(self.k_cache, written, self.key_int4, self.key_sz)  # noqa: E731

        def clobber():
            self.key_int4.index_fill_(0, idx, 0)
            self.key_sz.index_fill_(0, idx, 0)

        def sanity():
            return None if bool((self.key_sz[idx][..., 0] > 0).all()) else "zero int4 scales"

        return self._case(
            "quantize_keys_int4", label, fn, lambda: [self.key_int4[idx], self.key_sz[idx]], clobber, sanity,
            lambda: (bytes_quantize_keys_int4(ntok), {}),
            "N*(4 + HK*D*2) + N*HK*(D/2 + (D/group)*2*4)", batch=batch, context=ctx,
            params={"tokens": ntok, "group_size": INT4_GROUP})

    # -- 6. int4 candidate scores

    def int4_scores(self) -> Case:
        ck, B, dev = self.ck, self.B, self.dev
        full_pages = self.L // P
        cand_pages = min(self.args.candidate_tokens // P, full_pages)
        C = cand_pages * P
        # the tokens of cand_pages random full pages per (request, KV head), ascending, as kv indices
        keys = torch.rand((B, HK, full_pages), generator=self.gen, device=dev)
        pages = keys.argsort(-1)[..., :cand_pages].sort(-1).values                       # [B, HK, cp]
        del keys
        pos = (pages[..., None] * P + torch.arange(P, device=dev)).reshape(B, HK, C)
        slots = torch.gather(self.slot_map[:, None, :].expand(B, HK, self.L), 2, pos)
        self.cand = (slots * HK + torch.arange(HK, device=dev)[None, :, None]).to(torch.int32).contiguous()
        del pos, slots, pages
        self.n_cand = torch.full((B, HK), C, dtype=torch.int32, device=dev)
        self.logits = torch.empty((B, HK, G, C), dtype=torch.float32, device=dev)
        self.probs = torch.empty((B, HK, C), dtype=torch.float32, device=dev)
        out = (self.logits, self.probs)
        fn = lambda: ck.int4_candidate_scores(self.q, self.key_int4, self.key_sz, self.cand,  # noqa: E731
                                              self.n_cand, SM_SCALE, out=out)

        def sanity():
            s = self.probs.double().sum(-1)
            if not bool(torch.isfinite(self.logits).all()) or not bool(((s - 1).abs() < 1e-3).all()):
                return "int4 probabilities do not sum to 1"
            return None

        def clobber():
            self.logits.fill_(-7.0)
            self.probs.fill_(-7.0)

        return self._case(
            "int4_candidate_scores", f"C={C}", fn, lambda: [self.logits, self.probs], clobber, sanity,
            lambda: (bytes_int4_candidate_scores(B, B * HK * C), {"candidates_per_row": C}),
            "B*HQ*D*2 + B*HK*4 + n_cand*(4 + D/2 + (D/group)*8 + G*4 + 4)",
            params={"candidates": C, "candidate_pages": cand_pages, "sm_scale": SM_SCALE})

    # -- 7. top-p

    def top_p(self) -> Case:
        ck, B, dev = self.ck, self.B, self.dev
        C = self.probs.shape[-1]
        out = (torch.empty((B, HK, C), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
        self.kept = out
        fn = lambda: ck.top_p_select(self.probs, self.n_cand, TOP_P, candidate_ids=self.cand, out=out)  # noqa: E731

        def sanity():
            n = out[1]
            return None if bool(((n > 0) & (n <= C)).all()) else "top-p kept nothing (or too much)"

        def nbytes():
            kept = int(out[1].long().sum())
            return (bytes_top_p_select(B, B * HK * C, kept),
                    {"kept_total": kept, "kept_fraction": kept / (B * HK * C)})

        return self._case(
            "top_p_select", f"C={C} p={TOP_P}", fn, lambda: list(out),
            lambda: (out[0].fill_(-5), out[1].fill_(-5)), sanity, nbytes,
            "B*HK*4 + n_cand*4 + kept*(4 id + 4 out) + B*HK*4",
            params={"top_p": TOP_P, "candidates": C, "candidate_ids": True}, prefix={0: 1})

    # -- 8. vAttention sample

    def vattention(self) -> Case:
        ck, B, dev, L = self.ck, self.B, self.dev, self.L
        k = VATTN_DET_TOKENS // P
        cap_det = k * P
        sel = (torch.empty((B, HK, k), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
        ck.topk_pages(self.scores, self.seq_lens, P, k, N_SINK, N_LOCAL, out=sel)
        kv_det = ck.pages_to_kv_indices(sel[0], sel[1], self.r2t, self.rpi, self.seq_lens, P, cap_det)
        # o_det and lse_det: exact attention over the deterministic tokens (torch, float32).
        n_det = kv_det[1]
        valid = torch.arange(cap_det, device=dev) < n_det[..., None]                     # [B, HK, T]
        rows = torch.where(valid, kv_det[0], 0).long()
        k_rows = self.k_cache.view(-1, D)[rows].float()                                  # [B, HK, T, D]
        qg = self.q.float().view(B, HK, G, D)
        lg = torch.einsum("bhgd,bhtd->bhgt", qg, k_rows) * SM_SCALE
        del k_rows
        lg = lg.masked_fill(~valid[:, :, None, :], float("-inf"))
        lse = torch.logsumexp(lg, -1)                                                     # natural log
        pr = torch.softmax(lg, -1)
        del lg
        v_rows = self.v_cache.view(-1, D)[rows].float()
        o = torch.einsum("bhgt,bhtd->bhgd", pr, v_rows)
        del v_rows, pr, rows, valid
        self.lse_det = (lse / math.log(2.0)).reshape(B, HQ).contiguous()                  # base 2
        self.o_det = o.reshape(B, HQ, D).to(KV_DTYPE).contiguous()
        seeds = torch.arange(B, dtype=torch.int64, device=dev) * 1_000_003 + 12345
        cap = self.args.vattn_capacity
        out = (torch.empty((B, HK, cap), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev),
               torch.empty((B, HK), dtype=torch.float32, device=dev),
               torch.empty((B, HK), dtype=torch.int32, device=dev))
        p = VATTN
        fn = lambda: ck.vattention_sample(  # noqa: E731
            self.q, self.k_cache, self.v_cache, sel[0], sel[1], self.r2t, self.rpi, self.seq_lens, seeds,
            self.lse_det, self.o_det, P, SM_SCALE, p["epsilon"], p["delta"], p["base_rate"], cap, out=out)

        def sanity():
            n, w = out[1], out[2]
            if not bool((n > 0).all()) or not bool((torch.isfinite(w) & (w > 0)).all()):
                return "vAttention drew no sample"
            return None

        def nbytes():
            n_s = (L - n_det.long()).flatten().tolist()
            n_take = out[1].long().flatten().tolist()
            nb = [vattn_n_base(x, p["base_rate"], cap) for x in n_s]
            draws = [max(a, t) for a, t in zip(nb, n_take)]
            req = out[3].long().flatten().tolist()
            extra = {"residual_tokens_mean": statistics.mean(n_s), "n_base_mean": statistics.mean(nb),
                     "num_sampled_mean": statistics.mean(n_take), "required_median": statistics.median(req),
                     "weight_mean": float(out[2].double().mean())}
            return bytes_vattention_sample(B, k, sum(nb), sum(draws), sum(n_take)), extra

        def clobber():
            for t in out:
                t.fill_(-5)

        return self._case(
            "vattention_sample", f"det={k}p cap={cap}", fn, lambda: list(out), clobber, sanity, nbytes,
            "B*HK*(k+1)*4 + 2*B*4 + B*8 + 2*B*HQ*D*2 + B*HQ*4 + n_base*2*D*2 + draws*4 + n_take*4 + B*HK*12",
            params={"det_pages": k, "capacity": cap, **p, "lse_det": "exact over the deterministic tokens"},
            prefix={0: 1})


def case_plan(args, batch: int, context: int, n_prefill: int, with_compact: bool = True) -> list[dict]:
    """The cases of one (batch, context), in pipeline order: kernel, label, batch/context of the row, the
    Config method that builds it (and its argument) and the cases whose outputs it reads."""
    c = min(args.candidate_tokens // P, context // P) * P
    k_det = VATTN_DET_TOKENS // P

    def item(kernel, label, method, arg=None, needs=(), b=batch, ctx=context):
        return dict(kernel=kernel, label=label, method=method, arg=arg, needs=needs, batch=b, context=ctx)

    plan = [item("page_bounds_update", "decode", "page_bounds_decode")]
    if n_prefill > 0:
        plan.append(item("page_bounds_update", f"prefill {n_prefill} tok", "page_bounds_prefill", n_prefill,
                         b=1, ctx=n_prefill))
    plan.append(item("quest_page_scores", "all pages", "quest_scores"))
    plan.append(item("quest_page_scores", "int8 all pages", "quest_scores_int8",
                     needs=("quest_page_scores/all pages",)))
    plan += [item("topk_pages", f"top_k={k}", "topk", k, needs=("quest_page_scores/all pages",))
             for k in args.topk]
    if "topk_pages_radix4" in args.kernels:   # the baseline runs only when timed (nothing reads its output)
        plan += [item("topk_pages_radix4", f"top_k={k}", "topk_baseline", k, needs=(f"topk_pages/top_k={k}",))
                 for k in args.topk]
    plan += [item("pages_to_kv_indices", f"top_k={k}", "pages_to_kv", k, needs=(f"topk_pages/top_k={k}",))
             for k in args.topk]
    if with_compact:
        plan += [item("compact_kv_rows", f"kv rows top_k={k}", "compact", f"top_k={k}",
                      needs=(f"pages_to_kv_indices/top_k={k}",)) for k in args.topk]
    plan.append(item("quantize_keys_int4", "decode", "quantize"))
    if n_prefill > 0:
        plan.append(item("quantize_keys_int4", f"prefill {n_prefill} tok", "quantize", n_prefill,
                         b=1, ctx=n_prefill))
    plan += [item("int4_candidate_scores", f"C={c}", "int4_scores"),
             item("top_p_select", f"C={c} p={TOP_P}", "top_p", needs=(f"int4_candidate_scores/C={c}",))]
    if with_compact:
        plan.append(item("compact_kv_rows", "top-p kept rows", "compact", "top_p",
                         needs=(f"top_p_select/C={c} p={TOP_P}",)))
    plan.append(item("vattention_sample", f"det={k_det}p cap={args.vattn_capacity}", "vattention",
                     needs=("quest_page_scores/all pages",)))
    return plan


def run_config(ck, batch: int, context: int, args, device, timer, peak_gbps, prefill_n: int,
               counter: list[int]) -> tuple[list[dict], bool]:
    """All cases of one (batch, context); returns the rows and whether the prefill rows ran."""
    timed = set(args.kernels)
    n_pf = min(prefill_n, context)
    plan = case_plan(args, batch, context, n_pf, with_compact=hasattr(ck, "compact_kv_rows"))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        counter[0] += 1
        progress(counter[0], row)
        rows.append(row)

    def skip_all(status: str) -> tuple[list[dict], bool]:
        for it in plan:
            if it["kernel"] in timed:
                emit(dict(kernel=it["kernel"], case=it["label"], batch=it["batch"], context=it["context"],
                          status=status))
        return rows, False

    need = estimate_case_memory(batch, context, tuple(args.topk), args.candidate_tokens, args.vattn_capacity,
                                VATTN_DET_TOKENS)
    free, _total = torch.cuda.mem_get_info(device)
    if need > free:
        return skip_all(f"skipped: does not fit (needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free)")
    t0 = time.perf_counter()
    try:
        cfg = Config(ck, batch, context, args, device)
    except Exception as e:  # noqa: BLE001 - OOM, or a prefill kernel failing
        gc.collect()
        torch.cuda.empty_cache()
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return skip_all("skipped: out of GPU memory building the pool")
        return skip_all(f"error in pool set-up: {type(e).__name__}: {e}".splitlines()[0][:200])
    log(f"-- B={batch} context={context}: pool of {cfg.geo['slots']} slots "
        f"({2 * cfg.geo['slots'] * HK * D * BF16 / GiB:.2f} GiB K+V) built and prefilled in "
        f"{time.perf_counter() - t0:.1f} s")
    failed: set[str] = set()
    for it in plan:
        key = f"{it['kernel']}/{it['label']}"
        row = None
        missing = [n for n in it["needs"] if n in failed]
        if missing:
            failed.add(key)
            row = dict(kernel=it["kernel"], case=it["label"], batch=it["batch"], context=it["context"],
                       status=f"skipped: needs {missing[0]}, which failed")
        else:
            try:
                method = getattr(cfg, it["method"])
                case = method() if it["arg"] is None else method(it["arg"])
                row = run_case(case, args, timer, peak_gbps, it["kernel"] in timed)
            except Exception as e:  # noqa: BLE001 - keep going with the other kernels
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
                failed.add(key)
                msg = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    msg = "skipped: out of GPU memory"
                row = dict(kernel=it["kernel"], case=it["label"], batch=it["batch"], context=it["context"],
                           status=msg)
        if row is not None and it["kernel"] in timed:
            emit(row)
    del cfg
    gc.collect()
    torch.cuda.empty_cache()
    return rows, n_pf > 0


# ----------------------------------------------------------------------------- main


def no_gpu_message() -> str:
    return (f"bench_kernels: no CUDA GPU is visible (torch {torch.__version__}, torch.cuda.is_available() is "
            f"False). This benchmark times CUDA kernels and needs an NVIDIA GPU, CuPy and a CUDA build of "
            f"torch; run it on the GPU host. `python launch/bench_kernels.py --dry-run` prints the cases and "
            f"their byte model without a GPU.")


def write_json(path: pathlib.Path, meta: dict, rows: list[dict], done: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(meta, complete=done, written=datetime.datetime.now().isoformat(timespec="seconds"), rows=rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        log(no_gpu_message())
        return 2
    try:
        import cupy
    except ImportError as e:
        log(f"bench_kernels: CuPy is not importable ({e}); install cupy-cuda12x or cupy-cuda13x to match the "
            f"CUDA driver.")
        return 2
    import cupy_kernels as ck

    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    gpu = torch.cuda.get_device_name(device)
    out_path = pathlib.Path(args.out)
    log(f"bench_kernels: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), CuPy {cupy.__version__}; "
        f"contexts {args.contexts}, batches {args.batches}, reps {args.reps}")

    peak = measure_peak(device, args.peak_gib)
    spec = spec_peak_gbps(device.index or 0)
    log(f"HBM peak (copy of {peak['copy_bytes'] / GiB:.2f} GiB, read + written): {peak['gbps']:.1f} GB/s"
        + (f"; datasheet {spec:.0f} GB/s" if spec else ""))
    timer = Timer(device, args.reps, args.flush_mib)
    if not timer.hides_host:
        log("warning: torch.cuda._sleep is missing: eager/graph times include host launch overhead")
    floor = measure_floor(device, timer)
    floor_txt = (f"timing floor (a 1-element torch add timed the same way): eager {floor['eager_us']:.2f} us, "
                 f"graph {fmt_num(floor['graph_us'], 2)} us")
    log(floor_txt)

    from bench_e2e import git_commit           # launch/ is on the path: this file runs as a script

    meta = dict(
        gpu=gpu, device_index=device.index, sm_count=props.multi_processor_count,
        total_memory_gib=props.total_memory / GiB, l2_bytes=getattr(props, "L2_cache_size", None),
        peak_gbps=peak["gbps"], peak=peak, spec_peak_gbps=spec, timing_floor=floor,
        torch=torch.__version__, torch_cuda=torch.version.cuda, cupy=cupy.__version__,
        python=platform.python_version(), host=platform.node(), commit=git_commit(),
        shape=dict(q_heads=HQ, kv_heads=HK, head_dim=D, page_size=P, dtype=str(KV_DTYPE), int4_group=INT4_GROUP,
                   sm_scale=SM_SCALE),
        timing=dict(reps=args.reps, warmup=args.warmup, l2_flush_mib=args.flush_mib,
                    host_overhead_hidden=timer.hides_host, statistic="median",
                    gbps_basis="graph replay time (eager where no graph)"),
        args={k: v for k, v in vars(args).items()},
        started=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    rows: list[dict] = []
    counter = [0]
    prefill_n = args.prefill_tokens
    for ctx in args.contexts:
        for b in args.batches:
            new_rows, did_prefill = run_config(ck, b, ctx, args, device, timer, peak["gbps"], prefill_n, counter)
            rows += new_rows
            if did_prefill:
                prefill_n = 0
            write_json(out_path, meta, rows, done=False)
    write_json(out_path, meta, rows, done=True)

    print(f"GPU: {gpu} ({props.multi_processor_count} SMs, {props.total_memory / GiB:.0f} GiB); torch "
          f"{torch.__version__}, CuPy {cupy.__version__}")
    print(f"HBM peak: {peak['gbps']:.1f} GB/s measured (copy of {peak['copy_bytes'] / GiB:.2f} GiB, read + "
          f"written, median of {len(peak['samples_us'])})" + (f"; datasheet {spec:.0f} GB/s" if spec else ""))
    print(f"L2 {'flushed' if args.flush_mib else 'NOT flushed'} before each launch; {floor_txt}")
    print(format_table(rows, peak["gbps"]))
    print(f"JSON: {out_path}")
    bad = [r for r in rows if r["status"].startswith("error") or r.get("check", "ok") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
