#!/usr/bin/env python3
"""Why did a sparse answer differ from dense? The page selection of one task instance, step by step (CPU path).

Runs one instance (task, length, depth, seed) greedily with dense attention and with a sparse config on the CPU
path (transformers + the torch reference selection, :mod:`sgl_sparse.hf_sparse`), the config made sparse from the
first decode token as in the accuracy evaluation (``min_context`` 0 unless the spec sets it). Through
``sparse_attention(observer=...)`` it records, per decode step, sparse layer and KV head: the selected pages,
Quest's bound score of every page and the dense attention mass of every page, computed from the same q and K the
selection saw (softmax over the whole context, averaged over the group's query heads; the worst query head's kept
mass beside it). Only per-page aggregates are kept. It prints:

- per step: the (layer, KV head) pairs whose selection misses each needle value's pages (values located with the
  tokenizer's offset mapping; tasks without needles skip this) and the selection flips against the previous step;
- per step: the attention mass kept, and what 2x the budget (ranked by the logged scores) or the union of the last
  R = 2, 4 steps' selections would have kept;
- per (layer, KV head) at ``--step`` (default the last): recall of the true top-10 pages and the mass kept, worst
  first;
- the dense and sparse logit margins (top-1 minus top-2) at each generated token: a small dense margin at the
  first divergence is a near tie.

    python launch/selection_trace.py --model qwen05b --task niah_multivalue --length 16384 --depth 0.3 \\
        --config quest:token_budget=2048 --out trace.json --pages-out trace_pages.pt

``--out`` writes the summaries as JSON; ``--pages-out`` saves the per-page tensors (scores, mass, selection per
step and layer) with ``torch.save``. Step s is the decode forward that yields generated token s (token 0 comes
from the dense prefill); its context holds the prompt and tokens 0 .. s-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cupy_kernels import reference as ref  # noqa: E402
from sgl_sparse import accuracy, models, tasks  # noqa: E402
from sgl_sparse.config import SparseConfig, SparseConfigError  # noqa: E402
from sgl_sparse.hf_sparse import SelectionEvent, sparse_attention  # noqa: E402

TOP = 10               # recall of the true top-TOP pages per (layer, KV head)
UNIONS = (2, 4)        # counterfactual: the union of the last R steps' selections
NEEDLE_TASKS = ("passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue",
                "niah_multiquery", "vt")


# ----------------------------------------------------------------------------- needles


def overlapping_tokens(offsets, start: int, end: int) -> list[int]:
    """Positions of the tokens whose characters (a tokenizer's offset mapping) overlap ``prompt[start:end]``."""
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]


def locate_needles(tok, task: str, prompt: str, answers: list[str], page_size: int) -> list[dict]:
    """Each occurrence of each answer value in the prompt: ``value``, ``occurrence`` (1-based), ``tokens`` (token
    positions whose characters overlap the value, from the tokenizer's offset mapping, as the model reads the
    prompt: no special tokens) and ``pages`` (``position // page_size``). Empty for tasks without needles
    (``cwe``: the answers are the haystack)."""
    if task not in NEEDLE_TASKS:
        return []
    offsets = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    needles = []
    for value in answers:
        start, k = prompt.find(value), 0
        while start >= 0:
            end = start + len(value)
            # whole values only (a 5-digit key is not found inside a longer number)
            if not (prompt[start - 1:start].isalnum() or prompt[end:end + 1].isalnum()):
                k += 1
                toks = overlapping_tokens(offsets, start, end)
                needles.append(dict(value=value, occurrence=k, tokens=toks,
                                    pages=sorted({t // page_size for t in toks})))
            start = prompt.find(value, end)
    return needles


# ----------------------------------------------------------------------------- the observer


@dataclass
class PageRecord:
    """One (step, sparse layer): per-page aggregates per KV head."""

    length: int                  # L, tokens in the context
    scores: torch.Tensor         # [HK, n] float32, Quest's bound (-inf where not scored)
    mass: torch.Tensor           # [HK, n] float32, dense attention mass per page, mean over the group's q heads
    selected: torch.Tensor       # [HK, n] bool
    kept_min_head: torch.Tensor  # [HK] float32, the mass kept for the group's worst query head
    scored: bool                 # the selection ranked scores (False: within the budget, or a reused selection)


@dataclass
class SelectionTrace:
    """The observer: ``records[(step, layer)]`` per sparse layer's selection (see the module docstring)."""

    records: dict[tuple[int, int], PageRecord] = field(default_factory=dict)
    config: SparseConfig | None = None

    @torch.no_grad()
    def __call__(self, e: SelectionEvent) -> None:
        self.config = e.config
        L, HK, D = e.keys.shape
        HQ = e.q.shape[0]
        G, P = HQ // HK, e.page_size
        n = e.page_scores.shape[1]
        logits = torch.einsum("hgd,lhd->hgl", e.q.float().view(HK, G, D), e.keys.float()) * e.scale
        probs = torch.zeros(HK, G, n * P)
        probs[..., :L] = torch.softmax(logits, -1)
        per_head = probs.view(HK, G, n, P).sum(-1)                                  # [HK, G, n]
        selected = selection_mask(e.selected, e.num_selected, n)
        kept_min = (per_head * selected[:, None]).sum(-1).amin(1)
        scores = e.page_scores.float().clone()
        self.records[(e.step, e.layer)] = PageRecord(L, scores, per_head.mean(1), selected, kept_min,
                                                     bool(torch.isfinite(scores).any()))

    @property
    def steps(self) -> list[int]:
        return sorted({s for s, _ in self.records})

    @property
    def layers(self) -> list[int]:
        return sorted({lay for _, lay in self.records})

    def tensors(self) -> dict:
        """The per-page records as plain tensors (``--pages-out``)."""
        return {f"{s}/{lay}": dict(length=r.length, scores=r.scores, mass=r.mass, selected=r.selected,
                                   kept_min_head=r.kept_min_head) for (s, lay), r in sorted(self.records.items())}


# ----------------------------------------------------------------------------- analysis


def selection_mask(selected: torch.Tensor, num_selected: torch.Tensor, n: int) -> torch.Tensor:
    """``[HK, n]`` bool of the pages in each head's selection (``selected`` ``[HK, W]``, ``num_selected`` ``[HK]``
    of them valid)."""
    out = torch.zeros(selected.shape[0], n, dtype=torch.bool)
    for h in range(selected.shape[0]):
        out[h, selected[h, :int(num_selected[h])].long()] = True
    return out


def _pad(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (0, n - mask.shape[1])) if mask.shape[1] < n else mask[:, :n]


def budget_selection(r: PageRecord, cfg: SparseConfig, factor: int) -> torch.Tensor | None:
    """``[HK, n]`` bool: the pages ``factor`` times the config's budget would keep, ranked by the logged scores
    (sinks and the local window forced, as :func:`cupy_kernels.reference.topk_pages`); None when no scores were
    ranked (a reused selection). Within the budget already: the actual selection."""
    HK, n = r.scores.shape
    if not r.scored:
        return r.selected if n <= cfg.dense_pages else None
    sel, cnt = ref.topk_pages(r.scores[None], torch.tensor([r.length]), cfg.page_size, factor * cfg.top_k_pages,
                              cfg.sink_pages, cfg.local_pages, select_all_upto=cfg.dense_pages)
    return selection_mask(sel[0], cnt[0], n)


def union_selection(trace: SelectionTrace, step: int, layer: int, last: int) -> torch.Tensor:
    """``[HK, n]`` bool: the union of the selections of steps ``step - last + 1 .. step`` (those recorded)."""
    r = trace.records[(step, layer)]
    out = r.selected.clone()
    for s in range(step - last + 1, step):
        prev = trace.records.get((s, layer))
        if prev is not None:
            out |= _pad(prev.selected, out.shape[1])
    return out


def kept(r: PageRecord, selection: torch.Tensor | None) -> torch.Tensor | None:
    """``[HK]`` dense attention mass inside ``selection``."""
    return None if selection is None else (r.mass * selection).sum(-1)


def head_table(trace: SelectionTrace, step: int) -> list[dict]:
    """Per (sparse layer, KV head) at ``step``: recall of the true top-10 pages, mass kept (group mean and worst
    query head), the counterfactuals, the top pages missed; worst (least mass kept) first."""
    cfg = trace.config
    rows = []
    for layer in trace.layers:
        r = trace.records.get((step, layer))
        if r is None:
            continue
        cf = {"budget_x2": kept(r, budget_selection(r, cfg, 2))}
        cf.update({f"union_{R}": kept(r, union_selection(trace, step, layer, R)) for R in UNIONS})
        top = torch.topk(r.mass, min(TOP, r.mass.shape[1]), dim=-1).indices
        kept_selected = kept(r, r.selected)
        for h in range(r.mass.shape[0]):
            hit = r.selected[h, top[h]]
            rows.append(dict(layer=layer, head=h, recall_top10=float(hit.float().mean()),
                             kept=float(kept_selected[h]), kept_worst_q_head=float(r.kept_min_head[h]),
                             **{k: None if v is None else float(v[h]) for k, v in cf.items()},
                             missed_top=[int(p) for p in top[h][~hit]],
                             missed_top_mass=float(r.mass[h, top[h][~hit]].sum())))
    return sorted(rows, key=lambda x: x["kept"])


def step_table(trace: SelectionTrace, needles: list[dict]) -> list[dict]:
    """Per step: pairs missing each needle (some page of the value unselected; ``all``: every page), the
    strongest dense mass on a missed needle's pages, selection flips against the previous step (pages that
    changed, over the pages both steps had; pairs with any change), and the mass kept (mean and min over pairs)
    actually, with 2x the budget and with the union of the last R steps."""
    cfg = trace.config
    out = []
    for s in trace.steps:
        row = dict(step=s, needles=[], flips_pages=0, flips_pairs=0)
        acc: dict[str, list[float]] = {k: [] for k in ("kept", "budget_x2", *(f"union_{R}" for R in UNIONS))}
        for nd in needles:
            row["needles"].append(dict(value=nd["value"], occurrence=nd["occurrence"], missed=0, missed_all=0,
                                       missed_mass_max=0.0))
        for layer in trace.layers:
            r = trace.records.get((s, layer))
            if r is None:
                continue
            for nd, res in zip(needles, row["needles"]):
                pages = [p for p in nd["pages"] if p < r.selected.shape[1]]
                if not pages:
                    continue
                sel = r.selected[:, pages]                                           # [HK, pages]
                miss = ~sel.all(1)
                res["missed"] += int(miss.sum())
                res["missed_all"] += int((~sel.any(1)).sum())
                if miss.any():
                    res["missed_mass_max"] = max(res["missed_mass_max"], float(r.mass[miss][:, pages].sum(1).max()))
            prev = trace.records.get((s - 1, layer))
            if prev is not None:
                n = prev.selected.shape[1]
                diff = prev.selected ^ r.selected[:, :n]
                row["flips_pages"] += int(diff.sum())
                row["flips_pairs"] += int(diff.any(1).sum())
            acc["kept"] += kept(r, r.selected).tolist()
            x2 = kept(r, budget_selection(r, cfg, 2))
            if x2 is not None:
                acc["budget_x2"] += x2.tolist()
            for R in UNIONS:
                acc[f"union_{R}"] += kept(r, union_selection(trace, s, layer, R)).tolist()
        row["kept"] = {k: dict(mean=sum(v) / len(v), min=min(v)) if v else None for k, v in acc.items()}
        out.append(row)
    return out


def margins(logits: list[torch.Tensor]) -> list[float]:
    """Top-1 minus top-2 logit at each generated token."""
    out = []
    for x in logits:
        v = torch.topk(x.float().flatten(), 2).values
        out.append(float(v[0] - v[1]))
    return out


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int, keep_logits: bool = False) -> dict:
    """Greedy decode as :func:`sgl_sparse.models.greedy` does, keeping the raw logits' margins (and the logits
    themselves with ``keep_logits``)."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return dict(tokens=tokens, pieces=[tok.decode([t]) for t in tokens], margins=margins(out.logits),
                text=tok.decode(tokens, skip_special_tokens=True),
                logits=[x[0].clone() for x in out.logits] if keep_logits else None)


def load_config(spec: str) -> SparseConfig:
    """``quest`` or ``quest:token_budget=4096`` (:meth:`SparseConfig.load`), sparse from the first decode token
    (``min_context`` 0) unless the spec sets ``min_context``."""
    cfg = SparseConfig.load(spec)
    if not cfg.is_sparse:
        raise SparseConfigError(f"{spec!r} is not a sparse config: nothing to trace")
    return cfg if "min_context" in spec.partition(":")[2] else cfg.replace(min_context=0)


def trace_instance(model, tok, task: str, length: int, depth: float, seed: int, cfg: SparseConfig,
                   max_new_tokens: int | None = None, trace: SelectionTrace | None = None,
                   keep_logits: bool = False) -> dict:
    """Dense and traced sparse greedy runs of one instance: ``instance``, ``needles``, ``dense``, ``sparse``
    (:func:`generate`'s dicts), ``trace`` (the observer: ``trace`` or a new :class:`SelectionTrace`), ``stats``,
    ``seconds``."""
    count = tasks.token_counter(tok)
    inst = tasks.make_task(task, length, depth, seed, count)
    n_new = max_new_tokens or accuracy.MAX_NEW_TOKENS.get(task, 24)
    t0 = time.time()
    dense = generate(model, tok, inst.prompt, n_new, keep_logits)
    trace = SelectionTrace() if trace is None else trace
    with sparse_attention(model, cfg, observer=trace) as stats:
        sparse = generate(model, tok, inst.prompt, n_new, keep_logits)
    return dict(instance=inst, needles=locate_needles(tok, task, inst.prompt, inst.answers, cfg.page_size),
                prompt_tokens=count(inst.prompt), dense=dense, sparse=sparse, trace=trace, stats=stats,
                seconds=time.time() - t0)


def report(run: dict, step: int | None = None, worst: int = 12) -> dict:
    """The summaries (what ``--out`` writes) and their text on stdout."""
    inst, trace, needles, dense, sparse = run["instance"], run["trace"], run["needles"], run["dense"], run["sparse"]
    if not trace.records:
        raise SystemExit("no sparse selection was recorded (every decode step fitted the budget, or no decode step)")
    step = trace.steps[-1] if step is None else step
    if step not in trace.steps:
        raise SystemExit(f"--step {step}: recorded steps are {trace.steps[0]}..{trace.steps[-1]}")
    cfg = trace.config
    steps, heads = step_table(trace, needles), head_table(trace, step)
    diverge = next((i for i, (a, b) in enumerate(zip(dense["tokens"], sparse["tokens"])) if a != b), None)
    pairs = len(trace.layers) * trace.records[(trace.steps[0], trace.layers[0])].mass.shape[0]
    print(f"{inst.task} length {inst.length} depth {inst.depth} ({run['prompt_tokens']} prompt tokens), "
          f"{cfg.method} budget {cfg.token_budget} ({cfg.top_k_pages} pages of {cfg.page_size}), "
          f"{len(trace.layers)} sparse layers x {pairs // len(trace.layers)} KV heads = {pairs} pairs, "
          f"{run['seconds']:.0f} s")
    print(f"score dense {inst.score(dense['text'])} {dense['text']!r}")
    print(f"score {cfg.method} {inst.score(sparse['text'])} {sparse['text']!r}; first divergence at token "
          f"{diverge}")
    for nd in needles:
        print(f"needle {nd['value']}#{nd['occurrence']}: tokens {nd['tokens'][0]}..{nd['tokens'][-1]}, "
              f"pages {nd['pages']}")
    print("\nper step: pairs missing each needle's pages (some/all), flips vs the previous step (pages/pairs), "
          "mass kept mean/min: actual | 2x budget | union of last 2 | last 4")
    for row in steps:
        s = row["step"]
        tok = repr(sparse["pieces"][s]) if s < len(sparse["pieces"]) else "-"
        miss = " ".join(f"{n['value'][:8]}#{n['occurrence']}:{n['missed']}/{n['missed_all']}"
                        for n in row["needles"])
        k = row["kept"]
        cfs = " | ".join("-" if k[c] is None else f"{k[c]['mean']:.3f}/{k[c]['min']:.2f}"
                         for c in ("kept", "budget_x2", *(f"union_{R}" for R in UNIONS)))
        mark = "  <= divergence" if s == diverge else ""
        print(f"step {s:3d} {tok:10} {miss}  flips {row['flips_pages']:4d}/{row['flips_pairs']:3d}  {cfs}{mark}")
    print(f"\nstep {step}: per (layer, KV head), least mass kept first (recall of the true top-{TOP} pages; kept: "
          f"group mean, worst q head; 2x budget; union of last 2, 4)")
    mean_recall = sum(h["recall_top10"] for h in heads) / len(heads)
    for h in heads[:worst]:
        cf = " ".join("-" if h[c] is None else f"{h[c]:.3f}" for c in ("budget_x2", "union_2", "union_4"))
        print(f"L{h['layer']:2d} h{h['head']}  recall {h['recall_top10']:.1f}  kept {h['kept']:.3f} "
              f"worst-q {h['kept_worst_q_head']:.3f}  cf {cf}  missed top pages {h['missed_top'][:5]} "
              f"(mass {h['missed_top_mass']:.3f})")
    print(f"mean recall of the top-{TOP} pages at step {step}: {mean_recall:.3f}")
    print("\nmargins (top-1 minus top-2 logit) per generated token: dense | sparse")
    for i, (dt, st) in enumerate(zip(dense["pieces"], sparse["pieces"])):
        dm, sm = dense["margins"][i], sparse["margins"][i]
        mark = "  <= divergence" if i == diverge else ""
        print(f"token {i:3d} {dt!r:10} {dm:7.3f} | {st!r:10} {sm:7.3f}{mark}")
    return dict(task=inst.task, length=inst.length, depth=inst.depth, prompt_tokens=run["prompt_tokens"],
                config=cfg.to_dict(), answers=inst.answers, needles=needles,
                dense=dict(text=dense["text"], score=inst.score(dense["text"]), pieces=dense["pieces"],
                           margins=dense["margins"]),
                sparse=dict(text=sparse["text"], score=inst.score(sparse["text"]), pieces=sparse["pieces"],
                            margins=sparse["margins"], attended_fraction=run["stats"].attended_fraction),
                first_divergence=diverge, steps=steps, head_step=step, heads=heads, mean_recall_top10=mean_recall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen05b", choices=sorted(models.MODELS))
    ap.add_argument("--task", default="niah_multivalue", choices=tasks.TASKS)
    ap.add_argument("--length", type=int, default=16384, help="prompt length in tokens")
    ap.add_argument("--depth", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="quest", help="a sparse preset, optionally with inline overrides "
                    "(quest:token_budget=4096)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generated tokens (default: the accuracy evaluation's for the task)")
    ap.add_argument("--step", type=int, default=None, help="decode step of the per-head table (default the last)")
    ap.add_argument("--worst", type=int, default=12, help="heads printed in the per-head table")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, help="summaries as JSON")
    ap.add_argument("--pages-out", type=Path, help="per-page tensors (torch.save)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except SparseConfigError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    model, tok = models.load_model(args.model)
    run = trace_instance(model, tok, args.task, args.length, args.depth, args.seed, cfg, args.max_new_tokens)
    summary = report(run, args.step, args.worst)
    summary.update(model=args.model, seed=args.seed, config_spec=args.config)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    if args.pages_out:
        args.pages_out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(run["trace"].tensors(), args.pages_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
