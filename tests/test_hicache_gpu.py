"""The hierarchical cache's load-back on the GPU, below a server: SGLang's own host pool copies KV back into its
device pool, and the plugin's hook (as a server installs it) refreshes those slots' side tables.

Needs CUDA, CuPy and SGLang 0.5.17 (the GPU host); skipped without them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cupy_kernels import reference as ref
from sgl_sparse.config import SparseConfig
from sgl_sparse.metadata import SparseKVMetadata

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["quest", "twilight"])
def test_load_back_refreshes_the_side_tables(method, request):
    """Two pages of one layer come back from host memory into slots whose tables describe other KV: after SGLang's
    per-layer copy the page bounds (and Twilight's int4 keys) of those slots equal the reference on the KV now in
    the pool, and nothing else changed. Before the copy they differ (the test can fail)."""
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sgl_sparse import sglang_backend as sb

    sb.register()
    HookRegistry.apply_hooks()
    assert all(t in HookRegistry._patched for t in sb.LOAD_BACK_TARGETS)

    cfg = SparseConfig.load(method)
    P, HK, D, layers = cfg.page_size, 2, 64, 2
    device_pool = MHATokenToKVPool(64 * P, P, torch.bfloat16, HK, D, layers, "cuda", False)
    host_pool = MHATokenToKVPoolHost(device_pool, 2.0, 0, P, "layer_first", pin_memory=True)
    # SGLang pins the host buffer (cudaHostRegister): unpin it, or the next case's buffer, allocated at the same
    # address, cannot be pinned
    request.addfinalizer(host_pool.destroy)
    keys = [device_pool._get_key_buffer(i) for i in range(layers)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k in keys:
        k.copy_(torch.randn(k.shape, generator=gen, device="cuda").to(k.dtype))
    meta = SparseKVMetadata(cfg, num_layers=layers, num_slots=keys[0].shape[0], num_kv_heads=HK, head_dim=D,
                            dtype=torch.bfloat16, device="cuda")
    every = torch.arange(P, keys[0].shape[0], device="cuda")        # SGLang keeps slot 0 .. P-1 as padding
    for i in range(layers):
        meta.update(i, keys[i], every)
    before = [t.clone() for t in meta.page_key_bounds]

    layer = 1
    host_slots = torch.arange(4 * P, 6 * P, device="cuda")
    device_slots = torch.arange(10 * P, 12 * P, device="cuda")
    host_pool.k_buffer[layer][host_slots.cpu()] = (3 + torch.randn((2 * P, HK, D))).to(torch.bfloat16)
    host_pool.v_buffer[layer][host_slots.cpu()] = torch.randn((2 * P, HK, D)).to(torch.bfloat16)

    backend = SimpleNamespace(config=cfg, key_buffers=keys, metadata=meta)
    backend.refresh_slots = lambda *a: sb._backend_class().refresh_slots(backend, *a)
    saved = dict(sb._ACTIVE)
    try:
        sb._ACTIVE["backend"] = backend
        host_pool.load_to_device_per_layer(device_pool, host_slots, device_slots, layer, "kernel")
        torch.cuda.synchronize()
    finally:
        sb._ACTIVE.clear()
        sb._ACTIVE.update(saved)

    assert torch.equal(keys[layer][device_slots].cpu(), host_pool.k_buffer[layer][host_slots.cpu()])
    want = before[layer].clone()
    ref.page_bounds_update(keys[layer], device_slots, want, P)
    pages = device_slots[::P] // P
    assert not torch.equal(want[pages], before[layer][pages])        # the copy changed what the bounds must say
    assert torch.equal(meta.page_key_bounds[layer], want)            # refreshed: those pages, nothing else
    assert torch.equal(meta.page_key_bounds[0], before[0])           # the other layer untouched
    if meta.key_int4:
        q4, sz = meta.key_int4[layer].clone(), meta.key_scale_zero[layer].clone()
        ref.quantize_keys_int4(keys[layer], device_slots, q4, sz, meta.int4_group)
        assert torch.equal(meta.key_int4[layer], q4) and torch.allclose(meta.key_scale_zero[layer], sz)
