#!/usr/bin/env python3
"""Soak under faults: real SGLang servers (Qwen2.5-Coder-0.5B) driven at full concurrency by a traffic mix a service
sees, then checked for lost tokens, wrong answers, crashes and memory growth.

For each config (``dense``: FlashInfer, page 16; a preset: ``--attention-backend sgl_sparse`` with the preset made
into ``<out>_logs/soak_<preset>.yaml`` with ``min_context: 0`` and a ``token_budget`` of at least the longest probe
+ its new tokens), one server with a small KV pool (``--max-total-tokens``, default 65536 tokens: SGLang must retract
decoding requests; ``--schedule-policy fcfs`` so that a long prompt waits its turn instead of being starved by
radix-cache hits) gets ``--clients`` concurrent clients for ``--warmup`` + ``--duration`` seconds. Each request,
seeded by its index:

- prompt of 100..30000 tokens (log-uniform, random token ids); half start with one of 8 shared prefixes of 1K..16K
  tokens (radix-cache hits; beside the running requests they do not all fit the pool, so the cache also evicts),
  8..256 new tokens, greedy with ``ignore_eos``;
- ~10 % opt out of sparsity (``custom_params={"sparse": false}``); ~10 % stream and hang up mid-stream (after k
  chunks, k = 0 meaning before the first token); half of the others stream;
- ~3 % invalid (not streamed): a non-bool ``custom_params["sparse"]`` or a prompt longer than the model's context.
  Each must be answered with HTTP 400 and a message.

Before and after the load, a fixed probe set (prompts of repeated random blocks, 128..1792 tokens, 32 greedy tokens,
all within the budget) must give the dense server's greedy tokens; a token may differ only where the dense top-2
log-probs are within a bf16 near-tie (0.25 nats, as tests/test_server_gpu.py). The dense reference comes from the
run's own dense server (run first), from ``--probe-reference`` (an earlier result file), or from a short dense server
started for it. When the load is over and the server idle, ``/v1/loads`` must report no used KV tokens (available
+ radix-evictable = the whole pool; the radix cache is *not* flushed, a flush resets the allocator and would hide a
leak) and SGLang's own idle check (strict by default: a leak kills the scheduler) must have logged nothing.

    python launch/soak.py                                   # dense, quest, quest-fast, twilight, vattention
    python launch/soak.py --configs quest --probe-reference launch/results/soak_h200.json --out out/soak_quest.json
    python launch/soak.py --dry-run                         # the mix, the server commands, flags checked by SGLang
    python launch/soak.py --combine out/soak_dense.json out/soak_quest.json --out launch/results/soak_h200.json

Model: ``--model-dir``, else ``$GPU_HOST_MODELS/qwen05b``. Writes ``--out`` (rewritten after each config) with per
config ``duration_s``, ``requests``, ``completed``, ``aborted`` (client hang-ups), ``rejected`` (invalid requests
answered 400), ``server_errors`` (5xx, server-side abort, connection failure or time-out), ``unexpected`` (any other
answer), ``leaked_tokens``, ``probe_mismatches``, GPU memory (nvidia-smi, MiB) at ready, after the warm-up (start) and
after the load (end), retractions, and ``checks``/``passed``; server logs in ``<out>_logs/``. Per config: start-up
~1-4 min (FlashInfer JIT on a fresh host), warm-up + duration, ~1 min of probes and idle checks.

The memory figures are the server's own processes' (``gpu_memory_scope``: ``server processes``) where nvidia-smi
lists them, so several soaks can share one GPU (one config per process, each with a small
``--mem-fraction-static``, then ``--combine``); where it does not (a container whose pids it does not see), they are
the whole GPU's (``whole GPU``), which is the server's own only when it runs there alone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

from bench_e2e import (BenchError, check_flags, git_commit, gpu_name, post_json, server_commands,  # noqa: E402
                       versions)
from sgl_sparse.config import SparseConfig, presets  # noqa: E402
from sgl_sparse.serving import ServerError, ServerProcess, stop_servers_on_sigterm  # noqa: E402

DEFAULT_CONFIGS = ["dense", "quest", "quest-fast", "twilight", "vattention"]
PAGE_SIZE = SparseConfig.load("dense").page_size
NEAR_TIE, FP32_SLACK = 0.25, 1e-4          # a bf16 near-tie of the top-2 logits (see tests/test_server_gpu.py)
INVALID = {"sparse_string": {"sparse": "no"}, "sparse_int": {"sparse": 1}, "too_long": None}
CATEGORIES = ("completed", "aborted", "rejected", "server_errors", "unexpected")
RETRACT = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")
IDLE_CHECK = re.compile(r"memory leak detected|KV double free|use-after-free")
# SGLang's decode log line (every --decode-log-interval batches): whether the batch ran from a CUDA graph, and the
# generation throughput
DECODE_LOG = re.compile(r"Decode batch.*?cuda graph: (True|False), gen throughput \(token/s\): ([\d.]+)")


JSON_HEADERS = {"Content-Type": "application/json"}
try:                                            # the client parses every streamed chunk: orjson keeps it light
    from orjson import dumps, loads
except ImportError:                             # pragma: no cover
    loads = json.loads

    def dumps(obj) -> bytes:
        return json.dumps(obj).encode()


class SoakError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Mix:
    """The traffic: every request is a pure function of (mix, index)."""
    context_len: int = 32768
    min_prompt: int = 100
    max_prompt: int = 30000
    min_new: int = 8
    max_new: int = 256
    prefixes: int = 8
    prefix_min: int = 1024
    prefix_max: int = 16384
    shared_fraction: float = 0.5
    opt_out_fraction: float = 0.1
    disconnect_fraction: float = 0.1
    stream_fraction: float = 0.5
    invalid_fraction: float = 0.03
    token_low: int = 100                    # random prompt ids in [token_low, token_high): regular Qwen2.5 tokens
    token_high: int = 150000
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Spec:
    index: int
    prompt_len: int
    new_tokens: int
    stream: bool = False
    prefix: int = -1                        # shared prefix used, -1 none
    opt_out: bool = False
    disconnect_after: int | None = None     # chunks read before hanging up; None: read to the end
    invalid: str | None = None              # a key of INVALID


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def request_spec(mix: Mix, index: int) -> Spec:
    rng = random.Random(f"{mix.seed}/spec/{index}")
    if rng.random() < mix.invalid_fraction:
        kind = rng.choice(sorted(INVALID))
        short = log_uniform(rng, mix.min_prompt, mix.context_len // 4)
        return Spec(index, mix.context_len + 64 if kind == "too_long" else short, mix.min_new, invalid=kind)
    prompt_len = log_uniform(rng, mix.min_prompt, mix.max_prompt)
    new_tokens = log_uniform(rng, max(mix.min_new, 2), mix.max_new)
    prefix = rng.randrange(mix.prefixes) if mix.prefixes and rng.random() < mix.shared_fraction else -1
    opt_out = rng.random() < mix.opt_out_fraction
    disconnect_after = rng.randint(0, new_tokens // 2) if rng.random() < mix.disconnect_fraction else None
    stream = disconnect_after is not None or rng.random() < mix.stream_fraction
    return Spec(index, prompt_len, new_tokens, stream, prefix, opt_out, disconnect_after)


def random_ids(mix: Mix, n: int, *key: int) -> list[int]:
    """``n`` token ids drawn from a generator seeded by (mix seed, *key) (numpy: ~1 ms for 30K ids)."""
    import numpy as np

    return np.random.default_rng([mix.seed, *key]).integers(mix.token_low, mix.token_high, n).tolist()


def shared_prefixes(mix: Mix) -> list[list[int]]:
    rng = random.Random(f"{mix.seed}/prefixes")
    return [random_ids(mix, log_uniform(rng, mix.prefix_min, mix.prefix_max), 1, k) for k in range(mix.prefixes)]


def prompt_ids(mix: Mix, spec: Spec, prefixes: list[list[int]]) -> list[int]:
    """The spec's prompt: its shared prefix (cut to leave at least one token of its own), then random ids."""
    head = prefixes[spec.prefix][:spec.prompt_len - 1] if spec.prefix >= 0 else []
    return head + random_ids(mix, spec.prompt_len - len(head), 2, spec.index)


def request_body(spec: Spec, ids: list[int]) -> dict:
    params = {"temperature": 0.0, "max_new_tokens": spec.new_tokens, "ignore_eos": True}
    if spec.opt_out:
        params["custom_params"] = {"sparse": False}
    if spec.invalid is not None and INVALID[spec.invalid] is not None:
        params["custom_params"] = INVALID[spec.invalid]
    return {"input_ids": ids, "sampling_params": params, "stream": spec.stream}


def error_message(text: str) -> str | None:
    """The message of an error answer (SGLang: ``{"error": {"message": ...}}`` or FastAPI's ``{"detail": ...}``)."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500] or None
    if isinstance(data, dict):
        err = data.get("error")
        message = err.get("message") if isinstance(err, dict) else err or data.get("detail")
        return str(message)[:500] if message else None
    return None


async def send(session, url: str, spec: Spec, body: dict) -> dict:
    """One request; what came back (HTTP status, finish reason, tokens, message, hang-up, exception)."""
    import aiohttp

    out = dict(index=spec.index, invalid=spec.invalid, opt_out=spec.opt_out, expected=spec.new_tokens,
               status=None, finish=None, finish_status=None, tokens=None, message=None, error_code=None,
               disconnected=False, error=None)
    start = time.perf_counter()
    try:
        async with session.post(url + "/generate", data=dumps(body), headers=JSON_HEADERS) as resp:
            out["status"] = resp.status
            if resp.status != 200 or not spec.stream:
                text = await resp.text()
                if resp.status != 200:
                    out["message"] = error_message(text)
                else:
                    note_meta(out, loads(text).get("meta_info") or {})
            elif spec.disconnect_after == 0:
                resp.close()
                out["disconnected"] = True
            else:
                await read_stream(resp, spec, out)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    out["seconds"] = time.perf_counter() - start
    return out


async def read_stream(resp, spec: Spec, out: dict) -> None:
    chunks = 0
    async for line in resp.content:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        data = loads(payload)
        if "error" in data:                     # an error after the 200 header (SGLang streams it as an event)
            out["message"], out["error_code"] = data["error"].get("message"), data["error"].get("code", 500)
            continue
        note_meta(out, data.get("meta_info") or {})
        chunks += 1
        if spec.disconnect_after is not None and chunks >= spec.disconnect_after and out["finish"] is None:
            resp.close()
            out["disconnected"] = True
            break


def note_meta(out: dict, meta: dict) -> None:
    out["tokens"] = meta.get("completion_tokens", out["tokens"])
    finish = meta.get("finish_reason")
    if isinstance(finish, dict):
        out["finish"], out["finish_status"] = finish.get("type"), finish.get("status_code")
        out["message"] = finish.get("message") or out["message"]


def classify(o: dict) -> str:
    """completed / aborted (we hung up) / rejected (invalid request, 400 with a message) / server_errors (5xx,
    server-side abort, connection failure, time-out) / unexpected (anything else)."""
    codes = [c for c in (o["status"], o["finish_status"], o["error_code"]) if isinstance(c, int)]
    if (o["error"] and not o["disconnected"]) or any(c >= 500 for c in codes) or \
            (o["finish"] == "abort" and not o["invalid"] and not any(400 <= c < 500 for c in codes)):
        return "server_errors"
    if o["invalid"] is not None:
        return "rejected" if o["status"] == 400 and o["message"] else "unexpected"
    if o["disconnected"]:
        return "aborted"
    if o["status"] == 200 and o["finish"] == "length" and o["tokens"] == o["expected"] and not o["error_code"]:
        return "completed"
    return "unexpected"


def tally(outcomes: list[dict]) -> dict:
    counts = dict.fromkeys(CATEGORIES, 0)
    examples: dict[str, list] = {}
    for o in outcomes:
        category = classify(o)
        counts[category] += 1
        if category in ("server_errors", "unexpected") and len(examples.setdefault(category, [])) < 5:
            examples[category].append({k: v for k, v in o.items() if v not in (None, False)})
    invalid = [o for o in outcomes if o["invalid"] is not None]
    done = [o for o in outcomes if classify(o) == "completed"]
    seconds = sorted(o["seconds"] for o in done if o.get("seconds") is not None)
    return dict(requests=len(outcomes), **counts, invalid_sent=len(invalid),
                invalid_rejected=sum(classify(o) == "rejected" for o in invalid),
                opt_out_sent=sum(o["opt_out"] for o in outcomes),
                opt_out_completed=sum(o["opt_out"] and classify(o) == "completed" for o in outcomes),
                output_tokens=sum(o["tokens"] or 0 for o in done),
                latency_p50_s=seconds[len(seconds) // 2] if seconds else None,
                latency_p99_s=seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))] if seconds else None,
                examples=examples)


async def drive(url: str, mix: Mix, prefixes, first_index: int, seconds: float, clients: int, timeout: float,
                alive=lambda: True) -> tuple[list[dict], int]:
    """``clients`` concurrent clients sending the mix from ``first_index`` until ``seconds`` have passed (requests
    in flight then run to their end) or the server is no longer ``alive()``; the outcomes and the next index."""
    import aiohttp

    loop, outcomes, counter = asyncio.get_running_loop(), [], itertools.count(first_index)
    deadline = loop.time() + seconds

    async def client(session):
        while loop.time() < deadline and alive():
            spec = request_spec(mix, next(counter))
            outcomes.append(await send(session, url, spec, request_body(spec, prompt_ids(mix, spec, prefixes))))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), read_bufsize=1 << 20,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return sorted(outcomes, key=lambda o: o["index"]), next(counter)


def get_json(url: str, timeout: float = 30):
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def idle_load(url: str, timeout: float = 180.0, settle: int = 3) -> dict:
    """Once no request runs or waits (``settle`` polls in a row, 0.5 s apart): the pool figures of ``/v1/loads``
    summed over DP ranks. ``num_used_tokens`` = pool - available - radix-evictable: tokens nobody gave back."""
    deadline, quiet = time.time() + timeout, 0
    while time.time() < deadline:
        loads = get_json(url + "/v1/loads")["loads"]
        quiet = quiet + 1 if all(l["num_running_reqs"] == 0 and l["num_waiting_reqs"] == 0 for l in loads) else 0
        if quiet >= settle:
            return {k: sum(l.get(k, 0) for l in loads) for k in
                    ("num_used_tokens", "max_total_num_tokens", "num_running_reqs", "num_waiting_reqs")}
        time.sleep(0.5)
    raise SoakError(f"server not idle after {timeout:.0f} s")


def probe_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    """A random 48-token block repeated to each length: the model continues it confidently, over all its context."""
    rng = random.Random(f"{seed}/probes")
    blocks = [[rng.randrange(1000, 100000) for _ in range(48)] for _ in lengths]
    return [(block * (n // len(block) + 1))[:n] for block, n in zip(blocks, lengths)]


def run_probes(url: str, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Greedy tokens of each probe with the top-2 log-prob gap at each (one batch, fixed length)."""
    body = {"input_ids": prompts, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    answers = post_json(url + "/generate", body, timeout=600)
    return [dict(ids=[t[1] for t in a["meta_info"]["output_token_logprobs"]],
                 gaps=[top[0][0] - top[1][0] for top in a["meta_info"]["output_top_logprobs"]]) for a in answers]


def compare_greedy(reference: dict, ids: list[int]) -> str:
    """``exact``; ``near_tie`` (first differs where the reference's top-2 are within a bf16 near-tie); else
    ``mismatch``."""
    for j, (want, got) in enumerate(zip(reference["ids"], ids)):
        if want != got:
            return "near_tie" if reference["gaps"][j] <= NEAR_TIE + FP32_SLACK else "mismatch"
    return "exact" if len(ids) == len(reference["ids"]) else "mismatch"


def probe_counts(reference: list[dict], outputs: list[dict]) -> dict:
    verdicts = [compare_greedy(r, o["ids"]) for r, o in zip(reference, outputs)]
    verdicts += ["mismatch"] * abs(len(reference) - len(outputs))
    return dict(mismatches=verdicts.count("mismatch"), near_ties=verdicts.count("near_tie"), verdicts=verdicts)


def judge_probes(row: dict, reference: list[dict]) -> dict:
    """A row's probe figures against the dense ``reference``, from its probe outputs before and after the load."""
    counts = [probe_counts(reference, row[k]) for k in ("probe_outputs_before", "probe_outputs_after")]
    return dict(probe_mismatches=sum(c["mismatches"] for c in counts),
                probe_near_ties=sum(c["near_ties"] for c in counts), probe_verdicts=[c["verdicts"] for c in counts])


def log_counts(text: str) -> dict:
    retractions = [int(n) for n in RETRACT.findall(text)]
    decode = DECODE_LOG.findall(text)
    return dict(retractions=len(retractions), retracted_reqs=sum(retractions),
                idle_check_warnings=len(IDLE_CHECK.findall(text)), tracebacks=text.count("Traceback"),
                decode_logs=len(decode),
                decode_graph_share=sum(g == "True" for g, _ in decode) / len(decode) if decode else None,
                decode_tokens_per_s=sum(float(t) for _, t in decode) / len(decode) if decode else None)


def gpu_memory_mib(pgid: int | None = None) -> int | None:
    """GPU memory in MiB of the processes of a server's process group ``pgid`` (its scheduler and the others),
    so that servers soaked side by side on one GPU are told apart; None where nvidia-smi lists none of them (e.g.
    a container whose pids nvidia-smi does not see) or with no ``pgid``. :func:`gpu_memory_used_mib` is the
    whole GPU's."""
    if pgid is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60)
        return apps_memory_mib(out.stdout, process_group_pids(pgid)) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def gpu_memory_used_mib() -> int | None:
    """Memory used on the (first visible) GPU, MiB: a server's own when it runs alone there."""
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index],
                             capture_output=True, text=True, timeout=60)
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def server_memory(pgid: int) -> tuple[int | None, str]:
    """(MiB, scope): the server's own processes' GPU memory where nvidia-smi shows them, else the whole GPU's."""
    own = gpu_memory_mib(pgid)
    return (own, "server processes") if own is not None else (gpu_memory_used_mib(), "whole GPU")


def apps_memory_mib(query_compute_apps: str, pids: set[int]) -> int | None:
    """Sum of ``used_memory`` over the lines of ``nvidia-smi --query-compute-apps=pid,used_memory`` (csv, no
    header, no units) whose pid is in ``pids``; None when no line is."""
    total, seen = 0, False
    for line in query_compute_apps.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and int(fields[0]) in pids:
            total, seen = total + int(fields[1]), True
    return total if seen else None


def process_group_pids(pgid: int, proc: Path = Path("/proc")) -> set[int]:
    """Pids of the live processes in process group ``pgid`` (from ``/proc/<pid>/stat``)."""
    pids = set()
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()      # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.add(int(stat.parent.name))
    return pids


def soak_config(preset: str, min_budget: int, path: Path) -> Path:
    """The preset with ``min_context: 0``, ``min_batch_tokens: 0`` (every step with a long request selects) and a
    budget of at least ``min_budget`` (whole pages), as YAML."""
    config = SparseConfig.load(preset)
    budget = max(config.token_budget, -(-min_budget // config.page_size) * config.page_size)
    return config.replace(min_context=0, min_batch_tokens=0, token_budget=budget).save(path)


def server_spec(config: str, args, log_dir: Path) -> tuple[str, str | None, list[str]]:
    page = PAGE_SIZE if config == "dense" else max(PAGE_SIZE, SparseConfig.load(config).sglang_page_size)
    extra = ["--max-total-tokens", str(args.max_total_tokens), "--max-running-requests", str(args.max_running),
             "--mem-fraction-static", str(args.mem_fraction_static), "--schedule-policy", "fcfs",
             "--cuda-graph-backend-prefill", "disabled", "--page-size", str(page)]
    if config == "dense":
        return "flashinfer", None, extra
    min_budget = max(args.probe_lengths) + args.probe_tokens
    return "sgl_sparse", str(soak_config(config, min_budget, log_dir / f"soak_{config}.yaml")), extra


def checks(row: dict, args) -> dict:
    """The issue's requirements for one config: True, False, or None (not measured)."""
    start, end = row.get("gpu_memory_start_mib"), row.get("gpu_memory_end_mib")
    warm = row.get("warmup", {})
    return dict(duration=row["duration_s"] >= args.duration,
                server_errors=row["server_errors"] + warm.get("server_errors", 0) == 0,
                unexpected=row["unexpected"] + warm.get("unexpected", 0) == 0,
                leaked_tokens=row.get("leaked_tokens") == 0,
                probe_mismatches=row.get("probe_mismatches") == 0,
                memory_flat=None if start is None or end is None else end - start <= args.memory_tolerance_mib,
                invalid_rejected=row["invalid_sent"] > 0 and row["invalid_rejected"] == row["invalid_sent"],
                disconnects=row["aborted"] > 0, opt_outs=row["opt_out_completed"] > 0,
                kv_pressure=row.get("retracted_reqs", 0) > 0, idle_check_quiet=row.get("idle_check_warnings") == 0,
                server_alive=row.get("server_alive") is True)


def run_config(config: str, args, mix: Mix, prefixes, log_dir: Path, reference: list[dict] | None) -> dict:
    """Start ``config``'s server, probe, soak, check, stop; the row (``error`` where a stage failed). A dense
    server's first probe outputs become the reference when there is none."""
    backend, sparse_config, extra = server_spec(config, args, log_dir)
    server = ServerProcess(str(args.model_dir), backend=backend, sparse_config=sparse_config, extra_args=extra,
                           log_path=log_dir / f"server_{config}.log", env={"HF_HUB_OFFLINE": "1"})
    row, started, stage = dict(config=config, sparse_config=sparse_config), time.time(), "start-up"
    prompts = probe_prompts(args.probe_lengths, args.seed)
    print(f"[{config}] starting server (log {server.log_path})", flush=True)
    try:
        server.start().wait_ready(timeout=args.start_timeout)
        mib, scope = server_memory(server.proc.pid)
        row.update(ready_s=time.time() - started, gpu_memory_ready_mib=mib, gpu_memory_scope=scope)
        stage = "probes before"
        before = run_probes(server.url, prompts, args.probe_tokens)
        reference = reference or (before if config == "dense" else None)
        row.update(probe_outputs_before=before, used_tokens_idle_before=idle_load(server.url)["num_used_tokens"])
        stage = "load"
        print(f"[{config}] ready after {row['ready_s']:.0f} s; {args.clients} clients for {args.warmup:.0f} + "
              f"{args.duration:.0f} s", flush=True)
        warm, next_index = asyncio.run(drive(server.url, mix, prefixes, 0, args.warmup, args.clients,
                                             args.request_timeout, server.alive))
        row["gpu_memory_start_mib"] = server_memory(server.proc.pid)[0]
        main_start = time.time()
        main, _ = asyncio.run(drive(server.url, mix, prefixes, next_index, args.duration, args.clients,
                                    args.request_timeout, server.alive))
        row.update(duration_s=time.time() - main_start, warmup=tally(warm), **tally(main))
        stage = "idle check"
        idle = idle_load(server.url)
        row.update(leaked_tokens=idle["num_used_tokens"], pool_tokens=idle["max_total_num_tokens"],
                   gpu_memory_end_mib=server_memory(server.proc.pid)[0])
        stage = "probes after"
        after = run_probes(server.url, prompts, args.probe_tokens)
        row["probe_outputs_after"] = after
        if reference:
            row.update(judge_probes(row, reference))
    except (ServerError, SoakError, BenchError, OSError, ValueError, KeyError) as e:
        row["error"] = f"{stage}: {type(e).__name__}: {e}"[:3000]
        print(f"[{config}] FAILED at {row['error']}\n(server log: {server.log_path})", flush=True)
    finally:
        row["server_alive"] = server.alive()
        server.stop()
        row.update(log_counts(server.log_tail(10**9)), wall_s=time.time() - started, log=str(server.log_path))
    if "requests" in row:
        row["checks"] = checks(row, args)
    row["passed"] = "error" not in row and all(v is True for v in row.get("checks", {}).values())
    print(f"[{config}] {'PASSED' if row['passed'] else 'FAILED'} in {row['wall_s']:.0f} s: "
          + ", ".join(f"{k}={row.get(k)}" for k in ("requests", "completed", "aborted", "rejected", "server_errors",
                                                     "unexpected", "leaked_tokens", "probe_mismatches",
                                                     "retracted_reqs", "gpu_memory_start_mib", "gpu_memory_end_mib"))
          + "".join(f"\n  check {k}: {v}" for k, v in row.get("checks", {}).items() if v is not True), flush=True)
    return row


def probe_reference_from(path: str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if not data.get("probe_reference"):
        raise SystemExit(f"{path} holds no probe_reference (a soak result with a dense server, or its reference)")
    return data["probe_reference"]


def dense_reference(args, log_dir: Path) -> list[dict]:
    """The probes' greedy tokens on a dense server started for them alone."""
    backend, _, extra = server_spec("dense", args, log_dir)
    with ServerProcess(str(args.model_dir), backend=backend, extra_args=extra, env={"HF_HUB_OFFLINE": "1"},
                       log_path=log_dir / "server_dense_reference.log") as server:
        return run_probes(server.url, probe_prompts(args.probe_lengths, args.seed), args.probe_tokens)


def combine(paths: list[str], out: Path) -> int:
    """Rows of several runs (e.g. one config per GPU) -> one result file; the first run's row of a config wins. A
    row that ran without a probe reference (``--skip-reference``) is judged here against the dense run's probes,
    with its own run's settings."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    reference = next((run["probe_reference"] for run in runs if run.get("probe_reference")), None)
    rows, seen = [], set()
    for run in runs:
        for r in run["rows"]:
            if r["config"] in seen:
                continue
            seen.add(r["config"])
            r = dict(r, commit=run.get("commit") or r.get("commit"))     # a combined file keeps its rows' commits
            if r.get("probe_mismatches") is None and reference and r.get("probe_outputs_after"):
                r.update(judge_probes(r, reference))
                r["checks"] = checks(r, argparse.Namespace(**run["settings"]))
                r["passed"] = "error" not in r and all(v is True for v in r["checks"].values())
            rows.append(r)
    gpu = " / ".join(sorted({r["gpu"] for r in runs if r.get("gpu")}))
    runs_meta = [{k: r.get(k) for k in ("commit", "versions", "settings")} for r in runs]
    write(out, dict(gpu=gpu, combined=[Path(p).name for p in paths], runs=runs_meta, probe_reference=reference), rows)
    print(f"wrote {out}: passed={all(r['passed'] for r in rows)}", flush=True)
    return 0


def write(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta, rows=rows, passed=bool(rows) and all(r["passed"] for r in rows)), indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted({"dense"} | set(presets())),
                    metavar="CONFIG")
    ap.add_argument("--model-dir", type=Path, help="checkpoint directory (default: $GPU_HOST_MODELS/qwen05b)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load after the warm-up")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds of the same load before memory is read")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--max-running", type=int, default=32, help="SGLang's --max-running-requests")
    ap.add_argument("--max-total-tokens", type=int, default=65536, help="KV pool: small enough that SGLang retracts")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--probe-lengths", type=int, nargs="+", default=[128, 512, 1024, 1792])
    ap.add_argument("--probe-tokens", type=int, default=32)
    ap.add_argument("--probe-reference", help="a soak result JSON whose dense probe outputs to compare against")
    ap.add_argument("--skip-reference", action="store_true",
                    help="without dense in --configs and no --probe-reference: start no dense server for the "
                         "reference; --combine with a dense run of the same commit judges the probes")
    ap.add_argument("--memory-tolerance-mib", type=int, default=512, help="allowed growth start -> end")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds; a request past it is an error")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt-out-fraction", type=float, default=0.1,
                    help="share of requests with custom_params {\"sparse\": false}; the soak's checks need some (0: a "
                         "diagnostic run, e.g. to time the sparse server without the eager steps they cause)")
    ap.add_argument("--out", default="launch/results/soak_h200.json")
    ap.add_argument("--dry-run", action="store_true", help="print the mix and commands, check flags, start nothing")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge these result files into --out; runs nothing")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, Path(args.out))

    out_path = Path(args.out).resolve()
    log_dir = Path(tempfile.mkdtemp()) if args.dry_run else out_path.with_name(out_path.stem + "_logs")
    if args.model_dir is None:
        if not os.environ.get("GPU_HOST_MODELS") and not args.dry_run:
            raise SystemExit("no model: pass --model-dir or set GPU_HOST_MODELS")
        args.model_dir = Path(os.environ.get("GPU_HOST_MODELS", "/nonexistent")) / "qwen05b"
    model_config = args.model_dir / "config.json"
    context = json.loads(model_config.read_text())["max_position_embeddings"] if model_config.exists() else 32768
    mix = Mix(context_len=context, seed=args.seed, opt_out_fraction=args.opt_out_fraction)
    sample = tally_specs(mix, 2000)
    print(f"mix (first 2000 requests): {sample}", flush=True)
    specs = {c: server_spec(c, args, log_dir) for c in args.configs}
    commands = server_commands(str(args.model_dir), specs)
    if args.dry_run:
        check_flags(commands)
        return 0
    stop_servers_on_sigterm()

    reference = probe_reference_from(args.probe_reference) if args.probe_reference else None
    configs = sorted(args.configs, key=lambda c: c != "dense")          # dense first: its probes are the reference
    if reference is None and "dense" not in configs and not args.skip_reference:
        print("no probe reference: starting a dense server for it", flush=True)
        reference = dense_reference(args, log_dir)
    started, gpu, prefixes, rows = time.time(), gpu_name(), shared_prefixes(mix), []
    for config in configs:
        rows.append(run_config(config, args, mix, prefixes, log_dir, reference))
        if reference is None and config == "dense" and rows[-1].get("probe_outputs_before"):
            reference = rows[-1]["probe_outputs_before"]
        write(out_path, dict(gpu=gpu, versions=versions(), commit=git_commit(), model=str(args.model_dir),
                             wall_s=time.time() - started, mix=dataclasses.asdict(mix), mix_sample=sample,
                             settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                             commands={c: shlex.join(cmd) for c, cmd in commands.items()},
                             probe_reference=reference), rows)
    verdicts = ", ".join(f"{r['config']} {'passed' if r['passed'] else 'FAILED'}" for r in rows)
    print(f"wrote {out_path} in {time.time() - started:.0f} s: {verdicts}", flush=True)
    return 0


def tally_specs(mix: Mix, n: int) -> dict:
    """The proportions of the first ``n`` requests of the mix (what the run will send)."""
    specs = [request_spec(mix, i) for i in range(n)]
    valid = [s for s in specs if s.invalid is None]
    return dict(invalid=sum(s.invalid is not None for s in specs) / n, opt_out=sum(s.opt_out for s in valid) / n,
                disconnect=sum(s.disconnect_after is not None for s in valid) / n,
                shared_prefix=sum(s.prefix >= 0 for s in valid) / n, stream=sum(s.stream for s in valid) / n,
                prompt_min=min(s.prompt_len for s in valid), prompt_max=max(s.prompt_len for s in valid),
                prompt_median=sorted(s.prompt_len for s in valid)[len(valid) // 2])


if __name__ == "__main__":
    sys.exit(main())
