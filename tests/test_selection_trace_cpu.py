"""launch/selection_trace.py on the real SmolLM2-135M-Instruct (CPU path): what the observer records is the
selection the model attended, its dense page masses are the softmax of the same q and K, the needle is located on
the right pages, and observing changes nothing the model computes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import selection_trace as st  # noqa: E402
from sgl_sparse import models  # noqa: E402
from sgl_sparse.hf_sparse import SelectionEvent, sparse_attention  # noqa: E402

TASK = ("passkey", 800, 0.4, 0)      # ~800 tokens: 50 pages of 16
NEW = 4
SMALL = "quest:token_budget=128"


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return models.load_model("smollm2")


@pytest.fixture(scope="module")
def small(smollm2):
    """quest at 128 tokens (8 pages of ~50): most pages unselected. Also keeps, for one (step, layer), the q and K
    the selection saw, to recompute the page masses independently, and the logits."""
    model, tok = smollm2
    seen = {}

    class Keep(st.SelectionTrace):
        def __call__(self, e: SelectionEvent) -> None:
            super().__call__(e)
            if (e.step, e.layer) == (2, 5):
                seen.update(q=e.q.clone(), keys=e.keys.clone(), scale=e.scale)

    run = st.trace_instance(model, tok, *TASK, st.load_config(SMALL), NEW, trace=Keep(), keep_logits=True)
    return run, seen


def _pages_tokens(r: st.PageRecord, P: int) -> torch.Tensor:
    """Tokens attended per KV head from a record's selection (the last page may be partial)."""
    n = r.selected.shape[1]
    size = torch.full((n,), P)
    size[-1] = r.length - (n - 1) * P
    return (r.selected * size).sum(-1)


def test_budget_covering_the_context_selects_every_page(smollm2):
    model, tok = smollm2
    run = st.trace_instance(model, tok, *TASK, st.load_config("quest:token_budget=2048"), NEW)
    trace = run["trace"]
    sparse_layers = model.config.num_hidden_layers - trace.config.dense_layers
    assert trace.steps == list(range(1, len(run["sparse"]["tokens"])))
    assert len(trace.records) == len(trace.steps) * sparse_layers
    for r in trace.records.values():
        assert r.selected.all() and not r.scored
        assert torch.allclose(r.mass.sum(-1), torch.ones(r.mass.shape[0]), atol=1e-4)
    heads = st.head_table(trace, trace.steps[-1])
    assert len(heads) == sparse_layers * model.config.num_key_value_heads
    assert all(h["recall_top10"] == 1.0 and abs(h["kept"] - 1) < 1e-4 and abs(h["kept_worst_q_head"] - 1) < 1e-4
               for h in heads)
    assert run["sparse"]["tokens"] == run["dense"]["tokens"]          # it attended everything: dense's answer


def test_small_budget_leaves_pages_out_and_records_what_was_attended(small, smollm2):
    model, _ = smollm2
    run, _ = small
    trace, stats, cfg = run["trace"], run["stats"], run["trace"].config
    assert cfg.top_k_pages == 8
    records = [trace.records[k] for k in sorted(trace.records)]
    # the recorded selection is what the layer attended: the same token counts as the path's own statistics
    attended = [float(_pages_tokens(r, cfg.page_size).float().mean()) / r.length for r in records]
    assert attended == pytest.approx(stats.attended, abs=1e-6)
    for r in records:
        assert r.scored and (r.selected.sum(-1) == cfg.top_k_pages).all()
        assert r.selected[:, :cfg.sink_pages].all() and r.selected[:, -cfg.local_pages:].all()
    heads = st.head_table(trace, trace.steps[-1])
    assert min(h["kept"] for h in heads) < 0.9 and all(h["kept"] < 1 for h in heads)
    assert min(h["recall_top10"] for h in heads) < 1.0
    assert heads == sorted(heads, key=lambda h: h["kept"])
    # counterfactuals hold supersets of the selection: never less mass
    for h in heads:
        assert h["budget_x2"] >= h["kept"] - 1e-6 and h["union_2"] >= h["kept"] - 1e-6
        assert h["union_4"] >= h["union_2"] - 1e-6
    rows = st.step_table(trace, run["needles"])
    assert rows[0]["flips_pages"] == 0 and sum(r["flips_pages"] for r in rows[1:]) > 0
    summary = st.report(run)                                          # prints; JSON-serializable
    assert json.loads(json.dumps(summary))["head_step"] == trace.steps[-1]
    assert len(summary["sparse"]["margins"]) == len(run["sparse"]["tokens"])


def test_page_mass_is_the_softmax_of_the_q_and_k_the_selection_saw(small):
    run, seen = small
    r = run["trace"].records[(2, 5)]
    q, keys, P = seen["q"].float(), seen["keys"].float(), run["trace"].config.page_size
    HK, G = keys.shape[1], q.shape[0] // keys.shape[1]
    # per query head, its KV head's keys (qh // G), softmax over the context; then summed per page of P tokens
    probs = torch.stack([torch.softmax(seen["scale"] * keys[:, qh // G] @ q[qh], 0) for qh in range(q.shape[0])])
    n = r.mass.shape[1]
    per_page = torch.stack([probs[:, j * P:(j + 1) * P].sum(-1) for j in range(n)], -1)   # [HQ, n]
    want = per_page.view(HK, G, n).mean(1)
    assert torch.allclose(r.mass, want, atol=1e-5)
    worst = (per_page.view(HK, G, n) * r.selected[:, None]).sum(-1).amin(1)
    assert torch.allclose(r.kept_min_head, worst, atol=1e-5)
    assert r.length == keys.shape[0] == run["prompt_tokens"] + 2      # step 2: prompt + generated tokens 0, 1


def test_needle_pages_hold_the_value(small, smollm2):
    _, tok = smollm2
    run, _ = small
    inst, P = run["instance"], run["trace"].config.page_size
    ids = tok(inst.prompt, add_special_tokens=False).input_ids
    key = inst.answers[0]
    needles = run["needles"]
    assert [n["occurrence"] for n in needles] == [1, 2] and {n["value"] for n in needles} == {key}
    for n in needles:
        assert n["pages"] == sorted({t // P for t in n["tokens"]})
        assert key in tok.decode(ids[n["tokens"][0]:n["tokens"][-1] + 1])
        text = tok.decode(ids[n["pages"][0] * P:(n["pages"][-1] + 1) * P])
        assert key in text
    assert st.locate_needles(tok, "cwe", inst.prompt, inst.answers, P) == []


def test_observer_changes_nothing(small, smollm2):
    """The traced run's logits equal those of a run without an observer, bit for bit."""
    model, tok = smollm2
    run, _ = small
    with sparse_attention(model, st.load_config(SMALL)) as stats:
        plain = st.generate(model, tok, run["instance"].prompt, NEW, keep_logits=True)
    assert stats.observer is None and run["stats"].observer is run["trace"]
    assert run["trace"].records
    assert run["sparse"]["tokens"] == plain["tokens"]
    assert len(plain["logits"]) == NEW and all(torch.equal(a, b) for a, b in zip(run["sparse"]["logits"],
                                                                                   plain["logits"]))
    assert run["stats"].attended == stats.attended
