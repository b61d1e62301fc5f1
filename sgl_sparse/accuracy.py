"""Accuracy of the sparse methods against dense attention on generated long-context tasks.

Every (task, length, depth) instance runs with dense attention and with each (method, budget), greedy decoding;
each gives RULER's score and the mean attended fraction. Paths:

- ``cpu`` (:func:`evaluate`): Hugging Face transformers with the torch reference selection in decode attention
  (:mod:`sgl_sparse.hf_sparse`) — runs anywhere, slowly. For vAttention (for every method with
  ``measure_error``) every decode attention is also computed densely on the same real q/k/v: the mean relative
  error of the outputs and the fraction of (step, layer, query head) outputs whose error exceeds epsilon are
  reported (the latter against vAttention's delta).
- ``sglang`` (:func:`evaluate_server`, GPU host): one real SGLang server per config, one at a time — dense is
  ``--attention-backend flashinfer``, each sparse config ``--attention-backend sgl_sparse --sparse-config
  <yaml>`` — driven by SGLang's frontend language (``@sgl.function`` + ``run_batch`` on a ``RuntimeEndpoint``).
  The attended fraction is what the server reports in each response's meta info
  (``sparse_attended_fraction``); the violation rate is not measured on this path.

Prompts are raw completions ending in an answer prefix (RULER's style), which the small instruct models here
follow better than their chat template.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models, tasks
from .config import SparseConfig
from .hf_sparse import sparse_attention

# Generated tokens per task (default 24): room for the whole answer in the tokenizers here (Qwen2 spells digits
# one token each, so a UUID takes ~30 tokens); tests/test_accuracy_cpu.py checks it per task and tokenizer.
MAX_NEW_TOKENS = {"passkey": 8, "vt": 40, "cwe": 60, "niah_single_3": 64, "niah_multivalue": 48,
                  "niah_multiquery": 48}


@dataclass
class Result:
    path: str
    model: str
    method: str
    budget: int
    task: str
    length: int
    depth: float
    score: float
    attended_fraction: float
    output: str
    seconds: float
    violation_rate: float | None = None   # vAttention: measured P(rel. error > epsilon) on the real q/k/v
    mean_error: float | None = None       # measured mean relative L2 error of the attention outputs (CPU path)


def configs_for(methods: list[str], budgets: list[int], **overrides) -> list[SparseConfig]:
    """Dense plus every (preset, budget); sparse from the first token of decode (no min_context)."""
    out = [SparseConfig(method="dense")]
    for m in methods:
        for b in budgets:
            out.append(SparseConfig.load(m).replace(token_budget=b, min_context=0, **overrides))
    return out


@torch.no_grad()
def evaluate(model_name: str, task_names: list[str], lengths: list[int], depths: list[float],
             configs: list[SparseConfig], seed: int = 0, progress=None, measure_error: bool = False
             ) -> list[Result]:
    """CPU path. ``measure_error``: compare every sparse decode attention with dense on the same q/k/v (always on
    for vAttention, whose violation rate needs it)."""
    model, tok = models.load_model(model_name)
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    results = []
    for task in task_names:
        for length in lengths:
            for depth in depths:
                inst = tasks.make_task(task, length, depth, seed, count)
                for cfg in configs:
                    t0 = time.time()
                    n_new = MAX_NEW_TOKENS.get(task, 24)
                    violation = error = None
                    if cfg.is_sparse:
                        measure = measure_error or cfg.method == "vattention"
                        with sparse_attention(model, cfg, measure_error=measure) as stats:
                            out = models.greedy(model, tok, inst.prompt, n_new)
                        frac = stats.attended_fraction
                        violation = stats.violation_rate if cfg.method == "vattention" else None
                        error = stats.mean_error if measure else None
                    else:
                        out, frac = models.greedy(model, tok, inst.prompt, n_new), 1.0
                    r = Result("cpu", model_name, cfg.method, cfg.token_budget if cfg.is_sparse else length, task,
                               length, depth, inst.score(out), frac, out, time.time() - t0, violation, error)
                    results.append(r)
                    if progress:
                        progress(r)
    return results


def _group_key(r: Result) -> tuple[str, int, int]:
    """(method, budget, length); dense runs share budget 0 whatever their length."""
    return r.method, r.budget if r.method != "dense" else 0, r.length


def summarize(results: list[Result]) -> list[dict]:
    """Mean score and attended fraction per (method, budget, length), with the dense score beside it."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        key = _group_key(r)
        groups.setdefault(key, []).append(r)
    dense = {k[2]: sum(r.score for r in v) / len(v) for k, v in groups.items() if k[0] == "dense"}
    rows = []
    for (method, budget, length), rs in sorted(groups.items()):
        score = sum(r.score for r in rs) / len(rs)
        viol = [r.violation_rate for r in rs if r.violation_rate is not None]
        err = [r.mean_error for r in rs if r.mean_error is not None]
        rows.append(dict(method=method, budget=budget, length=length, score=score, dense_score=dense.get(length),
                         relative=score / dense[length] if dense.get(length) else None,
                         attended_fraction=sum(r.attended_fraction for r in rs) / len(rs), n=len(rs),
                         violation_rate=sum(viol) / len(viol) if viol else None,
                         mean_error=sum(err) / len(err) if err else None))
    return rows


def summarize_by_task(results: list[Result], field: str = "score") -> dict[tuple[str, int, int], dict[str, float]]:
    """Mean ``field`` (score, or mean_error where measured) per task for each (method, budget, length): where a
    method loses against dense."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in results:
        if getattr(r, field) is None:
            continue
        key = _group_key(r)
        groups.setdefault(key, {}).setdefault(r.task, []).append(getattr(r, field))
    return {k: {t: sum(v) / len(v) for t, v in sorted(tasks_.items())} for k, tasks_ in sorted(groups.items())}


# ----------------------------------------------------------------------------- sglang path

# Flags of every server on the sglang path (plus --context-length, and the backend's own flags). Decode CUDA graphs
# up to batch 16 (``--cuda-graph-max-bs-decode``: 0.5.17's name for the deprecated ``--cuda-graph-max-bs``).
SERVER_ARGS = ("--cuda-graph-backend-prefill", "disabled", "--cuda-graph-max-bs-decode", "16",
               "--max-running-requests", "16")
CONCURRENCY = 16                      # frontend threads = requests in flight (= --max-running-requests)
META_KEY = "sparse_attended_fraction"  # per response: one float per generated token, the last = running mean


def model_dir_for(name: str, model_dir: str | os.PathLike | None = None) -> Path:
    """Checkpoint directory for the sglang path: ``model_dir`` if given, else ``$GPU_HOST_MODELS/<name>`` (the GPU
    host's staged models), else :func:`sgl_sparse.models.prepare_model` (download + convert, cached)."""
    if model_dir:
        return Path(model_dir)
    if os.environ.get("GPU_HOST_MODELS"):
        return Path(os.environ["GPU_HOST_MODELS"]) / name
    return models.prepare_model(name)


def attended_fraction_from_meta(meta: dict | None, default: float = 1.0) -> float:
    """sglang path: a request's mean attended fraction over its decode, read from its response's meta info —
    the last non-``None`` element of ``sparse_attended_fraction`` (its first entry, the prefill token's, is
    ``None``). ``default`` when the key is missing or holds no value."""
    value = (meta or {}).get(META_KEY)
    if isinstance(value, (list, tuple)):
        values = [v for v in value if v is not None]
        return float(values[-1]) if values else default
    return default if value is None else float(value)


def server_path_description() -> str:
    """What produces the sglang path's numbers: SGLang version and GPU name."""
    import sglang

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"SGLang {sglang.__version__} server + frontend run_batch, GPU {gpu}"


def answer_program():
    """The frontend program: the raw prompt, then one greedy ``gen`` named ``answer``."""
    import sglang as sgl

    @sgl.function
    def answer(s, prompt, max_tokens):
        s += prompt
        s += sgl.gen("answer", max_tokens=max_tokens, temperature=0)

    return answer


def run_frontend(backend, insts: list[tasks.TaskInstance], concurrency: int = CONCURRENCY) -> list[tuple[str, dict]]:
    """sglang path: every instance through :func:`answer_program`'s ``run_batch`` on ``backend`` (a
    ``sgl.RuntimeEndpoint``); ``(output text, meta info)`` per instance, in order. A failed request raises."""
    batch = [dict(prompt=i.prompt, max_tokens=MAX_NEW_TOKENS.get(i.task, 24)) for i in insts]
    states = answer_program().run_batch(batch, backend=backend, temperature=0, num_threads=concurrency)
    out = []
    for inst, state in zip(insts, states):
        if state.error() is not None:
            raise RuntimeError(f"{inst.task} length {inst.length} depth {inst.depth}: {state.error()!r}")
        out.append((state["answer"], state.get_meta_info("answer") or {}))
    return out


def context_length_for(model_dir: str | os.PathLike, needed: int, page: int = 16) -> tuple[int, dict]:
    """``--context-length`` covering ``needed`` tokens (rounded up to a page), and the server env: past the
    model's ``max_position_embeddings`` (RULER's 32K prompt + its answer on a 32K model) SGLang needs
    ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1``; the CPU path runs the same positions without asking."""
    context = -(-needed // page) * page
    limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    if limit and context > limit:
        print(f"note: --context-length {context} exceeds the model's {limit} (longest prompt + answer); "
              f"allowed with SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1", file=sys.stderr)
        return context, {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
    return context, {}


def server_for(model_dir, cfg: SparseConfig, *, name: str, extra_args=(), config_dir, log_dir=None, env=None):
    """A (not yet started) ``ServerProcess`` for ``cfg``: dense = ``flashinfer --page-size P``; sparse =
    ``sgl_sparse --sparse-config <cfg written as YAML in config_dir>`` (page size from the config)."""
    import yaml

    from .serving import ServerProcess

    log = Path(log_dir) / f"server_{name}.log" if log_dir else None
    if not cfg.is_sparse:
        return ServerProcess(str(model_dir), backend="flashinfer", extra_args=[*extra_args, "--page-size",
                             str(cfg.page_size)], log_path=log, env=env)
    path = Path(config_dir) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return ServerProcess(str(model_dir), backend="sgl_sparse", sparse_config=str(path), extra_args=list(extra_args),
                         log_path=log, env=env)


def config_name(cfg: SparseConfig) -> str:
    return f"{cfg.method}_{cfg.token_budget}" if cfg.is_sparse else "dense"


def evaluate_server(model_dir: str | os.PathLike, model_name: str, task_names: list[str], lengths: list[int],
                    depths: list[float], configs: list[SparseConfig], seed: int = 0, progress=None,
                    log_dir: str | os.PathLike | None = None, concurrency: int = CONCURRENCY) -> list[Result]:
    """sglang path (GPU host). The instances are generated once (tokenizer of ``model_dir``) and the same ones
    go to every config; per config one server is started, sent every instance through the frontend
    (``concurrency`` at a time) and stopped before the next starts. ``seconds`` is the server's end-to-end
    latency of the request (batched with the others); ``attended_fraction`` comes from the meta info (1 where the
    key is missing: dense server, or a request that ended before its first sparse decode step; NaN, with a
    warning, when a sparse server reports it for no request at all)."""
    import sglang as sgl
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    insts = [tasks.make_task(t, L, d, seed, count) for t in task_names for L in lengths for d in depths]
    needed = max(count(i.prompt) + MAX_NEW_TOKENS.get(i.task, 24) for i in insts) + 8
    context, env = context_length_for(model_dir, needed)
    extra = [*SERVER_ARGS, "--context-length", str(context)]
    results = []
    with tempfile.TemporaryDirectory() as config_dir:
        for k, cfg in enumerate(configs):
            server = server_for(model_dir, cfg, name=f"{k:02d}_{config_name(cfg)}", extra_args=extra,
                                config_dir=config_dir, log_dir=log_dir, env=env)
            with server:
                t0 = time.time()
                outs = run_frontend(sgl.RuntimeEndpoint(server.url), insts, concurrency)
                wall = time.time() - t0
            # A request without the key attended densely (dense server, or no decode step); a sparse server that
            # reports it for no request at all does not report it: NaN, not a made-up 1.
            reported = any(META_KEY in meta for _, meta in outs)
            if cfg.is_sparse and not reported:
                print(f"WARNING: {config_name(cfg)}: no {META_KEY!r} in any response's meta info; attended "
                      f"fraction = NaN (server log {server.log_path})", file=sys.stderr)
            for inst, (text, meta) in zip(insts, outs):
                frac = attended_fraction_from_meta(meta, 1.0 if reported or not cfg.is_sparse else float("nan"))
                r = Result("sglang", model_name, cfg.method, cfg.token_budget if cfg.is_sparse else inst.length,
                           inst.task, inst.length, inst.depth, inst.score(text), frac, text,
                           float(meta.get("e2e_latency", wall)))
                results.append(r)
                if progress:
                    progress(r)
    return results
