"""``python -m sgl_sparse.warmup``: per-rank shapes from a model's config.json, and a clear exit without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_sparse.warmup import attention_shape

LLAMA = Path(__file__).resolve().parents[1] / "launch" / "models" / "llama-3.1-8b"


def test_shape_per_rank_like_sglang(tmp_path):
    assert attention_shape(LLAMA) == dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    assert attention_shape(LLAMA, tp=2)["num_kv_heads"] == 4
    # Qwen2.5-0.5B-like: 14 query heads, 2 KV heads, no head_dim field (hidden / heads)
    (tmp_path / "config.json").write_text(json.dumps(dict(num_attention_heads=14, num_key_value_heads=2,
                                                          hidden_size=896, torch_dtype="bfloat16")))
    assert attention_shape(tmp_path, tp=2) == dict(num_qo_heads=7, num_kv_heads=1, head_dim=64, dtype="bfloat16")
    with pytest.raises(ValueError, match="do not divide"):
        attention_shape(tmp_path, tp=4)
    with pytest.raises(ValueError, match="no config.json"):
        attention_shape(tmp_path / "nowhere")
    # more ranks than KV heads: each rank keeps one (replicated), as SGLang does
    (tmp_path / "config.json").write_text(json.dumps(dict(num_attention_heads=16, num_key_value_heads=2,
                                                          hidden_size=1024, torch_dtype="float16")))
    assert attention_shape(tmp_path, tp=4) == dict(num_qo_heads=4, num_kv_heads=1, head_dim=64, dtype="float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_without_gpu_says_so():
    p = subprocess.run([sys.executable, "-m", "sgl_sparse.warmup", "--model-path", str(LLAMA)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr


def test_bad_model_path_names_the_fix(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sgl_sparse.warmup", "--model-path", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no config.json" in p.stderr and "--model-path" in p.stderr
