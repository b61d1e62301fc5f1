#!/usr/bin/env python3
"""Are a config's missed needle values the ones that straddle a page boundary?

For every needle value of the retrieval tasks in accuracy result files (``launch/eval_accuracy.py`` output, server
or CPU path), rebuilds the instance's prompt, finds the value's tokens with the model's tokenizer, and counts, per
config, how often a value is missing from the answer when its tokens cross a ``--page``-token boundary and when
they lie inside one page. If page-level selection lost values by keeping only one of their two pages, the first
rate would be the higher.

    python launch/needle_boundaries.py launch/results/accuracy_at_size_h200.json \
        launch/results/accuracy_quest_variants_h200.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_sparse import models, tasks  # noqa: E402
from selection_trace import overlapping_tokens  # noqa: E402  (launch/, this script's folder)

RETRIEVAL = ("niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue", "niah_multiquery")


def value_spans(tok, inst) -> list[tuple[int, int] | None]:
    """(first, last) token index of each answer value in the prompt (``None`` if it is not found as a needle)."""
    enc = tok(inst.prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for v in inst.answers:
        start = inst.prompt.find(": " + v + ".")
        if start < 0:
            spans.append(None)
            continue
        a, b = start + 2, start + 2 + len(v)
        toks = overlapping_tokens(enc["offset_mapping"], a, b)
        spans.append((toks[0], toks[-1]))
    return spans


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="eval_accuracy result files")
    ap.add_argument("--page", type=int, default=16, help="page size of the boundaries (tokens)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    counts: dict = collections.defaultdict(collections.Counter)
    instances: dict = {}
    tokenizers: dict = {}
    for path in args.results:
        data = json.loads(path.read_text())
        model = data["args"]["model"]
        if model not in tokenizers:
            tokenizers[model] = AutoTokenizer.from_pretrained(str(models.prepare_model(model)))
        tok = tokenizers[model]
        count = tasks.token_counter(tok)
        for r in data["results"]:
            if r["task"] not in RETRIEVAL:
                continue
            key = (model, r["task"], r["length"], r["depth"], r["seed"])
            if key not in instances:
                inst = tasks.make_task(r["task"], r["length"], r["depth"], r["seed"], count)
                instances[key] = (inst, value_spans(tok, inst))
            inst, spans = instances[key]
            for value, span in zip(inst.answers, spans):
                if span is not None:
                    straddles = span[0] // args.page != span[1] // args.page
                    counts[(path.stem, r["config"])][(straddles, value.lower() in r["output"].lower())] += 1
    print(f"needle values missed, by whether their tokens cross a {args.page}-token page boundary")
    for (name, config), c in counts.items():
        cross, inside = c[(True, True)] + c[(True, False)], c[(False, True)] + c[(False, False)]
        missed_cross, missed_inside = c[(True, False)], c[(False, False)]
        print(f"{name:34s} {config:42s} crossing {missed_cross:3d}/{cross:<3d} ({missed_cross / max(1, cross):.2f})"
              f"   inside {missed_inside:3d}/{inside:<3d} ({missed_inside / max(1, inside):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
