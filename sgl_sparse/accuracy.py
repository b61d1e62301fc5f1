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

Instances: every (task, length, depth, seed) with seeds ``seed .. seed + seeds - 1`` (:func:`instance_specs`), the
same set for every config. Statistics (:func:`summarize`): per config and budget, the mean score with a 95 %
percentile-bootstrap interval over instances, per length, per task (at each length and over all lengths) and
overall; relative to dense with a *paired* bootstrap interval (the same resampled instances for both, ratio of
means); :func:`curve_points` extracts the accuracy/attended curve at one length.

Prompts are raw completions ending in an answer prefix (RULER's style), which the small instruct models here
follow better than their chat template.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import models, tasks
from .config import SparseConfig, SparseConfigError, split_spec
from .hf_sparse import sparse_attention
from .serving import file_safe

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
    seed: int | None = None               # the instance's seed (None in files written before seeds existed)
    config: str | None = None             # the config's label (:func:`named_configs`); None = ``method``

    @property
    def label(self) -> str:
        """The config this result belongs to: its label, or its method in files written before labels."""
        return self.config or self.method

    @property
    def instance(self) -> tuple:
        """The instance it answered: (task, length, depth, seed) — the key that pairs configs."""
        return self.task, self.length, self.depth, self.seed


BUDGET = "budget"   # an override value that stands for each config's token budget (--set sample_capacity=budget)


def config_label(spec: str, overrides: dict | None = None) -> str:
    """A config's name in results and rows: the preset (or spec) as given, plus ``[field=value,...]`` for the
    overrides of the run (``vattention[sample_capacity=budget]``)."""
    if not overrides:
        return spec
    return spec + "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]"


def spec_budget(spec: str) -> int | None:
    """The token budget a method spec sets itself inline (``vattention:page_size=8,token_budget=320``), or None."""
    budget = split_spec(spec)[1].get("token_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise SparseConfigError(f"sparse config {spec!r}: token_budget={budget!r} is not a whole number of tokens "
                                "(write e.g. token_budget=1024)")
    return budget


def named_configs(methods: list[str], budgets: list[int], **overrides) -> list[tuple[str, SparseConfig]]:
    """(label, config): dense plus every (preset, budget); sparse from the first token of decode (no
    min_context, no min_batch_tokens). A method that sets its own ``token_budget`` inline runs at that budget
    alone, so one run can hold configs of different budgets beside one dense server. An override whose value is
    ``"budget"`` takes each config's token budget."""
    out = [("dense", SparseConfig(method="dense"))]
    for m in methods:
        own = spec_budget(m)
        for b in budgets if own is None else [own]:
            fields = {k: (b if v == BUDGET else v) for k, v in overrides.items()}
            # min_batch_tokens=0: a batch of a few requests selects (the method is what is measured)
            out.append((config_label(m, overrides), SparseConfig.load(m).replace(
                **{"token_budget": b, "min_context": 0, "min_batch_tokens": 0, **fields})))
    return out


def configs_for(methods: list[str], budgets: list[int], **overrides) -> list[SparseConfig]:
    """Dense plus every (preset, budget); sparse from the first token of decode (no min_context)."""
    return [cfg for _, cfg in named_configs(methods, budgets, **overrides)]


def _labelled(configs) -> list[tuple[str, SparseConfig]]:
    """Configs given as ``SparseConfig`` (label = method) or ``(label, SparseConfig)``."""
    return [c if isinstance(c, tuple) else (c.method, c) for c in configs]


def instance_specs(task_names: list[str], lengths: list[int], depths: list[float], seeds: int = 1,
                   seed: int = 0) -> list[tuple[str, int, float, int]]:
    """Every (task, length, depth, seed), seeds ``seed .. seed + seeds - 1``: ``len(depths) * seeds`` instances
    per (task, length), each generated deterministically by :func:`sgl_sparse.tasks.make_task`."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if len(set(depths)) != len(depths):
        raise ValueError(f"depths repeat: {depths}")
    return [(t, L, d, seed + k) for t in task_names for L in lengths for d in depths for k in range(seeds)]


@torch.no_grad()
def evaluate(model_name: str, task_names: list[str], lengths: list[int], depths: list[float],
             configs: list, seed: int = 0, progress=None, measure_error: bool = False, seeds: int = 1
             ) -> list[Result]:
    """CPU path. ``configs``: ``SparseConfig`` or ``(label, SparseConfig)``; instances per
    :func:`instance_specs`. ``measure_error``: compare every sparse decode attention with dense on the same q/k/v
    (always on for vAttention, whose violation rate needs it)."""
    model, tok = models.load_model(model_name)
    count = tasks.token_counter(tok)
    results = []
    for task, length, depth, inst_seed in instance_specs(task_names, lengths, depths, seeds, seed):
        inst = tasks.make_task(task, length, depth, inst_seed, count)
        for label, cfg in _labelled(configs):
            t0 = time.time()
            n_new = MAX_NEW_TOKENS.get(task, 24)
            violation = error = None
            if cfg.is_sparse:
                measure = measure_error or cfg.samples_residual
                with sparse_attention(model, cfg, measure_error=measure) as stats:
                    out = models.greedy(model, tok, inst.prompt, n_new)
                frac = stats.attended_fraction
                violation = stats.violation_rate if cfg.samples_residual else None
                error = stats.mean_error if measure else None
            else:
                out, frac = models.greedy(model, tok, inst.prompt, n_new), 1.0
            r = Result("cpu", model_name, cfg.method, cfg.token_budget if cfg.is_sparse else length, task,
                       length, depth, inst.score(out), frac, out, time.time() - t0, violation, error,
                       inst_seed, label)
            results.append(r)
            if progress:
                progress(r)
    return results


def _group_key(r: Result) -> tuple[str, int, int]:
    """(config label, budget, length); dense runs share budget 0 whatever their length."""
    return r.label, r.budget if r.method != "dense" else 0, r.length


# ----------------------------------------------------------------------------- statistics

RESAMPLES = 2000      # bootstrap replicates per interval
LEVEL = 0.95          # interval coverage


def _resample_means(columns: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """Bootstrap replicates: ``resamples`` draws of n instance indices with replacement (one seeded generator;
    the *same* indices for every column: a paired bootstrap), the mean of each column over each draw."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in columns]
    chunk = max(1, (1 << 22) // n)                     # ~4M indices at a time
    done = 0
    while done < resamples:
        k = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(k, n))
        for acc, col in zip(out, columns):
            acc.append(col[idx].mean(axis=1))
        done += k
    return [np.concatenate(acc) for acc in out]


def _interval(replicates: np.ndarray, level: float) -> list[float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(replicates, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_mean_ci(values, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
                      ) -> tuple[float, list[float]] | tuple[None, None]:
    """Mean of ``values`` and its ``level`` percentile-bootstrap interval over them ([low, high]); deterministic
    for a seed. One value: the interval is that value. No values: ``(None, None)``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    mean = float(x.mean())
    if x.size == 1 or resamples < 1:
        return mean, [mean, mean]
    (means,) = _resample_means([x], resamples, seed)
    return mean, _interval(means, level)


def paired_relative_ci(sparse, dense, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
                       ) -> tuple[float, list[float]] | tuple[None, None]:
    """``mean(sparse) / mean(dense)`` over paired instances (``sparse[i]`` and ``dense[i]`` answered the same
    instance) and its paired-bootstrap interval: each replicate resamples instance indices once and takes the ratio
    of the two means over them (replicates whose dense mean is 0 have no ratio and are left out). ``(None, None)``
    when there is no pair or the dense mean is 0 (relative undefined)."""
    s, d = np.asarray(sparse, dtype=float), np.asarray(dense, dtype=float)
    if s.shape != d.shape:
        raise ValueError(f"paired samples differ in size: {s.shape} vs {d.shape}")
    if s.size == 0 or d.mean() == 0:
        return None, None
    rel = float(s.mean() / d.mean())
    if s.size == 1 or resamples < 1:
        return rel, [rel, rel]
    num, den = _resample_means([s, d], resamples, seed)
    ok = den != 0
    ratios = num[ok] / den[ok]
    return rel, _interval(ratios, level)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _by_instance(rs: list[Result]) -> dict[tuple, float]:
    """Score per instance (the mean where one instance was answered twice, e.g. by two merged runs)."""
    acc: dict[tuple, list[float]] = {}
    for r in rs:
        acc.setdefault(r.instance, []).append(r.score)
    return {k: sum(v) / len(v) for k, v in acc.items()}


SCOPES = ("length", "overall", "task", "task_length")   # row scopes, in the order rows are listed


def summarize(results: list[Result], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
              ) -> list[dict]:
    """Rows per (config, budget) with the dense figures beside them, each over the instances of its scope:

    - ``scope="length"``: all tasks at one length (``task`` None) — the table and the curve;
    - ``scope="overall"``: all tasks, all lengths (``length`` None);
    - ``scope="task"``: one task over all lengths (``length`` None);
    - ``scope="task_length"``: one task at one length.

    Fields: ``method``, ``config`` (label), ``budget`` (0 for dense), ``length``, ``task``, ``score`` and
    ``score_ci`` (mean over the row's instances, percentile bootstrap), ``dense_score``/``dense_score_ci`` (dense
    over the same scope), ``relative``/``relative_ci`` (paired bootstrap over the instances both answered:
    ``n_paired`` of them; None where dense scores 0 or did not run), ``attended_fraction`` (mean), ``n`` (results
    behind the row), ``violation_rate`` and ``mean_error`` (mean where measured, else None)."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        label, budget, length = _group_key(r)
        for scope, L, task in (("length", length, None), ("overall", None, None), ("task", None, r.task),
                               ("task_length", length, r.task)):
            groups.setdefault((label, budget, scope, L, task), []).append(r)
    dense = {(scope, L, task): rs for (label, _, scope, L, task), rs in groups.items()
             if rs[0].method == "dense"}
    order = lambda k: (k[0] != "dense", k[0], k[1], SCOPES.index(k[2]), k[4] or "", k[3] or 0)  # noqa: E731
    rows = []
    for key in sorted(groups, key=order):
        label, budget, scope, L, task = key
        rs = groups[key]
        score, score_ci = bootstrap_mean_ci([r.score for r in rs], resamples, seed, level)
        ds = dense.get((scope, L, task))
        dense_score = dense_ci = rel = rel_ci = None
        n_paired = 0
        if ds:
            dense_score, dense_ci = bootstrap_mean_ci([r.score for r in ds], resamples, seed, level)
            mine, theirs = _by_instance(rs), _by_instance(ds)
            pairs = [k for k in mine if k in theirs]
            n_paired = len(pairs)
            rel, rel_ci = paired_relative_ci([mine[k] for k in pairs], [theirs[k] for k in pairs], resamples, seed,
                                             level)
        frac = [r.attended_fraction for r in rs]
        rows.append(dict(method=rs[0].method, config=label, budget=budget, length=L, task=task, scope=scope,
                         score=score, score_ci=score_ci, dense_score=dense_score, dense_score_ci=dense_ci,
                         relative=rel, relative_ci=rel_ci, attended_fraction=sum(frac) / len(frac), n=len(rs),
                         n_paired=n_paired, violation_rate=_mean(r.violation_rate for r in rs),
                         mean_error=_mean(r.mean_error for r in rs)))
    return rows


def curve_points(rows: list[dict], length: int | None = None) -> dict:
    """The accuracy/attended curve at one ``length`` (default: the longest) from :func:`summarize`'s
    ``scope="length"`` rows: ``{"length", "dense": row or None, "lines": {config: [points sorted by attended
    fraction]}}``, each point ``budget``, ``attended_fraction``, ``score``, ``score_ci``, ``relative``,
    ``relative_ci``, ``n``."""
    at = [r for r in rows if r.get("scope", "length") == "length" and r.get("task") is None]
    if length is None:
        length = max((r["length"] for r in at), default=None)
    at = [r for r in at if r["length"] == length]
    dense = next((r for r in at if r["method"] == "dense"), None)
    lines: dict[str, list[dict]] = {}
    for r in at:
        if r["method"] == "dense":
            continue
        lines.setdefault(r.get("config") or r["method"], []).append(
            {k: r.get(k) for k in ("budget", "attended_fraction", "score", "score_ci", "relative", "relative_ci",
                                   "n")})
    for pts in lines.values():
        pts.sort(key=lambda p: (math.isnan(p["attended_fraction"]), p["attended_fraction"], p["budget"]))
    return dict(length=length, dense=dense, lines=lines)


@dataclass(frozen=True)
class AccuracyGoal:
    """A method's accuracy goal at the longest length of a run: ``relative`` to dense or better while attending at
    most ``max_attended`` of the context, over at least ``min_n`` instances."""

    method: str
    relative: float
    max_attended: float
    min_n: int = 90


# The accuracy goals the presets are measured against (9 RULER-style tasks at 32K, >= 10 instances per task).
ACCURACY_GOALS = (AccuracyGoal("quest", 0.99, 1 / 16), AccuracyGoal("twilight", 0.99, 0.02),
                  AccuracyGoal("vattention", 0.97, 0.02))


def goal_report(rows: list[dict], goals=ACCURACY_GOALS, length: int | None = None) -> list[dict]:
    """Each goal against :func:`summarize`'s all-task rows at ``length`` (default: the longest) of its method with
    at least ``goal.min_n`` instances: ``met`` (some row attends at most ``max_attended`` and reaches
    ``relative``; None where the method has no such row at all), ``best`` (the row with the highest relative score
    within the attended limit, or None), ``reached_at`` (the row that reaches ``relative`` at the smallest
    attended fraction, whatever it attends, or None) and ``measured_up_to`` (the largest attended fraction
    measured). Rows are given as ``config``, ``budget``, ``attended_fraction``, ``relative``, ``relative_ci``,
    ``n``."""
    at = [r for r in rows if r.get("scope", "length") == "length" and r.get("task") is None]
    if length is None:
        length = max((r["length"] for r in at), default=None)
    keep = ("config", "budget", "attended_fraction", "relative", "relative_ci", "n")
    report = []
    for g in goals:
        mine = [r for r in at if r["length"] == length and r["method"] == g.method and r.get("relative") is not None
                and r["n"] >= g.min_n and not math.isnan(r["attended_fraction"])]
        within = [r for r in mine if r["attended_fraction"] <= g.max_attended]
        best = max(within, key=lambda r: (r["relative"], -r["attended_fraction"]), default=None)
        reached = min((r for r in mine if r["relative"] >= g.relative), key=lambda r: r["attended_fraction"],
                      default=None)
        report.append(dict(method=g.method, length=length, relative=g.relative, max_attended=g.max_attended,
                           min_n=g.min_n, met=None if not mine else bool(best and best["relative"] >= g.relative),
                           best=best and {k: best[k] for k in keep},
                           reached_at=reached and {k: reached[k] for k in keep},
                           measured_up_to=max((r["attended_fraction"] for r in mine), default=None)))
    return report


def describe_goal(g: dict) -> str:
    """One line of :func:`goal_report`: the goal, the best row within its limit, where it is reached."""
    head = f"{g['method']}: relative >= {g['relative']:.2f} at attended <= {100 * g['max_attended']:.3g} %"
    if g["met"] is None:
        return f"{head}: not measured (no row of n >= {g['min_n']} at length {g['length']})"
    b = g["best"]
    best = ("no row within the limit" if b is None else
            f"best {b['relative']:.3f} [{b['relative_ci'][0]:.2f}, {b['relative_ci'][1]:.2f}] at "
            f"{100 * b['attended_fraction']:.2g} % ({b['config']}, {b['budget']})")
    r = g["reached_at"]
    reached = (f"not reached up to {100 * g['measured_up_to']:.3g} % attended" if r is None else
               f"reached at {100 * r['attended_fraction']:.3g} % ({r['config']}, {r['budget']}: {r['relative']:.3f})")
    return f"{head}: {'met' if g['met'] else 'not met'}; {best}; {reached}"


def summarize_by_task(results: list[Result], field: str = "score") -> dict[tuple[str, int, int], dict[str, float]]:
    """Mean ``field`` (score, or mean_error where measured) per task for each (config, budget, length): where a
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


def check_server_page_size(page_size: int, cfg: SparseConfig, name: str, what: str) -> None:
    """``ValueError`` (saying ``what {page_size}``) unless SGLang's ``--page-size`` ``page_size`` serves sparse
    config ``cfg`` (called ``name``): a positive multiple of its page (its coarse page, if any)."""
    if cfg.is_sparse and (page_size < 1 or page_size % cfg.sglang_page_size):
        raise ValueError(f"{what} {page_size} is not a multiple of {name}'s page ({cfg.sglang_page_size} tokens): "
                         "give a multiple of it")


def server_for(model_dir, cfg: SparseConfig, *, name: str, extra_args=(), config_dir, log_dir=None, env=None,
               page_size: int | None = None):
    """A (not yet started) ``ServerProcess`` for ``cfg``: dense = ``flashinfer --page-size P``; sparse =
    ``sgl_sparse --sparse-config <cfg written as YAML in config_dir>``. SGLang's ``--page-size`` is ``page_size``
    if given (for a sparse config a multiple of its page, e.g. 8-token selection inside 16-token pages), else the
    config's (its coarse page for coarse-to-fine configs)."""
    from .serving import ServerProcess

    log = Path(log_dir) / f"server_{name}.log" if log_dir else None
    if not cfg.is_sparse:
        return ServerProcess(str(model_dir), backend="flashinfer", extra_args=[*extra_args, "--page-size",
                             str(page_size or cfg.page_size)], log_path=log, env=env)
    if page_size is not None:
        check_server_page_size(page_size, cfg, name, "server page size")
    path = cfg.save(Path(config_dir) / f"{name}.yaml")
    page_args = ["--page-size", str(page_size)] if page_size is not None else []
    return ServerProcess(str(model_dir), backend="sgl_sparse", sparse_config=str(path),
                         extra_args=[*extra_args, *page_args], log_path=log, env=env)


def config_name(cfg: SparseConfig, label: str | None = None) -> str:
    """A file-safe name for a config's server and files: its label (default: the method), then its budget."""
    if label is None and not cfg.is_sparse:
        return "dense"
    base = file_safe(label or cfg.method)
    return f"{base}_{cfg.token_budget}" if cfg.is_sparse else base


def evaluate_server(model_dir: str | os.PathLike, model_name: str, task_names: list[str], lengths: list[int],
                    depths: list[float], configs: list, seed: int = 0, progress=None,
                    log_dir: str | os.PathLike | None = None, concurrency: int = CONCURRENCY, seeds: int = 1,
                    timings: list | None = None, parallel: int = 1, page_size: int | None = None) -> list[Result]:
    """sglang path (GPU host). ``configs``: ``SparseConfig`` or ``(label, SparseConfig)``; ``page_size``: SGLang's
    ``--page-size`` for every server (:func:`server_for`). The instances
    (:func:`instance_specs`) are generated once (tokenizer of ``model_dir``) and the same ones go to every config;
    per config one server is sent every instance in one frontend ``run_batch`` (``concurrency`` at a time). With
    ``parallel`` = 1 each server is started, used and stopped before the next; with ``parallel`` = N > 1, N
    servers at a time share the GPU (sparse kernels compiled first by ``python -m sgl_sparse.warmup``; each
    server's KV pool capped at what ``concurrency`` requests need, with ``--mem-fraction-static`` 0.9 so that
    SGLang's memory profile, which sees the other servers' memory, stays positive) and their batches run side by
    side: start-up is paid once per group, and a request's ``seconds`` then includes the other servers' load.
    Start-up and batch times are printed and appended to ``timings`` (dicts). ``seconds`` is the server's
    end-to-end latency of the request (batched with the others); ``attended_fraction`` comes from the meta info
    (1 where the key is missing: dense server, or a request that ended before its first sparse decode step; NaN,
    with a warning, when a sparse server reports it for no request at all)."""
    from transformers import AutoTokenizer

    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    count = tasks.token_counter(tok)
    t_gen = time.time()
    specs = instance_specs(task_names, lengths, depths, seeds, seed)
    insts = [tasks.make_task(t, L, d, k, count) for t, L, d, k in specs]
    prompt_tokens = sum(count(i.prompt) for i in insts)
    print(f"{len(insts)} instances ({len(depths)} depths x {seeds} seeds per task and length; {prompt_tokens} "
          f"prompt tokens) generated in {time.time() - t_gen:.0f} s", file=sys.stderr, flush=True)
    needed = max(count(i.prompt) + MAX_NEW_TOKENS.get(i.task, 24) for i in insts) + 8
    context, env = context_length_for(model_dir, needed)
    extra = [*SERVER_ARGS, "--context-length", str(context)]
    if parallel > 1:
        extra += ["--mem-fraction-static", "0.9", "--max-total-tokens", str(concurrency * context + 8 * 1024)]
    labelled = list(enumerate(_labelled(configs)))
    if parallel > 1:
        warm_up(model_dir, [cfg for _, (_, cfg) in labelled], log_dir, env)
    results = []
    with tempfile.TemporaryDirectory() as config_dir:
        for first in range(0, len(labelled), parallel):
            group = labelled[first:first + parallel]
            servers = [server_for(model_dir, cfg, name=f"{k:02d}_{config_name(cfg, label)}", extra_args=extra,
                                  config_dir=config_dir, log_dir=log_dir, env=env, page_size=page_size)
                       for k, (label, cfg) in group]
            t_start = time.time()
            with contextlib.ExitStack() as stack:
                for server in servers:
                    stack.callback(server.stop)
                    server.start()
                for server in servers:
                    server.wait_ready(SERVER_START_TIMEOUT_S)
                t0 = time.time()
                with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
                    runs = [pool.submit(_timed_batch, s, insts, concurrency) for s in servers]
                    outs = [r.result() for r in runs]
            for (k, (label, cfg)), server, (out, wall) in zip(group, servers, outs):
                budget = cfg.token_budget if cfg.is_sparse else None
                side = f"; {len(servers)} servers side by side" if len(servers) > 1 else ""
                print(f"config {label} budget {budget}: {len(insts)} requests in one run_batch in {wall:.1f} s "
                      f"(server up in {t0 - t_start:.1f} s; {time.time() - t_start:.1f} s in all{side})",
                      file=sys.stderr, flush=True)
                if timings is not None:
                    timings.append(dict(config=label, method=cfg.method, budget=budget, requests=len(insts),
                                        prompt_tokens=prompt_tokens, batch_s=wall, startup_s=t0 - t_start,
                                        total_s=time.time() - t_start, servers_side_by_side=len(servers)))
                results += _results(model_name, cfg, label, specs, insts, out, wall, server, progress)
    return results


SERVER_START_TIMEOUT_S = 900.0


def _timed_batch(server, insts, concurrency):
    """:func:`run_frontend` on ``server`` (a ready ``ServerProcess``), timed; a failed request raises
    ``ServerError`` with the server's state and the tail of its log (the log of a server side by side with
    others may be gone with the run's temporary directory)."""
    import sglang as sgl
    from .serving import ServerError

    t0 = time.time()
    try:
        out = run_frontend(sgl.RuntimeEndpoint(server.url), insts, concurrency)
    except RuntimeError as e:
        if server.alive():                      # a crashing server may still be writing its traceback
            try:
                server.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        state = "running" if server.alive() else f"exited with code {server.proc.returncode}"
        raise ServerError(f"{e} (server {state}; log {server.log_path}):\n{server.log_tail()}") from e
    return out, time.time() - t0


def _results(model_name, cfg, label, specs, insts, outs, wall, server, progress) -> list[Result]:
    # A request without the key attended densely (dense server, or no decode step); a sparse server that reports it
    # for no request at all does not report it: NaN, not a made-up 1.
    reported = any(META_KEY in meta for _, meta in outs)
    if cfg.is_sparse and not reported:
        print(f"WARNING: {label} {cfg.token_budget}: no {META_KEY!r} in any response's meta info; attended "
              f"fraction = NaN (server log {server.log_path})", file=sys.stderr)
    results = []
    for (_, _, _, inst_seed), inst, (text, meta) in zip(specs, insts, outs):
        frac = attended_fraction_from_meta(meta, 1.0 if reported or not cfg.is_sparse else float("nan"))
        r = Result("sglang", model_name, cfg.method, cfg.token_budget if cfg.is_sparse else inst.length,
                   inst.task, inst.length, inst.depth, inst.score(text), frac, text,
                   float(meta.get("e2e_latency", wall)), seed=inst_seed, config=label)
        results.append(r)
        if progress:
            progress(r)
    return results


def warm_up(model_dir, configs: list[SparseConfig], log_dir, env) -> None:
    """``python -m sgl_sparse.warmup`` for the sparse configs among ``configs`` (servers started side by side
    would otherwise compile the same kernels at once)."""
    sparse = [c for c in configs if c.is_sparse]
    if not sparse:
        return
    with tempfile.TemporaryDirectory() as d:
        paths = [str(c.save(Path(d) / f"warm_{i}.yaml")) for i, c in enumerate(sparse)]
        log = Path(log_dir or d) / "warmup.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, "-m", "sgl_sparse.warmup", "--model-path", str(model_dir),
                                "--sparse-config", *paths], stdout=f, stderr=subprocess.STDOUT,
                               env=dict(os.environ, **(env or {})), timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"kernel warm-up failed (exit {p.returncode}); log {log}:\n"
                               + log.read_text(errors="replace")[-4000:])
