"""Accuracy of the sparse methods against dense attention on generated long-context tasks.

``evaluate`` runs every (task, length, depth) instance with dense attention and with each (method, budget),
greedy decoding, and reports RULER's score and the mean attended fraction. Paths:

- ``cpu``: Hugging Face transformers with the torch reference selection in decode attention
  (:mod:`sgl_sparse.hf_sparse`) — runs anywhere, slowly.

For vAttention every decode attention is also computed densely on the same real q/k/v, and the fraction of
(step, layer, query head) outputs whose relative error exceeds epsilon is reported against delta.

Prompts are raw completions ending in an answer prefix (RULER's style), which the small instruct models here
follow better than their chat template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import models, tasks
from .config import SparseConfig
from .hf_sparse import sparse_attention

MAX_NEW_TOKENS = {"passkey": 8, "vt": 40, "cwe": 60, "niah_multivalue": 48, "niah_multiquery": 48}


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


def configs_for(methods: list[str], budgets: list[int], **overrides) -> list[SparseConfig]:
    """Dense plus every (preset, budget); sparse from the first token of decode (no min_context)."""
    out = [SparseConfig(method="dense")]
    for m in methods:
        for b in budgets:
            out.append(SparseConfig.load(m).replace(token_budget=b, min_context=0, **overrides))
    return out


@torch.no_grad()
def evaluate(model_name: str, task_names: list[str], lengths: list[int], depths: list[float],
             configs: list[SparseConfig], seed: int = 0, progress=None) -> list[Result]:
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
                    violation = None
                    if cfg.is_sparse:
                        measure = cfg.method == "vattention"
                        with sparse_attention(model, cfg, measure_error=measure) as stats:
                            out = models.greedy(model, tok, inst.prompt, n_new)
                        frac = stats.attended_fraction
                        violation = stats.violation_rate if measure else None
                    else:
                        out, frac = models.greedy(model, tok, inst.prompt, n_new), 1.0
                    r = Result("cpu", model_name, cfg.method, cfg.token_budget if cfg.is_sparse else length, task,
                               length, depth, inst.score(out), frac, out, time.time() - t0, violation)
                    results.append(r)
                    if progress:
                        progress(r)
    return results


def summarize(results: list[Result]) -> list[dict]:
    """Mean score and attended fraction per (method, budget, length), with the dense score beside it."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        key = (r.method, r.budget if r.method != "dense" else 0, r.length)
        groups.setdefault(key, []).append(r)
    dense = {k[2]: sum(r.score for r in v) / len(v) for k, v in groups.items() if k[0] == "dense"}
    rows = []
    for (method, budget, length), rs in sorted(groups.items()):
        score = sum(r.score for r in rs) / len(rs)
        viol = [r.violation_rate for r in rs if r.violation_rate is not None]
        rows.append(dict(method=method, budget=budget, length=length, score=score, dense_score=dense.get(length),
                         relative=score / dense[length] if dense.get(length) else None,
                         attended_fraction=sum(r.attended_fraction for r in rs) / len(rs), n=len(rs),
                         violation_rate=sum(viol) / len(viol) if viol else None))
    return rows
