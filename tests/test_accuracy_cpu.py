"""CPU smoke of the accuracy path on the real SmolLM2-135M-Instruct (downloaded from PyPI, converted once).

Short passkey retrievals: dense and a sparse preset attending ~1/6 of the context must both answer correctly.
The sglang path's pieces that need no server (sgl_sparse.accuracy): reading the attended fraction from meta info,
the frontend program through SGLang's real run_batch on a stand-in backend, and the server command lines.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from sgl_sparse import models, tasks  # noqa: E402
from sgl_sparse.config import SparseConfig  # noqa: E402
from sgl_sparse.hf_sparse import sparse_attention  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return models.load_model("smollm2")


def test_converted_model_answers_a_simple_question(smollm2):
    model, tok = smollm2
    answer = models.greedy(model, tok, models.chat_prompt(tok, "What is the capital of France? Answer in one word."))
    assert "paris" in answer.lower()


@pytest.mark.parametrize("depth", [0.25, 0.7])
def test_passkey_dense_and_quest(smollm2, depth):
    model, tok = smollm2
    count = tasks.token_counter(tok)
    inst = tasks.make_task("passkey", 800, depth, 3, count)
    dense = models.greedy(model, tok, inst.prompt, 8)
    assert inst.score(dense) == 1.0, dense
    cfg = SparseConfig.load("quest").replace(token_budget=128, min_context=0)
    with sparse_attention(model, cfg) as stats:
        sparse = models.greedy(model, tok, inst.prompt, 8)
    assert inst.score(sparse) == 1.0, sparse
    assert 0 < stats.attended_fraction < 0.25          # it really was sparse
    sparse_layers = model.config.num_hidden_layers - cfg.dense_layers
    assert stats.attended and len(stats.attended) % sparse_layers == 0   # every decode step, every sparse layer


def test_selection_reuse_with_the_drift_test_keeps_the_passkey(smollm2):
    """quest-fast at 1/6 of a 6K-token passkey prompt: the answer holds the passkey, most planned reuses serve and
    the drift test selected again where the query moved (on this instance, reuse without it answers '525' for
    52558: the selection made for the first digit lacks what the fourth one attends)."""
    model, tok = smollm2
    count = tasks.token_counter(tok)
    inst = tasks.make_task("passkey", 6000, 0.1, 0, count)
    cfg = SparseConfig.load("quest-fast").replace(token_budget=1024, min_context=1024)
    with sparse_attention(model, cfg) as stats:
        answer = models.greedy(model, tok, inst.prompt, 8)
    assert inst.score(answer) == 1.0, answer
    assert stats.planned_reuses > 0 and 0 < stats.drift_selections < 0.5 * stats.planned_reuses, \
        (stats.planned_reuses, stats.drift_selections)


def test_vattention_error_rate_on_real_attention(smollm2):
    """vAttention's (epsilon, delta) on the model's real q/k/v: the fraction of decode attention outputs whose
    relative error vs dense exceeds epsilon stays within delta (+3 binomial standard errors)."""
    model, tok = smollm2
    count = tasks.token_counter(tok)
    inst = tasks.make_task("passkey", 800, 0.5, 4, count)
    cfg = SparseConfig.load("vattention").replace(token_budget=128, min_context=0, epsilon=0.1, delta=0.05)
    with sparse_attention(model, cfg, measure_error=True) as stats:
        out = models.greedy(model, tok, inst.prompt, 6)
    n = sum(e.numel() for e in stats.errors)
    assert n > 500
    assert stats.violation_rate <= cfg.delta + 3 * (cfg.delta * (1 - cfg.delta) / n) ** 0.5
    assert inst.score(out) == 1.0
    assert stats.attended_fraction < 1.0


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp writes Q/K rows permuted for its rotary layout (convert_hf_to_gguf.py's ``permute``);
    ``unpermute_llama`` must restore Hugging Face's order exactly."""
    import numpy as np

    n_head, head_dim, hidden = 3, 8, 5
    w = np.arange(n_head * head_dim * hidden, dtype=np.float32).reshape(n_head * head_dim, hidden)
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(models.unpermute_llama(permuted, n_head), w)


# ----------------------------------------------------------------------------- sglang path, without a server

def test_attended_fraction_from_meta():
    from sgl_sparse.accuracy import attended_fraction_from_meta as frac

    assert frac({"sparse_attended_fraction": [1.0, 0.4, 0.25]}) == 0.25      # last = running mean of the decode
    assert frac({"sparse_attended_fraction": 0.3}) == 0.3
    assert frac({"prompt_tokens": 10}) == 1.0                                # dense server: no key
    assert frac({"sparse_attended_fraction": []}, default=0.5) == 0.5
    assert frac(None) == 1.0


def test_frontend_program_plumbing():
    """run_frontend through SGLang's real frontend (sgl.function + run_batch) on a stand-in backend: every prompt
    is sent once, with its task's max_tokens and temperature 0, and text and meta info come back in order."""
    pytest.importorskip("sglang")
    import threading

    from sglang.lang.backend.base_backend import BaseBackend

    from sgl_sparse import accuracy

    class Echo(BaseBackend):
        def __init__(self):
            super().__init__()
            self.calls, self.lock = [], threading.Lock()

        def generate(self, s, sampling_params):
            with self.lock:
                self.calls.append((s.text_, sampling_params.max_new_tokens, sampling_params.temperature))
            return f"<{s.text_[-12:]}>", {"sparse_attended_fraction": [1.0, len(s.text_) / 1e6]}

    count = lambda s: len(s.split())  # noqa: E731
    insts = [tasks.make_task(t, 200 + 50 * i, 0.5, 0, count) for i, t in enumerate(["passkey", "vt", "niah_single_2",
                                                                                      "cwe", "niah_single_1"])]
    backend = Echo()
    outs = accuracy.run_frontend(backend, insts, concurrency=3)
    assert sorted(backend.calls) == sorted((i.prompt, accuracy.MAX_NEW_TOKENS.get(i.task, 24), 0) for i in insts)
    for inst, (text, meta) in zip(insts, outs):
        assert text == f"<{inst.prompt[-12:]}>"
        assert accuracy.attended_fraction_from_meta(meta) == len(inst.prompt) / 1e6


def test_server_commands(tmp_path):
    """Each config's launch_server command parses with SGLang's own parser (plugin loaded, in a subprocess): the
    backend, the config file, page size (the config's, or the one asked for: 8-token selection inside 16-token
    pages) and the shared flags; past the model's limit the override env is set."""
    pytest.importorskip("sglang")
    import json
    import os
    import subprocess
    import sys

    from sgl_sparse import accuracy

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert accuracy.context_length_for(tmp_path, 8000) == (8000, {})
    assert accuracy.context_length_for(tmp_path, 8201) == (8208, {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"})
    cmds = {}
    for cfg in accuracy.configs_for(["quest", "vattention"], [256]):
        name = accuracy.config_name(cfg)
        server = accuracy.server_for(tmp_path, cfg, name=name, config_dir=tmp_path,
                                     extra_args=[*accuracy.SERVER_ARGS, "--context-length", "8208"])
        cmds[name] = server.cmd[3:]
        if cfg.is_sparse:
            assert SparseConfig.load(str(tmp_path / f"{name}.yaml")) == cfg
    page8 = accuracy.configs_for(["quest"], [256], page_size=8)
    for cfg in page8:
        name = "p16_" + accuracy.config_name(cfg)
        cmds[name] = accuracy.server_for(tmp_path, cfg, name=name, config_dir=tmp_path, page_size=16,
                                         extra_args=[*accuracy.SERVER_ARGS, "--context-length", "8208"]).cmd[3:]
    cmds["p8_quest_256"] = accuracy.server_for(tmp_path, page8[1], name="p8_quest_256", config_dir=tmp_path,
                                               extra_args=[*accuracy.SERVER_ARGS, "--context-length", "8208"]).cmd[3:]
    with pytest.raises(ValueError, match="not a multiple of p12.s page"):
        accuracy.server_for(tmp_path, page8[1], name="p12", config_dir=tmp_path, page_size=12)
    code = f"""
import argparse, json
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import ServerArgs
out = {{}}
for name, argv in {json.dumps(cmds)}.items():
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    ns = p.parse_args(argv)
    out[name] = [ns.attention_backend, getattr(ns, "sparse_config", None), ns.page_size, ns.context_length,
                 ns.cuda_graph_max_bs_decode, ns.max_running_requests, str(ns.cuda_graph_backend_prefill)]
print("RESULT" + json.dumps(out))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=root))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(line[0][len("RESULT"):])
    common = [8208, 16, 16, "disabled"]
    assert out["dense"] == ["flashinfer", None, 16] + common
    for name in ("quest_256", "vattention_256"):
        assert out[name] == ["sgl_sparse", str(tmp_path / f"{name}.yaml"), 16] + common
    assert out["p16_dense"] == ["flashinfer", None, 16] + common
    assert out["p16_quest_256"] == ["sgl_sparse", str(tmp_path / "p16_quest_256.yaml"), 16] + common
    assert out["p8_quest_256"] == ["sgl_sparse", str(tmp_path / "p8_quest_256.yaml"), 8] + common
    assert SparseConfig.load(str(tmp_path / "p16_quest_256.yaml")).page_size == 8


def _tokenizers():
    from transformers import AutoTokenizer

    out = [("smollm2", AutoTokenizer.from_pretrained(str(models.prepare_model("smollm2"))))]
    qwen = models.cache_dir() / "models" / "qwen05b"          # only if already converted (491 MB download)
    if (qwen / "tokenizer.json").exists():
        out.append(("qwen05b", AutoTokenizer.from_pretrained(str(qwen))))
    return out


@pytest.mark.parametrize("task", tasks.TASKS)
def test_answers_fit_in_the_generation_budget(task):
    """Every expected answer, spelled out, fits in the tokens the task may generate (prompts end in an answer
    prefix, so the answer comes first).
    A UUID answer cut at 24 Qwen tokens once scored niah_single_3 at 0 for every method, dense included."""
    from sgl_sparse import accuracy

    budget = accuracy.MAX_NEW_TOKENS.get(task, 24)
    for name, tok in _tokenizers():
        count = tasks.token_counter(tok)
        for seed in range(4):
            inst = tasks.make_task(task, 1024, 0.5, seed, count)
            answer = " " + ", ".join(inst.answers) + "."
            assert count(answer) + 1 <= budget, (name, task, answer, count(answer), budget)


def test_measured_error_is_zero_at_full_budget_and_positive_below(smollm2):
    """``measure_error`` compares each sparse decode attention with dense on the same q/k/v: exactly dense when
    the budget covers the context, a real error when it does not."""
    from sgl_sparse import accuracy

    full = SparseConfig.load("quest").replace(token_budget=1024, min_context=0, dense_layers=0)
    small = full.replace(token_budget=96)
    res = accuracy.evaluate("smollm2", ["passkey"], [400], [0.5], [full, small], seed=5, measure_error=True)
    by_budget = {r.budget: r for r in res}
    assert by_budget[1024].mean_error < 1e-5, by_budget[1024].mean_error
    assert by_budget[96].mean_error > 1e-3, by_budget[96].mean_error
    assert by_budget[96].violation_rate is None                    # a vAttention figure only
