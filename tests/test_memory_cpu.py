"""The backend's memory outside the per-token side tables: what the operator allocates, and SGLang's KV pool sized
without it (CPU; the real operator code, the real SGLang 0.5.17 pool sizing).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sgl_sparse.config import SparseConfig
from sgl_sparse.decode import (EAGER_BATCH_SIZES, FLASHINFER_INT_WORKSPACE_BYTES, FLASHINFER_PINNED_INT_WORKSPACE,
                               WORKSPACE_BYTES, SparseDecodeOperator, allocated_bytes, held_batch_sizes)

METHODS = ["dense", "quest", "twilight", "vattention", "quest-fast", "quest-fast:reselect_min_cosine=-1",
           "twilight:page_size=8,coarse_page_tokens=16"]


def _reachable_tensors(obj) -> dict[int, torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, containers and this package's objects, one per
    storage (views count once)."""
    found, seen, stack = {}, set(), [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.untyped_storage().nbytes():
                found[x.untyped_storage().data_ptr()] = x
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif type(x).__module__.startswith("sgl_sparse") and hasattr(x, "__dict__"):
            stack.extend(vars(x).values())
    return found


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("graph_batch", [0, 6, 16])
def test_fixed_bytes_match_what_the_operator_allocates(method, graph_batch):
    """Built on CPU and laid out for every held batch size (the index buffers its wrappers plan into are real
    tensors here), the operator holds exactly the bytes ``fixed_bytes`` counts besides the FlashInfer wrappers;
    those are one per layout entry, each its int workspace and a few int32 per row."""
    cfg = SparseConfig.load(method)
    args = dict(num_qo_heads=8, num_kv_heads=2, head_dim=64, num_layers=4, max_batch=16, max_context=3000,
                dtype=torch.bfloat16, max_requests=17, graph_batch=graph_batch)
    captured = [b for b in (1, 2, 4, 6, 8, 16) if b <= graph_batch]
    sizes = held_batch_sizes(captured, args["max_batch"])
    parts = SparseDecodeOperator.fixed_bytes(cfg, **args, batch_sizes=sizes)

    op = SparseDecodeOperator(cfg, **args, device="cpu")
    layouts = {B: op._layout(B) for B in sizes}               # what _buffers(B) builds the wrappers from
    held = _reachable_tensors(op)
    assert sum(allocated_bytes(t.untyped_storage().nbytes()) for t in held.values()) == \
        sum(parts.values()) - parts["wrappers"]
    assert parts["workspace"] == WORKSPACE_BYTES
    kept = op.reuse.tensors() if op.reuse is not None else []
    assert parts["kept selections"] == sum(allocated_bytes(t.nbytes) for t in kept)
    assert (parts["kept selections"] > 0) == (cfg.is_sparse and cfg.reselect_every > 1)
    beyond = any(B > graph_batch for B in sizes)
    assert (parts["eager index buffers"] > 0) == (beyond and cfg.is_sparse)
    assert (parts["graph index buffers"] > 0) == (graph_batch > 0)
    if graph_batch:                                           # the dense pass's indices: graph_batch x max_context
        assert op._index_buffers["dense"][1].numel() == graph_batch * args["max_context"]

    per_size = {"dense": 1, "quest": 3, "twilight": 3, "vattention": 4}[cfg.method]
    assert all(len(layout) == per_size for layout in layouts.values())
    # one FlashInfer int workspace per wrapper role, whatever the number of batch sizes
    assert parts["int workspaces"] == per_size * FLASHINFER_INT_WORKSPACE_BYTES
    for role in layouts[sizes[0]]:
        assert len({layout[role].int_workspace.data_ptr() for layout in layouts.values()}) == 1
    assert len({w.int_workspace.data_ptr() for w in layouts[sizes[0]].values()}) == per_size
    wrappers = per_size * len(sizes)
    rows = sum(B * (1 if w.page_size is None else args["num_kv_heads"]) for B, layout in layouts.items()
               for w in layout.values())
    assert parts["wrappers"] <= wrappers * (2 * 512 + 4) + 8 * rows


def test_held_batch_sizes_are_the_captured_and_the_largest_eager():
    assert held_batch_sizes([1, 2, 4, 8], 64) == [1, 2, 4, 8, 61, 62, 63, 64]
    assert held_batch_sizes([1, 2, 4, 8], 8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert held_batch_sizes([], 3) == [1, 2, 3]
    assert len(held_batch_sizes([1, 2], 1000)) == 2 + EAGER_BATCH_SIZES
    with pytest.raises(ValueError, match="max_batch"):
        SparseDecodeOperator.fixed_bytes(SparseConfig.load("quest"), num_qo_heads=8, num_kv_heads=2, head_dim=64,
                                         num_layers=2, max_batch=4, max_context=100, batch_sizes=[8])


def test_wrapper_bytes_follow_flashinfer():
    """What the operator counts for a wrapper is what FlashInfer's decode wrapper holds on the device: an int
    workspace (its role's, given with reset_workspace_buffer, counted once per role) and ``qo_indptr`` (fixed batch
    size + 1, int32) when built for CUDA graphs with tensor cores."""
    from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper

    src = inspect.getsource(BatchDecodeWithPagedKVCacheWrapper.__init__)
    assert "self._int_workspace_buffer = torch.empty(\n            (8 * 1024 * 1024,), dtype=torch.uint8, " \
           "device=self.device" in src
    assert FLASHINFER_INT_WORKSPACE_BYTES == 8 * 1024 * 1024
    assert "self._qo_indptr_buf = torch.arange(\n                    self._fixed_batch_size + 1," in src
    # the operator hands each wrapper its role's int workspace; FlashInfer then holds that one instead of its own
    reset = inspect.getsource(BatchDecodeWithPagedKVCacheWrapper.reset_workspace_buffer)
    assert "self._int_workspace_buffer = int_workspace_buffer" in reset
    # ... and its role's page-locked staging copy, which plan() writes the work list into (host memory)
    assert f"self.{FLASHINFER_PINNED_INT_WORKSPACE} = torch.empty(" in reset
    plan = inspect.getsource(BatchDecodeWithPagedKVCacheWrapper._plan_impl)        # what plan() runs
    assert f"self._int_workspace_buffer,\n                self.{FLASHINFER_PINNED_INT_WORKSPACE}," in plan


SGLANG_POOL = """
import json, logging, os, sys, torch
from types import SimpleNamespace
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import ServerArgs
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.runtime_context import publish, get_parallel
from sglang.srt.distributed.parallel_state_wrapper import ParallelState
from sglang.srt.mem_cache import kv_cache_configurator as kcm
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator
from sglang.srt.model_executor.model_runner_components.layer_setup import ModelLayerInfo
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sgl_sparse import sglang_backend as sb

FREE_GIB, PRE_GIB = 10.0, 12.0
# the two things a CPU lacks: the GPU's free memory (a fixed figure here) and the process group
kcm.get_available_gpu_memory = lambda *a, **k: FREE_GIB
kcm.get_world_group = lambda: SimpleNamespace(world_size=1, cpu_group=None)
out = {"padding_rows": ReqToTokenPool(size=5, max_context_len=8, device="cpu",
                                      enable_memory_saver=False).req_to_token.shape[0] - 5}
for name, backend, extra in CASES:
    os.environ.pop("SGL_SPARSE_CONFIG", None)
    sa = ServerArgs(model_path=MODEL, attention_backend=backend, page_size=16, device="cuda", **extra)
    publish(sa, role="test")
    mc = ModelConfig.from_server_args(sa)
    with get_parallel().override(attn_tp_size=1, attn_cp_size=1, attn_dp_size=1, pp_size=1, tp_size=1):
        kvc = kcm.KVCacheConfigurator(
            device="cuda", gpu_id=0, ps=ParallelState.trivial(), pp_group=None, model=None, model_config=mc,
            server_args=sa, kv_cache_dtype=torch.bfloat16, model_dtype=torch.bfloat16, page_size=16,
            sliding_window_size=None, spec_algorithm=SpeculativeAlgorithm.NONE, is_draft_worker=False,
            post_capture_kv_active=False, spec_aux_config=None, is_hybrid_swa=False, is_hybrid_swa_compress=False,
            use_mla_backend=False, layer_info=ModelLayerInfo(start_layer=0, end_layer=mc.num_hidden_layers,
                                                             num_effective_layers=mc.num_hidden_layers),
            forward_stream=None, req_to_token_pool=None, token_to_kv_pool_allocator=None, memory_pool_config=None)
        raw = int((FREE_GIB - PRE_GIB * (1 - sa.mem_fraction_static)) * (1 << 30))
        pool = kvc._resolve_memory_pool_config(PRE_GIB)      # the hooked budget, then SGLang's own sizing
        case = {"raw": raw, "budget": kvc._profile_available_bytes(PRE_GIB), "tokens": pool.max_total_num_tokens,
                "reqs": pool.max_running_requests, "cell": create_memory_pool_configurator(kvc)._cell_size}
        if backend == "sgl_sparse":
            slots = kvc.resolve_max_num_reqs(kvc.config_from_budget(raw).max_total_num_tokens)
            case["slots"] = slots
            case["parts"] = sb.fixed_memory(sa, mc, sb.config_from_env(), slots, torch.bfloat16)
            case["sizes"] = sb.captured_decode_sizes(sa, slots)
            case["graph_batch"] = sb.captured_decode_batch(sa, slots)
        out[name] = case
print("RESULT" + json.dumps(out))
"""


def test_pool_budget_hook_takes_the_fixed_bytes_out_of_the_pool(tmp_path):
    """SGLang's real KV-pool sizing with the plugin's hooks applied (a tiny Llama config; the GPU's free memory a
    fixed figure): with --attention-backend sgl_sparse the budget shrinks by exactly the counted fixed bytes and the
    pool by those bytes over the cell size; the request slots the bytes were counted for are at least those the
    pool gets; another backend's budget and pool are untouched. One line logs the bytes by component."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 1000,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}))
    cases = [("quest-fast", "sgl_sparse", {"sparse_config": "quest-fast", "max_running_requests": 48,
                                           "cuda_graph_max_bs_decode": 16}),
             ("vattention", "sgl_sparse", {"sparse_config": "vattention"}),
             ("flashinfer", "flashinfer", {})]
    code = f"MODEL = {str(tmp_path)!r}\nCASES = {cases!r}\n" + SGLANG_POOL
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    assert out["padding_rows"] == 1                          # operator_shape's max_requests = slots + 1

    for name in ("quest-fast", "vattention"):
        case = out[name]
        fixed = sum(case["parts"].values())
        assert case["budget"] == case["raw"] - fixed
        assert case["tokens"] == (case["raw"] - fixed) // case["cell"] // 16 * 16
        assert case["tokens"] < case["raw"] // case["cell"] // 16 * 16
        assert case["reqs"] <= case["slots"]
        assert case["parts"]["workspace"] == WORKSPACE_BYTES
        per_size = 4 if name == "vattention" else 3
        assert case["parts"]["int workspaces"] == per_size * FLASHINFER_INT_WORKSPACE_BYTES
        # the wrappers of every captured size together hold less than one int workspace per role: they share them
        assert 0 < case["parts"]["wrappers"] < per_size * FLASHINFER_INT_WORKSPACE_BYTES
        assert max(case["sizes"]) == case["graph_batch"]
        logged = [x for x in p.stderr.splitlines() if "sgl-sparse:" in x and "KV pool's budget" in x]
        assert any(f"{fixed / 2**20:.1f} MiB" in x and "workspace 256.0 MiB" in x for x in logged), logged
    quest = out["quest-fast"]
    assert quest["slots"] == 48 and quest["graph_batch"] == 16 and quest["parts"]["kept selections"] > 0
    assert quest["parts"]["eager index buffers"] > 0          # 48 request slots, graphs up to 16: eager batches
    assert out["vattention"]["slots"] > 48
    plain = out["flashinfer"]
    assert plain["budget"] == plain["raw"]
    assert plain["tokens"] == plain["raw"] // plain["cell"] // 16 * 16
