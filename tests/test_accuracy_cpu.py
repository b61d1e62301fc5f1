"""CPU smoke of the accuracy path on the real SmolLM2-135M-Instruct (downloaded from PyPI, converted once).

Short passkey retrievals: dense and a sparse preset attending ~1/6 of the context must both answer correctly.
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
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
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


def test_vattention_error_rate_on_real_attention(smollm2):
    """vAttention's (epsilon, delta) on the model's real q/k/v: the fraction of decode attention outputs whose
    relative error vs dense exceeds epsilon stays within delta (+3 binomial standard errors)."""
    model, tok = smollm2
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
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
