"""GPU tests of the sparse decode operator (FlashInfer + CuPy kernels) against the torch reference and dense.

Needs flashinfer on the GPU host (../shared/gpu-host bundles it); skipped without CUDA, CuPy or FlashInfer.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

from sgl_sparse import policies
from sgl_sparse.config import SparseConfig
from sgl_sparse.decode import FLASHINFER_PINNED_INT_WORKSPACE, SparseDecodeOperator, reference_decode
from sgl_sparse.fidelity import attention_fidelity, dense_attention, relative_l2
from sgl_sparse.metadata import SparseKVMetadata
from sgl_sparse.synthetic import capture_graph, make_pool, shape_attention

pytestmark = pytest.mark.gpu
DEV = "cuda"
METHODS = ("quest", "twilight", "vattention")
TWILIGHT_SAMPLED = "twilight:residual_sample=true"     # + a sample of the tokens outside its candidates


@pytest.fixture(autouse=True)
def _need_flashinfer():
    pytest.importorskip("flashinfer")


def _setup(method, lens, *, HK=8, G=4, D=128, dtype=torch.bfloat16, seed=0, kind="peaked", layers=3, **cfg):
    # no batch floor unless a test sets one: these batches of a few requests are to select
    config = SparseConfig.load(method).replace(**{"min_batch_tokens": 0, **cfg})
    gen = torch.Generator().manual_seed(seed)
    page = config.sglang_page_size                              # SGLang's page: coarse pages are whole pages
    pool = make_pool(lens, HK, D, page, dtype, DEV, gen, spare_pages=64, max_ctx=max(lens) + 2 * page)
    q = torch.randn((len(lens), HK * G, D), generator=gen).to(dtype).to(DEV)
    q = shape_attention(pool, q, kind, gen)
    meta = SparseKVMetadata(config, num_layers=layers, num_slots=pool.k_cache.shape[0], num_kv_heads=HK,
                            head_dim=D, dtype=dtype, device=DEV)
    for layer in range(layers):
        meta.update(layer, pool.k_cache, pool.written_slots)
    op = SparseDecodeOperator(config, num_qo_heads=HK * G, num_kv_heads=HK, head_dim=D, num_layers=layers,
                              max_batch=len(lens), max_context=max(lens) + 64, dtype=dtype, device=DEV)
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    return config, pool, q, meta, op


def _batch(op, pool):
    """The batch the reference decodes, built from the pool as SGLang hands it over (int64 index tensors;
    ``fits_budget`` left to the reference), not from the operator's planned int32 copies, so that a fault in
    ``plan()`` shows; only what the step decided on the device (score width, reused rows, per-row budgets) comes
    from the operator's batch."""
    planned = op.batch
    B = planned.batch_size
    return policies.DecodeBatch(pool.req_to_token, pool.req_pool_indices[:B], pool.seq_lens[:B], planned.max_pages,
                                reuse_from=planned.reuse_from, row_top_k=planned.row_top_k)


class _Lockstep:
    """Decode steps over one pool for two operators of one config (one eager, one replayed from a CUDA graph):
    ``advance()`` appends a token to every request and gives each a new query (the first one plus noise);
    ``plan(op)`` and ``run(op)`` plan and run every layer of an operator on it."""

    def __init__(self, config, pool, q, meta, layers=3, budgets=None):
        self.pool, self.q, self.meta, self.layers, self.budgets = pool, q, meta, layers, budgets
        self.q_static = q.clone()
        self.new_slots = torch.zeros(q.shape[0], dtype=torch.int64, device=DEV)
        HK, D = pool.k_cache.shape[1], pool.k_cache.shape[2]
        self.graphed = SparseDecodeOperator(config, num_qo_heads=q.shape[1], num_kv_heads=HK, head_dim=D,
                                            num_layers=layers, max_batch=q.shape[0],
                                            max_context=int(pool.seq_lens.max()) + 64, dtype=q.dtype, device=DEV)

    def plan(self, op):
        p = self.pool
        return op.plan(p.req_to_token, p.req_pool_indices, p.seq_lens, p.seq_lens.cpu(), row_budgets=self.budgets)

    def run(self, op):
        return [op.run(layer, self.q_static, self.pool.k_cache, self.pool.v_cache, self.meta)
                for layer in range(self.layers)]

    def advance(self):
        self.pool.append_token(self.new_slots)
        for layer in range(self.layers):
            self.meta.update(layer, self.pool.k_cache, self.new_slots)
        self.q_static.copy_((self.q.float() + 0.3 * torch.randn_like(self.q.float())).to(self.q.dtype))


@pytest.mark.parametrize("method", METHODS + ("dense", TWILIGHT_SAMPLED))
@pytest.mark.parametrize("D,G,dtype", [(128, 4, torch.bfloat16), (64, 3, torch.float16)])
def test_exact_when_budget_covers_context(method, D, G, dtype):
    lens = [3000, 1777, 4096]
    config, pool, q, meta, op = _setup(method, lens, D=D, G=G, dtype=dtype, HK=2, token_budget=4096,
                                       min_context=0, dense_layers=0)
    dense = dense_attention(q, pool.k_cache, pool.v_cache, _batch(op, pool), 1 / math.sqrt(D))
    for layer in range(2):
        out = op.run(layer, q, pool.k_cache, pool.v_cache, meta)
        err = relative_l2(out, dense)
        assert err.max().item() < 1e-2, f"{method}: budget >= context must equal dense (rel err {err.max():.2e})"
    if method != "dense":
        assert op.path == "dense"                  # no request needs a selection: the dense path
        frac = op.attended_fraction()
        assert torch.allclose(frac, torch.ones_like(frac)), frac
        # the sparse path with every request inside its budget attends every token too
        assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                       path="sparse") == "sparse"
        for layer in range(2):
            err = relative_l2(op.run(layer, q, pool.k_cache, pool.v_cache, meta), dense)
            assert err.max().item() < 1e-2, f"{method} sparse path: rel err {err.max():.2e}"
        frac = op.attended_fraction()
        assert torch.allclose(frac, torch.ones_like(frac)), frac


def _layer_matches_reference(config, pool, q, meta, op, *, exact_counts=False):
    """Run sparse layer 1 through the operator and through reference_decode on the same batch and compare.
    vAttention (and Twilight with its residual sample): the sample size within a few draws of the reference's (it
    depends on FlashInfer's bf16 o_det/LSE against the reference's float32 ones: a few draws more or less of the
    same RNG stream) and the output close.
    The other methods: selection sizes equal on (almost) every head (every head with ``exact_counts``) and the
    output close wherever they are. Returns the operator's output."""
    layer = 1
    sm = 1 / math.sqrt(q.shape[-1])
    out = op.run(layer, q, pool.k_cache, pool.v_cache, meta)
    seeds = policies.vattention_seeds(config.seed, op.step.clone(), layer, q.shape[0])
    want, want_counts = reference_decode(config, layer, q, pool.k_cache, pool.v_cache, _batch(op, pool), meta, sm,
                                         seeds)
    err = relative_l2(out, want)                                      # [B, HQ]
    if config.method == "vattention":
        got_n, want_n = op.last_counts.double(), want_counts.double()
        assert ((got_n - want_n).abs() <= 5e-3 * want_n + 4).all(), (got_n, want_n)
        assert err.median().item() < 1e-2 and err.max().item() < 5e-2, err
    elif config.samples_residual:
        # Twilight's survivors as below (a head may keep a token more or less where top-p's cut falls, so on a
        # few heads the sample is then sized from another exact part), plus the sample within a few draws
        got_n, want_n = op.last_counts.double(), want_counts.double()
        close = (got_n - want_n).abs() <= 5e-3 * want_n + 8                        # [B, HK]
        assert close.float().mean() >= 0.95, (got_n, want_n)
        G = q.shape[1] // close.shape[1]
        assert err.median().item() < 1e-2
        assert err[close[..., None].expand(-1, -1, G).reshape(err.shape)].max().item() < 5e-2
    elif exact_counts or config.method == "quest":
        # Quest attends min(top_k, pages) pages, the last (partial) one always: its sizes never depend on rounding
        assert torch.equal(op.last_counts, want_counts)
        assert err.max().item() < 2e-2, err.max().item()
    else:
        # Twilight: top-p's cut falls where the kernel's int4 probabilities (float32 sums in another order) and the
        # reference's reach p, so a head may keep a token more or less
        same = (op.last_counts == want_counts)                       # [B, HK]
        assert same.float().mean() >= 0.95, "selection sizes must match the reference on (almost) every head"
        G = q.shape[1] // same.shape[1]
        assert err[same[..., None].expand(-1, -1, G).reshape(err.shape)].max().item() < 2e-2
    return out


@pytest.mark.parametrize("method", METHODS + (TWILIGHT_SAMPLED,))
@pytest.mark.parametrize("kind", ["peaked", "heavy_tailed", "flat"])
def test_operator_matches_reference(method, kind):
    """Same selection through the CuPy kernels + FlashInfer as through the torch reference + dense math."""
    lens = [9000, 5000, 3000, 12345]
    config, pool, q, meta, op = _setup(method, lens, kind=kind, token_budget=1024, min_context=4000,
                                       dense_layers=1)
    sm = 1 / math.sqrt(q.shape[-1])
    dense = dense_attention(q, pool.k_cache, pool.v_cache, _batch(op, pool), sm)
    out0 = op.run(0, q, pool.k_cache, pool.v_cache, meta)            # dense layer
    assert relative_l2(out0, dense).max().item() < 1e-2
    out = _layer_matches_reference(config, pool, q, meta, op)
    # The short request (3000 < min_context) is attended densely in a sparse layer too.
    assert relative_l2(out[2], dense[2]).max().item() < 1e-2
    assert torch.equal(op.last_counts[2], torch.full_like(op.last_counts[2], 3000))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("page,coarse", [(16, 64), (8, 16)])
def test_coarse_to_fine_matches_reference_and_plain_quest(method, page, coarse):
    """Coarse-to-fine scoring through the kernels equals the reference's; with a coarse budget that covers every
    context it selects exactly what plain Quest selects (every page is scored), eager and from a CUDA graph."""
    lens = [9000, 5000, 3000, 12345]
    common = dict(kind="heavy_tailed", token_budget=1024, min_context=4000, dense_layers=0, page_size=page,
                  coarse_page_tokens=coarse, bounds_dtype="bf16")
    config, pool, q, meta, op = _setup(method, lens, coarse_token_budget=2048, **common)
    out = _layer_matches_reference(config, pool, q, meta, op, exact_counts=True)
    replayed = {}
    graph = capture_graph(lambda: replayed.__setitem__("o", op.run(1, q, pool.k_cache, pool.v_cache, meta)))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed["o"], out)                    # the same kernels on the same step

    # coarse budget >= every context: the same selection as without the coarse pass
    whole = -(-max(lens) // coarse) * coarse
    c_all, pool2, q2, meta2, op2 = _setup(method, lens, coarse_token_budget=whole, **common)
    plain = c_all.replace(coarse_page_tokens=0, coarse_token_budget=0)
    plain_meta = SparseKVMetadata(plain, num_layers=3, num_slots=pool2.k_cache.shape[0], num_kv_heads=8,
                                  head_dim=q2.shape[-1], dtype=q2.dtype, device=DEV)
    plain_meta.update(1, pool2.k_cache, pool2.written_slots)
    sm = 1 / math.sqrt(q2.shape[-1])
    seeds = policies.vattention_seeds(c_all.seed, op2.step.clone(), 1, len(lens))
    batch2 = _batch(op2, pool2)
    got, got_counts = reference_decode(c_all, 1, q2, pool2.k_cache, pool2.v_cache, batch2, meta2, sm, seeds)
    want, want_counts = reference_decode(plain, 1, q2, pool2.k_cache, pool2.v_cache, batch2, plain_meta, sm, seeds)
    assert torch.equal(got_counts, want_counts)
    assert torch.equal(got, want)


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("method", METHODS + (TWILIGHT_SAMPLED,))
def test_cuda_graph_capture_and_replay(method, pdl, monkeypatch):
    """plan() outside the graph, every layer captured once, replayed over steps with growing contexts; also with
    every captured kernel launched with and without programmatic dependent launch (the default on sm_90+: each
    may be scheduled while the one before it drains, and waits for it on the device before touching memory)."""
    from cupy_kernels import _cuda

    monkeypatch.setattr(_cuda, "PDL", pdl)
    lens = [7000, 4100, 9001]
    B = len(lens)
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=0,
                                       dense_layers=1, layers=3)
    D = pool.k_cache.shape[2]
    dtype = pool.k_cache.dtype
    new_slots = torch.zeros(B, dtype=torch.int64, device=DEV)
    q_static = q.clone()
    outs = {}

    def step_fn():
        for layer in range(3):
            meta.update(layer, pool.k_cache, new_slots)
            outs[layer] = op.run(layer, q_static, pool.k_cache, pool.v_cache, meta)

    def advance():
        pool.append_token(new_slots)
        q_static.copy_((q.float() + 0.1 * torch.randn_like(q.float())).to(dtype))
        op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())

    advance()
    graph = capture_graph(step_fn)
    sm = 1 / math.sqrt(D)
    for _ in range(3):
        advance()
        graph.replay()
        torch.cuda.synchronize()
        dense = dense_attention(q_static, pool.k_cache, pool.v_cache, op.batch, sm)
        assert relative_l2(outs[0], dense).max().item() < 1e-2
        for layer in (1, 2):
            seeds = policies.vattention_seeds(config.seed, op.step.clone(), layer, B)
            want, want_counts = reference_decode(config, layer, q_static, pool.k_cache, pool.v_cache, op.batch,
                                                 meta, sm, seeds)
            err = relative_l2(outs[layer], want)
            assert err.median().item() < 1e-2 and err.max().item() < 0.1, (layer, err.max().item())


@pytest.mark.parametrize("spec", ["quest", "quest-fast", "quest:bounds_dtype=bf16,coarse_page_tokens=64"])
def test_early_launch_after_the_scans_replays_as_eager(spec, monkeypatch):
    """The page scans' early launch of the top-k that follows (``griddepcontrol.launch_dependents``; on from
    B x HK >= SMs, forced on here for a batch of 3) and the drift test's (``quest-fast``): a graph captured with
    programmatic dependent launch gives the eager operator's outputs (plain launches) bit for bit, step after step,
    with plain and coarse-to-fine scans and with selection reuse."""
    import importlib

    from cupy_kernels import _cuda

    monkeypatch.setattr(_cuda, "PDL", True)
    for name in ("cupy_kernels.quest_scores", "cupy_kernels.quest_refine"):
        monkeypatch.setattr(importlib.import_module(name), "early_launch_pays", lambda *args: 1)
    coarse = "coarse_page_tokens" in spec
    config, pool, q, meta, eager = _setup(spec, [7000, 4100, 9001], kind="heavy_tailed", token_budget=1024,
                                          min_context=0, dense_layers=1, layers=3,
                                          **({"coarse_token_budget": 2048, "page_size": 16} if coarse else {}))
    steps = _Lockstep(config, pool, q, meta)
    graphed, outs = steps.graphed, {}
    steps.advance()
    steps.plan(graphed)
    graph = capture_graph(lambda: outs.__setitem__("graph", steps.run(graphed)))
    for op in (graphed, eager):      # the warm-up and capture runs kept selections; _setup planned eager's step
        op.forget(pool.req_pool_indices)
    for step in range(5):
        steps.advance()
        steps.plan(graphed)
        graph.replay()
        steps.plan(eager)
        got = steps.run(eager)
        torch.cuda.synchronize()
        for layer in range(3):
            assert torch.equal(got[layer], outs["graph"][layer]), (step, layer)
        assert torch.equal(eager.last_counts, graphed.last_counts), step


@pytest.mark.parametrize("kind", ["peaked", "flat", "heavy_tailed"])
def test_fidelity_budgets_and_vattention_guarantee(kind):
    """Synthetic fidelity on the GPU: more budget, less error; vAttention's violation rate stays <= delta."""
    errs = {}
    for budget in (256, 1024):
        for method in METHODS:
            cfg = SparseConfig.load(method).replace(token_budget=budget, min_context=0, dense_layers=0,
                                                      min_batch_tokens=0)
            r = attention_fidelity(cfg, kind=kind, context=16384, batch_size=2, num_kv_heads=8, group=4,
                                   head_dim=128, steps=4 if method != "vattention" else 24, device=DEV,
                                   backend="gpu")
            errs[(method, budget)] = r
    for method in METHODS:
        assert errs[(method, 1024)].rel_l2_mean <= errs[(method, 256)].rel_l2_mean * 1.05 + 1e-3, method
    for budget in (256, 1024):         # top-p keeps a part of Quest's candidates, never all of them
        assert errs[("twilight", budget)].attended_fraction < errs[("quest", budget)].attended_fraction
    for budget in (256, 1024):
        v = errs[("vattention", budget)]
        # 384 outputs (24 steps x 2 requests x 8 KV heads... x 4 query heads): allow 3 binomial standard errors.
        slack = 3 * math.sqrt(0.05 * 0.95 / v.outputs)
        if kind != "heavy_tailed":
            assert v.violation_rate <= 0.05 + slack, v


@pytest.mark.parametrize("method", METHODS)
def test_one_graph_per_path(method):
    """A graph captured per path (plan(path=...) while capturing, as the SGLang backend does per batch size);
    plan() picks the dense path when no request needs a selection, and each replay matches its eager spec."""
    lens = [9000, 2000, 3000]
    B = len(lens)
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=4096,
                                       dense_layers=1, layers=3)
    D = pool.k_cache.shape[2]
    sm = 1 / math.sqrt(D)
    outs = {"sparse": {}, "dense": {}}             # each graph's own output tensors

    def step_fn(path):
        for layer in range(3):
            outs[path][layer] = op.run(layer, q, pool.k_cache, pool.v_cache, meta)

    graphs = {}
    for path in ("sparse", "dense"):
        assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                       path=path) == path
        graphs[path] = capture_graph(lambda: step_fn(path))

    # a long request in the batch: the sparse path, as the reference selects
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu()) == "sparse"
    graphs["sparse"].replay()
    torch.cuda.synchronize()
    for layer in (1, 2):
        seeds = policies.vattention_seeds(config.seed, op.step.clone(), layer, B)
        want, _ = reference_decode(config, layer, q, pool.k_cache, pool.v_cache, op.batch, meta, sm, seeds)
        err = relative_l2(outs["sparse"][layer], want)
        assert err.median().item() < 1e-2 and err.max().item() < 0.1, (layer, err.max().item())

    # every request below min_context (the long one cut to its first 3000 tokens): the dense path, exact
    pool.seq_lens[0] = 3000
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu()) == "dense"
    graphs["dense"].replay()
    torch.cuda.synchronize()
    dense = dense_attention(q, pool.k_cache, pool.v_cache, op.batch, sm)
    for layer in range(3):
        assert relative_l2(outs["dense"][layer], dense).max().item() < 1e-2, layer
    frac = op.attended_fraction()
    assert torch.equal(frac, torch.ones_like(frac))


@pytest.mark.parametrize("method", METHODS)
def test_graphs_of_two_batch_sizes_share_the_int_workspaces(method):
    """The wrappers of every batch size share one FlashInfer int workspace per role (a step plans one batch size):
    graphs captured for batches of 3 and 2, replayed alternately, each after its own plan(), match the reference
    every time; a replay reading the other size's work list would not."""
    lens = [9000, 12000, 7000]
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=4096,
                                       dense_layers=1, layers=2)
    sm = 1 / math.sqrt(q.shape[-1])
    qs = {3: q, 2: q[:2].clone()}
    outs = {3: {}, 2: {}}

    def plan(B):
        return op.plan(pool.req_to_token, pool.req_pool_indices[:B], pool.seq_lens[:B], pool.seq_lens.cpu()[:B])

    def step_fn(B):
        for layer in range(2):
            outs[B][layer] = op.run(layer, qs[B], pool.k_cache, pool.v_cache, meta)

    graphs = {}
    for B in (3, 2):
        assert plan(B) == "sparse"
        graphs[B] = capture_graph(lambda B=B: step_fn(B))
    wrappers = {B: op._buffers(B) for B in (3, 2)}
    for attr in ("_int_workspace_buffer", FLASHINFER_PINNED_INT_WORKSPACE):     # the device one and its host copy
        for role in wrappers[3]:
            assert (getattr(wrappers[3][role].wrapper, attr).data_ptr()
                    == getattr(wrappers[2][role].wrapper, attr).data_ptr()), (attr, role)
        assert len({getattr(w.wrapper, attr).data_ptr() for w in wrappers[3].values()}) == len(wrappers[3]), attr
    assert all(getattr(w.wrapper, FLASHINFER_PINNED_INT_WORKSPACE).is_pinned() for w in wrappers[3].values())

    def step(B):
        assert plan(B) == "sparse"
        graphs[B].replay()
        return _batch(op, pool), op.step.clone()

    def check(B, batch, step_count):
        dense = dense_attention(qs[B], pool.k_cache, pool.v_cache, batch, sm)
        assert relative_l2(outs[B][0], dense).max().item() < 1e-2, B                  # layer 0: dense
        seeds = policies.vattention_seeds(config.seed, step_count, 1, B)
        want, _ = reference_decode(config, 1, qs[B], pool.k_cache, pool.v_cache, batch, meta, sm, seeds)
        err = relative_l2(outs[B][1], want)
        assert err.median().item() < 1e-2 and err.max().item() < 0.1, (B, err.max().item())

    for B in (3, 2, 3, 2):
        batch, step_count = step(B)
        torch.cuda.synchronize()
        check(B, batch, step_count)
    # The host ahead of the GPU, as SGLang's scheduler runs: the second step is planned while the first one's copy
    # of its work list (queued by plan() behind the busy GPU) has not run yet, so the page-locked copy both share
    # must not be overwritten before it has.
    torch.cuda._sleep(200_000_000)                                # ~0.1 s of GPU time
    steps = {B: step(B) for B in (3, 2)}
    torch.cuda.synchronize()
    for B, (batch, step_count) in steps.items():
        check(B, batch, step_count)


@pytest.mark.parametrize("method", METHODS)
def test_graph_captured_on_a_dummy_batch_serves_real_lengths(method):
    """SGLang captures with every seq_len 1; FlashInfer's split of the work is re-planned each step from the
    host lengths, so replays at other lengths and mixes must all match the reference."""
    lens = [30000, 9000, 2500, 5000]
    B = len(lens)
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=4096,
                                       dense_layers=0, layers=1)
    sm = 1 / math.sqrt(q.shape[-1])
    real = pool.seq_lens.clone()
    outs = {}

    def step_fn():
        outs[0] = op.run(0, q, pool.k_cache, pool.v_cache, meta)

    pool.seq_lens.fill_(1)
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(), path="sparse")
    graph = capture_graph(step_fn)
    for lens_now in ([9000, 9000, 2500, 5000], [30000, 4000, 2500, 3000], real.tolist()):   # within the pool
        pool.seq_lens.copy_(torch.tensor(lens_now))
        assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu()) == "sparse"
        graph.replay()
        torch.cuda.synchronize()
        seeds = policies.vattention_seeds(config.seed, op.step.clone(), 0, B)
        want, want_counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, op.batch, meta, sm, seeds)
        err = relative_l2(outs[0], want)
        assert err.median().item() < 1e-2 and err.max().item() < 0.1, (lens_now, err.max().item())
        if method == "quest":
            assert torch.equal(op.last_counts, want_counts)


@pytest.mark.parametrize("method", METHODS)
def test_per_request_budgets_replay_from_the_graph(method):
    """Request budgets (row_budgets) planned before a replay of a graph captured without them: each request
    attends what its own budget gives (Quest: exactly), a request within its own budget densely, as the eager
    operator and the reference (with the same per-row pages)."""
    lens = [30000, 9000, 3000, 5000]
    B = len(lens)
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=4096,
                                       dense_layers=0, layers=1)
    HK, D = pool.k_cache.shape[1], pool.k_cache.shape[2]
    eager = SparseDecodeOperator(config, num_qo_heads=q.shape[1], num_kv_heads=HK, head_dim=D, num_layers=1,
                                 max_batch=B, max_context=max(lens) + 64, dtype=q.dtype, device=DEV)
    sm = 1 / math.sqrt(D)
    outs = {}

    def step_fn():
        outs[0] = op.run(0, q, pool.k_cache, pool.v_cache, meta)

    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(), path="sparse")
    graph = capture_graph(step_fn)
    budgets = [256, None, 512, 80]
    for _ in range(2):        # the same step count as op (planned at set-up and for the capture): vAttention's seeds
        eager.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    for o in (op, eager):
        assert o.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                      row_budgets=budgets) == "sparse"
    graph.replay()
    got = eager.run(0, q, pool.k_cache, pool.v_cache, meta)
    torch.cuda.synchronize()
    assert torch.equal(outs[0], got)
    assert op.batch.row_top_k.tolist() == [16, 64, 32, 5]
    seeds = policies.vattention_seeds(config.seed, op.step.clone(), 0, B)
    want, want_counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, op.batch, meta, sm, seeds)
    err = relative_l2(outs[0], want)
    assert err.median().item() < 1e-2 and err.max().item() < 0.1, err.max().item()
    if method == "quest":
        pages = torch.tensor([16, 64, 32, 5], dtype=torch.int32)
        tokens = policies.selected_tokens(config, pool.seq_lens.cpu(), pages)
        assert torch.equal(op.last_counts.cpu(), tokens[:, None].expand(B, HK).to(torch.int32))
        assert torch.equal(op.last_counts, want_counts)
    with pytest.raises(ValueError, match="multiple of 16"):
        op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                row_budgets=[1000, None, None, None])


@pytest.mark.parametrize("budgets", [None, [512, None, 256]])
@pytest.mark.parametrize("min_cosine", [-1.0, 0.5])
@pytest.mark.parametrize("method", METHODS)
def test_selection_reuse_eager_equals_graph_and_reference(method, min_cosine, budgets):
    """reselect_every=3 over 7 steps (select, reuse, reuse, select, ...): a captured graph gives the eager
    operator's outputs bit for bit, both follow the reference given the same kept selections (and, with the drift
    test, stored queries; request 1's query turns around on a reusing step, so its layers select again there),
    and what the selecting steps keep equals the reference's selection."""
    lens = [7000, 4100, 9001]
    B = len(lens)
    config, pool, q, meta, eager = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=0,
                                          dense_layers=1, layers=3, reselect_every=3, reselect_min_cosine=min_cosine)
    HK, D = pool.k_cache.shape[1], pool.k_cache.shape[2]
    steps = _Lockstep(config, pool, q, meta, budgets=budgets)
    graphed, q_static, outs = steps.graphed, steps.q_static, {}
    sm = 1 / math.sqrt(D)
    steps.advance()
    steps.plan(graphed)
    graph = capture_graph(lambda: outs.__setitem__("graph", steps.run(graphed)))
    for op in (graphed, eager):      # the warm-up and capture runs kept selections; _setup planned eager's step
        op.forget(pool.req_pool_indices)
    reused_steps = 0
    for step in range(7):
        steps.advance()
        if step == 4:                # request 1's query turns around
            q_static[1] = -q_static[1]
        steps.plan(graphed)
        graph.replay()
        steps.plan(eager)
        kept_before = eager.reuse.kept.clone()
        queries_before = eager.reuse.queries.clone() if eager.reuse.queries is not None else None
        got = steps.run(eager)
        torch.cuda.synchronize()
        reusing = eager.batch.reuse_from.tolist()
        assert reusing == graphed.batch.reuse_from.tolist()
        if step % 3 == 0:
            assert reusing == [0] * B, (step, reusing)
        else:
            assert all(r > 0 for r in reusing), (step, reusing)
        reused_steps += step % 3 != 0
        for layer in range(3):
            assert torch.equal(got[layer], outs["graph"][layer]), (step, layer)
        for layer in (1, 2):
            seeds = policies.vattention_seeds(config.seed, eager.step.clone(), layer, B)
            kept = kept_before[layer - 1].clone()
            queries = queries_before[layer - 1].clone() if queries_before is not None else None
            want, _ = reference_decode(config, layer, q_static, pool.k_cache, pool.v_cache, eager.batch, meta, sm,
                                       seeds, kept_selection=kept, kept_query=queries)
            err = relative_l2(got[layer], want)
            assert err.median().item() < 1e-2 and err.max().item() < 0.1, (step, layer, err.max().item())
            same = (kept == eager.reuse.kept[layer - 1]).all(-1)
            assert same.float().mean() >= 0.95, (step, layer)
            if queries is not None:
                torch.testing.assert_close(eager.reuse.queries[layer - 1].float(), queries.float(), rtol=1e-2,
                                           atol=1e-3)
            if queries is not None and step == 4:      # request 1 turned: selected again here, its query stored
                s0, s1 = (int(i) for i in pool.req_pool_indices[:2])
                now = q_static[1].float().view(HK, -1, D).mean(1)
                torch.testing.assert_close(eager.reuse.queries[layer - 1, s1].float(), now, rtol=1e-2, atol=1e-2)
                assert torch.equal(eager.reuse.queries[layer - 1, s0], queries_before[layer - 1, s0])  # reused
    assert reused_steps == 4


@pytest.mark.parametrize("method", METHODS)
def test_selection_reuse_through_steps_on_the_dense_path(method):
    """min_batch_tokens 20000: the whole batch (20101 tokens) selects, two of its requests alone (11100) run the
    dense path, exact; back to the whole batch, rows whose kept selection is younger than reselect_every (3) tokens
    reuse it (as the reference does with those kept pages), and the step after selects again."""
    lens = [7000, 4100, 9001]
    B = len(lens)
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=0,
                                       dense_layers=1, layers=3, reselect_every=3, min_batch_tokens=20000)
    D = pool.k_cache.shape[2]
    sm = 1 / math.sqrt(D)
    new_slots = torch.zeros(B, dtype=torch.int64, device=DEV)
    op.forget(pool.req_pool_indices)                              # _setup planned a step

    def advance():
        pool.append_token(new_slots)
        for layer in range(3):
            meta.update(layer, pool.k_cache, new_slots)

    def step(rows):
        path = op.plan(pool.req_to_token, pool.req_pool_indices[:rows], pool.seq_lens[:rows],
                       pool.seq_lens[:rows].cpu())
        kept = op.reuse.kept.clone()
        out = [op.run(layer, q[:rows], pool.k_cache, pool.v_cache, meta) for layer in range(3)]
        torch.cuda.synchronize()
        return path, kept, out

    def matches_reference(kept, out):
        for layer in (1, 2):
            seeds = policies.vattention_seeds(config.seed, op.step.clone(), layer, B)
            want, _ = reference_decode(config, layer, q, pool.k_cache, pool.v_cache, op.batch, meta, sm, seeds,
                                       kept_selection=kept[layer - 1].clone())
            err = relative_l2(out[layer], want)
            assert err.median().item() < 1e-2 and err.max().item() < 0.1, (layer, err.max().item())

    advance()
    selected_at = pool.seq_lens.tolist()
    path, kept, out = step(B)
    assert path == "sparse" and op.batch.reuse_from.tolist() == [0] * B
    matches_reference(kept, out)
    advance()
    path, _, out = step(2)
    assert path == "dense"
    dense = dense_attention(q[:2], pool.k_cache, pool.v_cache, op.batch, sm)
    for layer in range(3):
        assert relative_l2(out[layer], dense).max().item() < 1e-2, layer
    advance()
    path, kept, out = step(B)                                     # 2 tokens since the selection: reused
    assert path == "sparse" and op.batch.reuse_from.tolist() == selected_at, (op.batch.reuse_from, selected_at)
    matches_reference(kept, out)
    advance()
    path, kept, out = step(B)                                     # 3 tokens since: selects again
    assert path == "sparse" and op.batch.reuse_from.tolist() == [0] * B
    matches_reference(kept, out)


def test_eager_batch_sizes_keep_memory_bounded():
    """Eager steps over many batch sizes keep the wrappers of a captured size plus at most EAGER_BATCH_SIZES
    others (each set holds FlashInfer workspaces), so device memory stops growing; results stay right."""
    from sgl_sparse.decode import EAGER_BATCH_SIZES

    lens = [5000 + 37 * i for i in range(12)]
    config, pool, q, meta, op = _setup("quest", lens, token_budget=1024, min_context=0, dense_layers=0, layers=1)
    sm = 1 / math.sqrt(q.shape[-1])
    outs = {}
    # size 12 is captured: its wrappers stay
    graph = capture_graph(lambda: outs.__setitem__(12, op.run(0, q, pool.k_cache, pool.v_cache, meta)))

    def eager(B):
        op.plan(pool.req_to_token, pool.req_pool_indices[:B], pool.seq_lens[:B], pool.seq_lens[:B].cpu())
        return op.run(0, q[:B].contiguous(), pool.k_cache, pool.v_cache, meta)

    for B in range(1, 12):
        eager(B)
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated()
    for B in range(1, 12):
        out = eager(B)
        assert len(op._per_batch) <= EAGER_BATCH_SIZES + 1 and 12 in op._per_batch
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= used + (1 << 20)    # a second round over the sizes allocates nothing new
    want, _ = reference_decode(config, 0, q[:11], pool.k_cache, pool.v_cache, op.batch, meta, sm)
    err = relative_l2(out, want)                           # score ties may pick another page: as the graph tests
    assert err.median().item() < 1e-2 and err.max().item() < 0.1, err.max().item()
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    graph.replay()                                         # the captured size still replays
    torch.cuda.synchronize()
    want, _ = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, op.batch, meta, sm)
    err = relative_l2(outs[12], want)
    assert err.median().item() < 1e-2 and err.max().item() < 0.1, err.max().item()


def test_bounds_of_every_layer_in_one_launch():
    """page_bounds_update_layers == page_bounds_update per layer, for decode slots (one per request) and for a
    page reused from offset 0; inside a CUDA graph too."""
    import cupy_kernels as ck
    from cupy_kernels import reference as ref

    gen = torch.Generator().manual_seed(5)
    HK, D, P, L = 8, 128, 16, 4
    lens = [700, 33, 4096, 1601]
    pool = make_pool(lens, HK, D, P, torch.bfloat16, DEV, gen, spare_pages=8)
    slots = pool.last_slots
    k_caches = [pool.k_cache] + [torch.randn_like(pool.k_cache.float()).to(torch.bfloat16) for _ in range(L - 1)]
    pages = k_caches[0].shape[0] // P
    got = [torch.zeros((pages, HK, 2, D), dtype=torch.bfloat16, device=DEV) for _ in range(L)]
    for k, g in zip(k_caches, got):                     # prefill
        ref.page_bounds_update(k, pool.written_slots, g, P)
    want = [g.clone() for g in got]
    for k in k_caches:                                  # new decode tokens in every layer
        k[slots] = torch.randn((len(lens), HK, D), device=DEV).to(torch.bfloat16)
    tables = ck.LayerTables(k_caches, got, P)
    ck.page_bounds_update_layers(tables, slots)
    ref.page_bounds_update_layers(k_caches, slots, want, P)
    for g, w in zip(got, want):
        assert torch.equal(g, w)

    # captured once, replayed on a page reused from offset 0 (int32 slots)
    reuse = torch.zeros(1, dtype=torch.int32, device=DEV)      # slot 0: page 0, which no request holds
    ck.page_bounds_update_layers(tables, reuse)
    ref.page_bounds_update_layers(k_caches, reuse, want, P)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.page_bounds_update_layers(tables, reuse)
    free_page = pool.free_pages[-1]
    reuse.fill_(free_page * P)
    for k in k_caches:
        k[free_page * P] = torch.randn((HK, D), device=DEV).to(torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    ref.page_bounds_update_layers(k_caches, reuse, want, P)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
        assert torch.equal(g[free_page, :, 0], g[free_page, :, 1])      # one token: min == max


@pytest.mark.parametrize("spec", ["quest", "twilight", "quest:bounds_dtype=bf16,coarse_page_tokens=64"])
def test_benchmark_step_updates_equal_the_per_layer_update(spec):
    """ServerStepUpdates (the benchmarks' split of the new token's side-table work as the server runs it: int4
    keys per layer, every layer's bounds in one launch, here over aliases of one layer) leaves the tables exactly
    as the per-layer update of the new tokens does (the aliases rewrite the same rows with the same values)."""
    from sgl_sparse.synthetic import ServerStepUpdates

    gen = torch.Generator().manual_seed(11)
    config = SparseConfig.load(spec)
    HK, D, page = 8, 128, config.sglang_page_size
    pool = make_pool([700, 63, 4096, 1601], HK, D, page, torch.bfloat16, DEV, gen, spare_pages=8)
    meta = SparseKVMetadata(config, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                            dtype=torch.bfloat16, device=DEV)
    meta.update(0, pool.k_cache, pool.written_slots)
    want = SparseKVMetadata(config, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                            dtype=torch.bfloat16, device=DEV)
    want.update(0, pool.k_cache, pool.written_slots)
    new_slots = torch.zeros(4, dtype=torch.int64, device=DEV)
    updates = ServerStepUpdates(meta, pool.k_cache, new_slots, layers=32)
    for _ in range(3):                                # decode steps: requests 1 and 2 open new pages
        pool.append_token(new_slots)
        updates.per_layer()
        updates.all_layers()
        want.update(0, pool.k_cache, new_slots)
    torch.cuda.synchronize()
    tables = [(meta.page_key_bounds, want.page_key_bounds), (meta.coarse_key_bounds, want.coarse_key_bounds),
              (meta.key_int4, want.key_int4), (meta.key_scale_zero, want.key_scale_zero)]
    for got, exp in tables:
        for g, w in zip(got, exp):
            assert torch.equal(g, w)


def test_metadata_decode_update_keeps_the_coarse_table():
    """SparseKVMetadata with coarse-to-fine scoring: the once-per-step update of every layer refreshes the coarse
    table like the fine one (page_bounds_update_layers at the coarse page size), for decode tokens inside a coarse
    page and for one that opens a new coarse page (the previous occupant's bounds are reset)."""
    from cupy_kernels import reference as ref

    gen = torch.Generator().manual_seed(9)
    HK, D, C, L = 8, 128, 64, 3
    config = SparseConfig.load("quest").replace(coarse_page_tokens=C, bounds_dtype="bf16")
    lens = [700, 63, 4096, 1601]                      # requests 1 and 2 open a new coarse page while decoding
    pool = make_pool(lens, HK, D, C, torch.bfloat16, DEV, gen, spare_pages=8)
    k_caches = [pool.k_cache] + [torch.randn_like(pool.k_cache.float()).to(torch.bfloat16) for _ in range(L - 1)]
    meta = SparseKVMetadata(config, num_layers=L, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                            dtype=torch.bfloat16, device=DEV)
    stale = torch.randn_like(meta.coarse_key_bounds[0].float()).to(torch.bfloat16)
    for k, fine, coarse in zip(k_caches, meta.page_key_bounds, meta.coarse_key_bounds):
        coarse.copy_(stale)                           # a previous occupant's bounds everywhere
        ref.page_bounds_update(k, pool.written_slots, fine, config.page_size)
        ref.page_bounds_update(k, pool.written_slots, coarse, C)
    want_fine = [t.clone() for t in meta.page_key_bounds]
    want_coarse = [t.clone() for t in meta.coarse_key_bounds]
    for _ in range(3):                                # decode steps: request 1 crosses into its second coarse page
        pool.append_token(torch.zeros(len(lens), dtype=torch.int64, device=DEV))
        slots = pool.last_slots
        for k in k_caches:
            k[slots] = torch.randn((len(lens), HK, D), device=DEV).to(torch.bfloat16)
        meta.update_bounds_all_layers(k_caches, slots)
        ref.page_bounds_update_layers(k_caches, slots, want_fine, config.page_size)
        ref.page_bounds_update_layers(k_caches, slots, want_coarse, C)
    assert int(pool.seq_lens[1]) == 66                # the step that wrote position 64 opened a coarse page
    for got, want in zip(meta.page_key_bounds + meta.coarse_key_bounds, want_fine + want_coarse):
        assert torch.equal(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_path_graph_attends_opted_out_rows_densely(method):
    """A step with a long opted-out request takes the mixed path: its graph (captured with no row opted out and
    every seq_len 1, as the SGLang backend captures it) replays the sparse selection for the other rows and a
    dense pass over the opted-out one only, equal to the eager step; a step whose opted-out tokens exceed the
    mixed pass falls back to the eager sparse path with a dense pass over every row; a step whose only long
    requests opted out is the dense path's."""
    lens = [9000, 12000, 3000]
    B = len(lens)
    config, pool, q, meta, op = _setup(method, lens, kind="heavy_tailed", token_budget=1024, min_context=4096,
                                       dense_layers=1, layers=3)
    sm = 1 / math.sqrt(pool.k_cache.shape[2])
    outs = {}

    def step_fn():
        for layer in range(3):
            outs[layer] = op.run(layer, q, pool.k_cache, pool.v_cache, meta)

    real = pool.seq_lens.clone()
    pool.seq_lens.fill_(1)                                      # SGLang captures with every seq_len 1
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                   path="mixed") == "mixed"
    graph = capture_graph(step_fn)
    pool.seq_lens.copy_(real)
    opted = [False, True, False]
    with pytest.raises(ValueError, match="no row opted out"):
        op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(), dense_rows=opted,
                path="mixed")
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                   dense_rows=opted) == "mixed"
    graph.replay()
    torch.cuda.synchronize()
    replayed = {layer: outs[layer].clone() for layer in range(3)}
    frac = op.attended_fraction()
    # the opted-out row in full, the long one sparse (vAttention's sample adds to its budget: below 1, not 1/8)
    assert frac[1].item() == 1.0 and frac[0].item() < 1.0
    dense = dense_attention(q, pool.k_cache, pool.v_cache, op.batch, sm)
    for layer in (1, 2):
        assert relative_l2(replayed[layer][1], dense[1]).max().item() < 1e-2, layer          # the opted-out row
        seeds = policies.vattention_seeds(config.seed, op.step.clone(), layer, B)
        want, _ = reference_decode(config, layer, q, pool.k_cache, pool.v_cache, op.batch, meta, sm, seeds)
        err = relative_l2(replayed[layer][[0, 2]], want[[0, 2]])                           # the others: sparse
        assert err.median().item() < 1e-2 and err.max().item() < 0.1, (layer, err.max().item())
    step_fn()                                                   # eager, same plan: the same outputs
    for layer in range(3):
        assert torch.equal(outs[layer], replayed[layer]), layer

    # more opted-out tokens than the mixed pass holds: the eager sparse path, dense over every row
    op.max_dense_row_tokens = lens[1] + op.max_batch - 1
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                   dense_rows=opted) == "sparse"
    step_fn()
    assert relative_l2(outs[2][1], dense[1]).max().item() < 1e-2
    # the only long requests opted out: nothing selects, the dense path
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                   dense_rows=[True, True, False]) == "dense"


@pytest.mark.parametrize("method", METHODS)
def test_batches_beyond_the_captured_size_get_their_own_buffers(method):
    """graph_batch 2: a batch of 4 (eager, as SGLang runs batches larger than its captured ones) uses the eager
    buffer set and a dense pass whose token indices are allocated per step, and matches the reference and dense
    like any batch; the graph buffers stay sized for 2; capturing the batch of 4 is refused."""
    lens = [9000, 5000, 3000, 12345]
    config = SparseConfig.load(method).replace(token_budget=1024, min_context=4000, dense_layers=1,
                                               min_batch_tokens=0)
    gen = torch.Generator().manual_seed(3)
    HK, G, D = 8, 4, 128
    pool = make_pool(lens, HK, D, config.page_size, torch.bfloat16, DEV, gen, spare_pages=64, max_ctx=12400)
    q = shape_attention(pool, torch.randn((4, HK * G, D), generator=gen).to(torch.bfloat16).to(DEV), "peaked", gen)
    meta = SparseKVMetadata(config, num_layers=2, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                            dtype=torch.bfloat16, device=DEV)
    for layer in range(2):
        meta.update(layer, pool.k_cache, pool.written_slots)
    op = SparseDecodeOperator(config, num_qo_heads=HK * G, num_kv_heads=HK, head_dim=D, num_layers=2, max_batch=4,
                              max_context=12400, dtype=torch.bfloat16, device=DEV, graph_batch=2)
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    sm = 1 / math.sqrt(D)
    dense = dense_attention(q, pool.k_cache, pool.v_cache, op.batch, sm)
    assert relative_l2(op.run(0, q, pool.k_cache, pool.v_cache, meta), dense).max().item() < 1e-2   # dense layer
    out = op.run(1, q, pool.k_cache, pool.v_cache, meta)
    seeds = policies.vattention_seeds(config.seed, op.step.clone(), 1, len(lens))
    want, _ = reference_decode(config, 1, q, pool.k_cache, pool.v_cache, op.batch, meta, sm, seeds)
    err = relative_l2(out, want)
    assert err.median().item() < 1e-2 and err.max().item() < 5e-2, err.max().item()
    assert not any(not name.startswith("eager_") for name in op._index_buffers)   # no graph buffers for 4
    op.plan(pool.req_to_token, pool.req_pool_indices[:2], pool.seq_lens[:2], pool.seq_lens[:2].cpu())
    two = op.run(1, q[:2], pool.k_cache, pool.v_cache, meta)
    if method != "vattention":                                  # (its sample is drawn afresh each step)
        assert relative_l2(two, out[:2]).max().item() < 2e-2    # the same requests in a batch of 2
    assert op._index_buffers["dense"][1].numel() == 2 * 12400   # graph buffers sized for graph_batch
    per_head = [b for name, b in op._index_buffers.items() if name in ("pages", "main", "sample")]
    assert per_head and all(b[0].numel() == 2 * HK + 1 for b in per_head)
    op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu())
    with pytest.raises(RuntimeError, match="graph_batch"):
        capture_graph(lambda: op.run(1, q, pool.k_cache, pool.v_cache, meta))


def _live_allocations() -> dict[int, int]:
    """Address -> requested bytes of every block PyTorch's CUDA caching allocator has handed out now (a segment's
    blocks are listed in address order, each with its size)."""
    live = {}
    for segment in torch.cuda.memory_snapshot(include_traces=False):
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                live[address] = block["requested_size"]
            address += block["size"]
    return live


@pytest.mark.parametrize("method", METHODS + ("dense", "quest-fast", TWILIGHT_SAMPLED))
def test_fixed_bytes_are_what_the_operator_allocates(method):
    """``SparseDecodeOperator.fixed_bytes`` (what the pool sizing takes out of SGLang's KV budget) is the device
    memory an operator takes once it holds the wrappers of every batch size it keeps (the captured ones and
    EAGER_BATCH_SIZES eager ones beyond graph_batch), FlashInfer's own buffers included: the tensors it leaves
    allocated, each rounded as the caching allocator rounds it. (Not ``torch.cuda.memory_allocated``: that also
    counts the slack of a cached block the allocator hands out whole, up to 1 MiB more than asked, which depends on
    what was freed before.)"""
    from sgl_sparse.decode import allocated_bytes, held_batch_sizes

    config = SparseConfig.load(method)
    args = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, num_layers=4, max_batch=24, max_context=8192,
                dtype=torch.bfloat16, max_requests=25, graph_batch=8)
    captured = [1, 2, 4, 8]
    sizes = held_batch_sizes(captured, args["max_batch"])
    want = SparseDecodeOperator.fixed_bytes(config, **args, batch_sizes=sizes)

    def build():
        op = SparseDecodeOperator(config, **args, device=DEV)
        op._captured_sizes.update(captured)                   # as capturing them marks them (kept for good)
        for B in sizes:
            op._buffers(B)
        assert sorted(op._per_batch) == sizes
        return op

    build()                                                    # a first one loads FlashInfer's modules, freed
    gc.collect()               # now, not while the second one builds: blocks freed then (this first operator's, or
    torch.cuda.synchronize()   # earlier tests' cyclic garbage) would be handed to it at addresses `before` lists
    before = _live_allocations()
    gc.disable()
    try:
        op = build()
    finally:
        gc.enable()
    torch.cuda.synchronize()
    taken = sum(allocated_bytes(n) for address, n in _live_allocations().items() if address not in before)
    assert taken == sum(want.values()), want
    assert op.workspace.numel() == want["workspace"]


# ----------------------------------------------------------------------------- int8 page bounds (bounds_dtype int8)

@pytest.mark.parametrize("method", METHODS)
def test_int8_bounds_exact_when_budget_covers_context(method):
    lens = [3000, 1777, 4096]
    config, pool, q, meta, op = _setup(method, lens, HK=2, token_budget=4096, min_context=0, dense_layers=0,
                                       bounds_dtype="int8")
    assert meta.page_key_bounds[0].dtype == torch.uint8
    dense = dense_attention(q, pool.k_cache, pool.v_cache, _batch(op, pool), 1 / math.sqrt(q.shape[-1]))
    assert op.plan(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, pool.seq_lens.cpu(),
                   path="sparse") == "sparse"
    for layer in range(2):
        err = relative_l2(op.run(layer, q, pool.k_cache, pool.v_cache, meta), dense)
        assert err.max().item() < 1e-2, f"{method} int8 bounds: rel err {err.max():.2e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["peaked", "heavy_tailed"])
def test_int8_bounds_operator_matches_reference(method, kind):
    """bounds_dtype int8 through the kernels (update, scores) + FlashInfer == reference_decode with the same config;
    the step's all-layer bounds update keeps the tables equal to the reference's."""
    lens = [9000, 5000, 3000, 12345]
    config, pool, q, meta, op = _setup(method, lens, kind=kind, token_budget=1024, min_context=4000,
                                       dense_layers=1, bounds_dtype="int8")
    _layer_matches_reference(config, pool, q, meta, op)
    # a decode step's bounds update of every layer equals the reference's, byte for byte
    want_tables = [t.clone() for t in meta.page_key_bounds]
    slots = pool.last_slots
    pool.k_cache[slots] = torch.randn((len(lens), pool.k_cache.shape[1], pool.k_cache.shape[2]),
                                      device=DEV).to(pool.k_cache.dtype)
    meta.update_bounds_all_layers([pool.k_cache] * len(meta.page_key_bounds), slots)
    from cupy_kernels import reference as ref
    ref.page_bounds_update_layers([pool.k_cache] * len(want_tables), slots, want_tables, config.page_size)
    assert all(torch.equal(a, b) for a, b in zip(meta.page_key_bounds, want_tables))

