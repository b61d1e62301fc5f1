"""CPU tests of the method layer: configs, the torch reference decode and the fidelity routine."""

from __future__ import annotations

import math

import pytest
import torch

from sgl_sparse import policies
from sgl_sparse.config import SparseConfig, SparseConfigError, presets
from cupy_kernels.reference import merge_states
from sgl_sparse.decode import reference_decode
from sgl_sparse.fidelity import attention_fidelity, dense_attention, relative_l2
from sgl_sparse.metadata import SparseKVMetadata
from sgl_sparse.policies import DecodeBatch
from sgl_sparse.synthetic import make_pool, shape_attention

METHODS = ("quest", "twilight", "vattention")


# ----------------------------------------------------------------------------- configs

def test_presets_load_and_validate():
    assert {"dense", "quest", "twilight", "vattention"} <= set(presets())
    for name in presets():
        cfg = SparseConfig.load(name)
        assert cfg.method == name.split("-")[0]                 # quest-fast: a quest variant
        assert cfg.top_k_pages * cfg.page_size == cfg.token_budget


@pytest.mark.parametrize("field,value,needle", [
    ("method", "topk", "choose one of"),
    ("page_size", 12, "power of two"),
    ("token_budget", 1000, "multiple of page_size"),
    ("token_budget", 32, "sink and local pages"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("epsilon", 1.0, "(0, 1)"),
    ("delta", 0.0, "(0, 1)"),
    ("base_rate", 0.0, "fraction in (0, 1)"),
    ("base_rate", 2.5, "whole number"),
    ("int4_group", 48, "32, 64 or 128"),
    ("sample_capacity", 1, ">= 2"),
    ("dense_layers", -1, ">= 0"),
    ("page_size", "16", "integer"),
    ("coarse_page_tokens", 24, "power of two above page_size"),
    ("coarse_page_tokens", 16, "power of two above page_size"),
    ("coarse_token_budget", 4096, "needs coarse_page_tokens > 0"),
    ("group_score", "min", "choose one of max, mean"),
])
def test_invalid_values_name_field_and_fix(field, value, needle):
    with pytest.raises(SparseConfigError) as e:
        SparseConfig(**{field: value})
    assert field in str(e.value) and needle in str(e.value)


def test_coarse_to_fine_fields():
    cfg = SparseConfig(coarse_page_tokens=64)
    assert cfg.coarse and cfg.coarse_ratio == 4 and cfg.coarse_top_k == 4 * 2048 // 64
    assert SparseConfig(page_size=8, coarse_page_tokens=16, coarse_token_budget=4096).coarse_top_k == 256
    assert not SparseConfig().coarse and SparseConfig().coarse_ratio == 1
    with pytest.raises(SparseConfigError, match="coarse_token_budget=1024 is invalid: must be 0"):
        SparseConfig(coarse_page_tokens=64, coarse_token_budget=1024)     # below token_budget
    with pytest.raises(SparseConfigError, match="coarse_token_budget=2080 is invalid"):
        SparseConfig(coarse_page_tokens=64, coarse_token_budget=2080)     # not whole coarse pages


def test_yaml_unknown_field_and_bad_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: quest\ntoken_budgett: 1024\n")
    with pytest.raises(SparseConfigError, match="unknown field.*token_budgett"):
        SparseConfig.load(str(p))
    with pytest.raises(SparseConfigError, match="presets"):
        SparseConfig.load("no-such-preset")
    p.write_text("method: twilight\ntoken_budget: 1024\ntop_p: 0.9\n")
    cfg = SparseConfig.load(str(p))
    assert cfg.method == "twilight" and cfg.token_budget == 1024 and cfg.top_p == 0.9


def test_config_reports_every_problem_with_its_source(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("method: topk\npage_size: 12\ntop_p: 2\nreselect_every: 0\ntoken_budgett: 5\n")
    with pytest.raises(SparseConfigError) as e:
        SparseConfig.load(str(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    for needle in ("unknown field(s) token_budgett", "method='topk'", "page_size=12", "top_p=2",
                   "reselect_every=0"):
        assert needle in msg, (needle, msg)
    p.write_text("")
    with pytest.raises(SparseConfigError, match="empty"):
        SparseConfig.load(str(p))
    p.write_text("# only a comment\n")
    with pytest.raises(SparseConfigError, match="empty"):
        SparseConfig.load(str(p))
    p.write_text("method: [quest\n")
    with pytest.raises(SparseConfigError, match="not valid YAML"):
        SparseConfig.load(str(p))


def test_inline_overrides_validated_like_a_file(tmp_path):
    cfg = SparseConfig.load("quest:token_budget=1024,reselect_every=4")
    assert (cfg.method, cfg.token_budget, cfg.reselect_every, cfg.page_size) == ("quest", 1024, 4, 16)
    assert SparseConfig.load("twilight:top_p=0.9").top_p == 0.9
    p = tmp_path / "base.yaml"
    p.write_text("method: vattention\n")
    assert SparseConfig.load(f"{p}:epsilon=0.1").epsilon == 0.1
    for spec, needle in [("quest:token_budget=abc", "token_budget='abc' is invalid: must be an integer"),
                         ("quest:budget=1024", "unknown field(s) budget"),
                         ("quest:token_budget", "is not field=value"),
                         ("quest:", "no overrides"),
                         ("nosuch:token_budget=1024", "not a preset")]:
        with pytest.raises(SparseConfigError) as e:
            SparseConfig.load(spec)
        assert needle in str(e.value), (spec, str(e.value))


def test_dense_pages_rounds_min_context_to_pages():
    cfg = SparseConfig(token_budget=256, page_size=16, min_context=4096)
    assert cfg.top_k_pages == 16 and cfg.dense_pages == 256   # a 4095-token request has 256 pages
    assert SparseConfig(token_budget=256, min_context=0).dense_pages == 16


# ----------------------------------------------------------------------------- reference decode

def _setup(method, lens, kind="peaked", seed=0, HK=2, G=3, D=64, **cfg):
    config = SparseConfig.load(method).replace(**cfg)
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(lens, HK, D, config.sglang_page_size, torch.bfloat16, "cpu", gen)
    q = shape_attention(pool, torch.randn((len(lens), HK * G, D), generator=gen).to(torch.bfloat16), kind, gen)
    meta = SparseKVMetadata(config, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                            dtype=torch.bfloat16, device="cpu")
    meta.update_reference(0, pool.k_cache, pool.written_slots)
    batch = DecodeBatch(pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
                        -(-max(lens) // config.page_size) + 1)
    return config, pool, q, meta, batch


@pytest.mark.parametrize("method", METHODS + ("twilight:residual_sample=true",))
def test_reference_exact_when_budget_covers_context(method):
    config, pool, q, meta, batch = _setup(method, [700, 333], token_budget=1024, min_context=0, dense_layers=0)
    sm = 1 / math.sqrt(q.shape[-1])
    out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    dense = dense_attention(q, pool.k_cache, pool.v_cache, batch, sm)
    assert relative_l2(out, dense).max() < 1e-2
    assert torch.equal(counts, pool.seq_lens[:, None].expand_as(counts).to(torch.int32))


@pytest.mark.parametrize("method", METHODS)
def test_reference_selection_is_sparse_and_bounded(method):
    config, pool, q, meta, batch = _setup(method, [1500, 900], token_budget=256, min_context=0, dense_layers=0,
                                          sample_capacity=300)
    out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta)
    lens = pool.seq_lens[:, None]
    assert (counts <= lens).all() and (counts > 0).all()
    partial = (16 - pool.seq_lens % 16) % 16                                   # the last page is always kept
    if method == "quest":
        assert torch.equal(counts, (256 - partial)[:, None].expand_as(counts).to(torch.int32))
    if method == "twilight":
        assert (counts <= 256).all()
    if method == "vattention":
        assert ((counts >= 256) & (counts <= 256 + 300)).all()
    assert torch.isfinite(out.float()).all()


def test_twilight_residual_sample_takes_the_tokens_outside_the_candidates():
    """Twilight with ``residual_sample``: top-p survivors exactly, plus vAttention's sample of the tokens outside
    the candidate pages. With top_p = 1 (every candidate kept) and a sample that takes the whole residual (more
    base draws than residual tokens: exact, weight 1) the two parts are every token: dense attention. With a
    small sample, the counts are the survivors plus at most ``sample_capacity``, and the seeds decide the draws."""
    whole = dict(token_budget=256, min_context=0, dense_layers=0, top_p=1.0, base_rate=100_000,
                 sample_capacity=4096)
    config, pool, q, meta, batch = _setup("twilight:residual_sample=true", [1500, 900], kind="flat", **whole)
    sm = 1 / math.sqrt(q.shape[-1])
    out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    assert relative_l2(out, dense_attention(q, pool.k_cache, pool.v_cache, batch, sm)).max() < 1e-2
    assert torch.equal(counts, pool.seq_lens[:, None].expand_as(counts).to(torch.int32))

    small = dict(token_budget=256, min_context=0, dense_layers=0, sample_capacity=64)
    config, pool, q, meta, batch = _setup("twilight:residual_sample=true", [1500, 900], kind="flat", **small)
    plain = SparseConfig.load("twilight").replace(**small)
    _, survivors = reference_decode(plain, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    seeds = torch.tensor([11, 12])
    out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm, seeds)
    assert ((counts > survivors) & (counts <= survivors + 64)).all(), (counts, survivors)
    again, _ = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm, seeds)
    assert torch.equal(out, again)
    other, _ = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm, seeds + 100)
    assert not torch.equal(out, other)


def test_twilight_residual_sample_recovers_flat_attention():
    """On flat attention top-p over the candidates misses most of the mass; the residual sample estimates it."""
    common = dict(token_budget=256, min_context=0, dense_layers=0, sample_capacity=512)
    plain = attention_fidelity(SparseConfig.load("twilight").replace(**common), kind="flat", context=2048, steps=2,
                               seed=1)
    sampled = attention_fidelity(SparseConfig.load("twilight:residual_sample=true").replace(**common), kind="flat",
                                 context=2048, steps=2, seed=1)
    # every output of plain Twilight is off by more than epsilon (0.05) here; none with the sample
    assert plain.violation_rate == 1.0 and sampled.violation_rate == 0.0
    assert sampled.rel_l2_mean < 0.75 * plain.rel_l2_mean, (sampled.rel_l2_mean, plain.rel_l2_mean)
    assert sampled.attended_fraction > plain.attended_fraction


def test_residual_sample_is_twilights_only():
    assert SparseConfig.load("twilight:residual_sample=true").samples_residual
    assert SparseConfig.load("vattention").samples_residual and not SparseConfig.load("twilight").samples_residual
    with pytest.raises(SparseConfigError, match="residual_sample=True is invalid: only Twilight takes it"):
        SparseConfig.load("quest:residual_sample=true")
    with pytest.raises(SparseConfigError, match="residual_sample=1 is invalid: must be true or false"):
        SparseConfig.load("twilight:residual_sample=1")


def test_min_context_and_dense_layers_fall_back_to_dense():
    config, pool, q, meta, batch = _setup("quest", [2000, 600], token_budget=256, min_context=1000,
                                          dense_layers=0)
    out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta)
    dense = dense_attention(q, pool.k_cache, pool.v_cache, batch, 1 / 8)
    assert (counts[0] == 256).all() and (counts[1] == 600).all()
    assert relative_l2(out[1], dense[1]).max() < 1e-2                       # short request: dense
    config2 = config.replace(dense_layers=1)
    out0, counts0 = reference_decode(config2, 0, q, pool.k_cache, pool.v_cache, batch, meta)
    assert relative_l2(out0, dense).max() < 1e-2 and (counts0 == pool.seq_lens[:, None]).all()


def test_selection_pages_inside_larger_pool_pages():
    """Config page 8 on a pool allocated in 16-token pages (SGLang --page-size 16): every 8-token half page is
    contiguous and aligned, so bounds and selection per 8 tokens work unchanged: exact at a covering budget, and
    the selection attends the 8-token count."""
    gen = torch.Generator().manual_seed(9)
    lens = [1000, 333]
    pool = make_pool(lens, 2, 32, 16, torch.bfloat16, "cpu", gen)
    q = torch.randn((2, 4, 32), generator=gen).to(torch.bfloat16)
    batch = DecodeBatch(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, -(-max(lens) // 8) + 2)
    for budget, exact in ((1024, True), (128, False)):
        config = SparseConfig.load("quest").replace(page_size=8, token_budget=budget, min_context=0, dense_layers=0)
        meta = SparseKVMetadata(config, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=2, head_dim=32,
                                dtype=torch.bfloat16, device="cpu")
        meta.update_reference(0, pool.k_cache, pool.written_slots)
        out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, 1 / 8)
        assert counts.tolist() == [[int(t)] * 2 for t in policies.selected_tokens(config, pool.seq_lens)]
        err = relative_l2(out, dense_attention(q, pool.k_cache, pool.v_cache, batch, 1 / 8)).max()
        assert (err < 1e-2) if exact else (counts < pool.seq_lens[:, None]).all()


def test_merge_states_is_attention_over_the_union():
    gen = torch.Generator().manual_seed(3)
    lg = torch.randn(2, 3, 50, generator=gen) * 2
    v = torch.randn(50, 8, generator=gen)
    def part(sl):
        return torch.softmax(lg[..., sl], -1) @ v[sl], torch.logsumexp(lg[..., sl], -1) / math.log(2)
    oa, la = part(slice(0, 20))
    ob, lb = part(slice(20, 50))
    merged = merge_states(oa, la, ob, lb)
    assert torch.allclose(merged, torch.softmax(lg, -1) @ v, atol=1e-5)
    empty = merge_states(oa, la, torch.zeros_like(ob), torch.full_like(lb, -math.inf))
    assert torch.allclose(empty, oa)


def test_vattention_merge_reference_weights_the_sample():
    """Each sampled token stands for `weight` residual tokens: the merge is attention over deterministic tokens
    plus the sample with its exp-scores multiplied by weight; a KV head without a sample keeps o_det whatever its
    sample outputs hold."""
    from cupy_kernels import reference as ref
    gen = torch.Generator().manual_seed(4)
    B, HK, G, D = 2, 3, 2, 8
    lg_det = torch.randn(B, HK * G, 30, generator=gen) * 2
    lg_s = torch.randn(B, HK * G, 10, generator=gen) * 2
    v_det, v_s = torch.randn(30, D, generator=gen), torch.randn(10, D, generator=gen)
    o_det = torch.softmax(lg_det, -1) @ v_det
    lse_det = torch.logsumexp(lg_det, -1) / math.log(2)
    o_s = torch.softmax(lg_s, -1) @ v_s
    lse_s = torch.logsumexp(lg_s, -1) / math.log(2)
    weight = torch.tensor([[3.0, 0.5, 7.0], [1.0, 40.0, 2.0]])
    s_counts = torch.tensor([[10, 10, 0], [10, 10, 10]], dtype=torch.int32)
    o_s[0, 4:6] = float("nan")                      # KV head 2 of request 0 drew nothing: never read
    lse_s[0, 4:6] = float("nan")
    got = ref.vattention_merge(o_det, lse_det, o_s, lse_s, s_counts, weight)
    w = weight[..., None].expand(B, HK, G).reshape(B, HK * G, 1)
    e_det, e_s = torch.exp(lg_det), torch.exp(lg_s) * w
    want = (e_det @ v_det + e_s @ v_s) / (e_det.sum(-1, keepdim=True) + e_s.sum(-1, keepdim=True))
    sampled = (s_counts > 0)[..., None].expand(B, HK, G).reshape(B, HK * G)
    assert torch.allclose(got[sampled], want[sampled], atol=1e-5)
    assert torch.equal(got[~sampled], o_det[~sampled])


def test_vattention_seeds_vary_by_step_layer_and_row():
    s1 = policies.vattention_seeds(0, torch.tensor([1]), 3, 4)
    assert len(set(s1.tolist())) == 4
    assert not torch.equal(s1, policies.vattention_seeds(0, torch.tensor([2]), 3, 4))
    assert not torch.equal(s1, policies.vattention_seeds(0, torch.tensor([1]), 4, 4))
    assert not torch.equal(s1, policies.vattention_seeds(1, torch.tensor([1]), 3, 4))
    assert torch.equal(s1, policies.vattention_seeds(0, torch.tensor([1]), 3, 4))


@pytest.mark.parametrize("base_seed,step", [(0, 1), (7, 12345), (2**20, 2**40 + 3)])
def test_vattention_seed_split_equals_the_spec(base_seed, step):
    """The operator's split (base once per step into a buffer, + layer stride per layer) gives the spec's seeds,
    int64 wrap-around included."""
    step_t = torch.tensor([step], dtype=torch.int64)
    out = torch.zeros(8, dtype=torch.int64)
    base = policies.vattention_seed_base(base_seed, step_t, 5, out=out[:5])
    assert base.data_ptr() == out.data_ptr()
    for layer in (0, 1, 31, 79):
        want = policies.vattention_seeds(base_seed, step_t, layer, 5)
        assert torch.equal(out[:5] + layer * policies.SEED_LAYER_STRIDE, want), layer


def test_precomputed_fits_budget_is_what_the_policies_use():
    cfg = SparseConfig.load("twilight").replace(token_budget=1024, min_context=0)
    lens = torch.tensor([100, 1024, 1025, 5000])
    batch = policies.DecodeBatch(torch.zeros((4, 8), dtype=torch.int32), torch.arange(4), lens, 400)
    computed = policies.fits_in_budget(cfg, batch)
    assert computed.tolist() == [True, True, False, False]
    pre = policies.DecodeBatch(batch.req_to_token, batch.req_pool_indices, lens.int(), 400,
                               fits_budget=torch.tensor([False, True, False, True]))
    assert policies.fits_in_budget(cfg, pre).tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------- fidelity routine

def test_fidelity_routine_on_cpu():
    """More budget never hurts Quest; vAttention beats Quest at the same deterministic budget on flat
    attention, where top-k alone misses most of the mass."""
    res = {}
    for method in METHODS:
        for budget in (128, 512):
            cfg = SparseConfig.load(method).replace(token_budget=budget, min_context=0, dense_layers=0,
                                                    sample_capacity=1024)
            res[method, budget] = attention_fidelity(cfg, kind="flat", context=2048, steps=2, seed=1)
    assert res["quest", 512].rel_l2_mean <= res["quest", 128].rel_l2_mean
    assert res["vattention", 128].rel_l2_mean < res["quest", 128].rel_l2_mean
    for r in res.values():
        assert 0 < r.attended_fraction <= 1 and r.outputs == 2 * 2 * 8
    peaked = attention_fidelity(SparseConfig.load("quest").replace(token_budget=256, min_context=0,
                                                                   dense_layers=0),
                                kind="peaked", context=2048, steps=1, seed=2)
    assert peaked.rel_l2_mean < res["quest", 128].rel_l2_mean   # the needles are found



def test_host_token_counts_match_the_selection():
    """plan() tells FlashInfer each row's length from the host lengths (policies.selected_tokens); the tokens the
    selection attends must be exactly that many, or FlashInfer's split of the work would cut rows short."""
    lens = [4095, 4096, 4097, 5000, 64 * 16 + 1, 20000, 1]
    config, pool, q, meta, batch = _setup("quest", lens, token_budget=1024, min_context=4097, dense_layers=0)
    _, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta)
    want = policies.selected_tokens(config, torch.tensor(lens))
    assert counts.tolist() == [[int(t)] * 2 for t in want]
    assert want[:4].tolist() == [4095, 4096, 64 * 16 - 15, 64 * 16 - 8]      # all pages; top-k, last page partial


# ----------------------------------------------------------------------------- selection reuse

def _reuse_plan(reuse, slots, lens):
    out = torch.empty(len(slots), dtype=torch.int32)
    batch = DecodeBatch(torch.zeros((1, 1), dtype=torch.int32), torch.tensor(slots),
                        torch.tensor(lens, dtype=torch.int32), 1)
    return reuse.plan(batch, out=out).tolist()


def test_selection_reuse_per_request_slot():
    """A kept selection serves its own request slot for reselect_every - 1 steps, then the slot selects again;
    a slot that restarts (forget), a slot whose request is shorter than its kept selection, rows within the
    budget and CUDA-graph padding rows (slot 0, seq_len 1) never reuse nor disturb what another slot kept."""
    cfg = SparseConfig(token_budget=256, page_size=16, min_context=0, reselect_every=4)
    reuse = policies.SelectionReuse(cfg, num_layers=2, max_reqs=6, num_kv_heads=2, device="cpu")
    assert reuse.kept.shape == (2, 6, 2, 16)
    assert _reuse_plan(reuse, [3, 0], [5000, 6000]) == [0, 0]                    # nothing kept yet: select
    assert _reuse_plan(reuse, [3, 0], [5000, 6000]) == [0, 0]                    # the same step planned again
    assert _reuse_plan(reuse, [3, 0, 0], [5001, 6001, 1]) == [5000, 6000, 0]      # reuse; a padding row
    assert _reuse_plan(reuse, [0, 3], [6002, 5002]) == [6000, 5000]              # batch order changed
    assert _reuse_plan(reuse, [3, 0, 4], [5003, 6003, 100]) == [5000, 6000, 0]   # slot 4 fits the budget
    assert _reuse_plan(reuse, [3, 0], [5004, 6004]) == [0, 0]                    # grown by 4: select again
    assert reuse.selected_at[[3, 0, 4]].tolist() == [5004, 6004, 0]
    reuse.forget(torch.tensor([3]))                                               # slot 3 restarts
    assert _reuse_plan(reuse, [3, 0], [5005, 6005]) == [0, 6004]
    assert _reuse_plan(reuse, [0], [4000]) == [0]                                 # a new, shorter request in slot 0
    assert reuse.selected_at[0].item() == 4000


def test_drift_test_selects_again_where_the_query_moved():
    """reselect_min_cosine: a reusing step serves the plan's kept selection while the query stays; a request whose
    query turned around selects again in that layer at once (a fresh top-k), and the steps after reuse that newer
    selection, appending only the pages after it (no page attended twice). The other request is unaffected."""
    config, pool, q, meta, batch = _setup("quest", [3000, 2200], token_budget=512, min_context=0, dense_layers=0,
                                          reselect_every=64, reselect_min_cosine=0.5)
    assert config.drift_test
    reuse = policies.SelectionReuse(config, 1, pool.req_to_token.shape[0], 2, "cpu", q.shape[-1], q.dtype)
    reuse_from = torch.empty(2, dtype=torch.int32)
    lens0 = pool.seq_lens.clone()
    P, top_k = config.page_size, config.top_k_pages
    moved = q.clone()
    moved[0] = -q[0]
    n0 = -(-(lens0 - 63) // P)                                  # pages at the planned selection
    pages_at = [None, None]
    for step, (grow, query) in enumerate([(0, q), (20, q), (40, moved), (63, moved)]):
        batch.seq_lens = lens0 - 63 + grow
        batch.reuse_from = reuse.plan(batch, out=reuse_from)
        _, counts = reference_decode(config, 0, query, pool.k_cache, pool.v_cache, batch, meta,
                                     kept_selection=reuse.layer(0), kept_query=reuse.layer_queries(0))
        n = -(-batch.seq_lens // P)
        last = batch.seq_lens - (n - 1) * P
        if step == 2:
            pages_at[0] = int(n[0])                             # request 0 selects again here
        if step == 0:                                           # both select: top_k pages
            first_new = n.tolist()
        else:                                                   # both reuse: the pages after their selection
            first_new = [int(n0[0]) if step == 1 else pages_at[0], int(n0[1])]
        want = [(top_k + int(n[b]) - first_new[b] - 1) * P + int(last[b]) for b in range(2)]
        assert counts.tolist() == [[w] * 2 for w in want], step
    assert pages_at[0] > n0[0]


def test_a_kept_selection_serves_only_its_own_budget():
    """A slot's kept selection holds its request's k pages: a step planning another k for that slot (a new request
    with another budget in a slot not forgotten, or any caller mixing budgets) selects instead of reusing."""
    cfg = SparseConfig(token_budget=256, page_size=16, min_context=0, reselect_every=4)
    reuse = policies.SelectionReuse(cfg, num_layers=1, max_reqs=4, num_kv_heads=2, device="cpu")
    out = torch.empty(2, dtype=torch.int32)

    def plan(lens, pages):
        batch = DecodeBatch(torch.zeros((1, 1), dtype=torch.int32), torch.tensor([1, 2]),
                            torch.tensor(lens, dtype=torch.int32), 1,
                            row_top_k=torch.tensor(pages, dtype=torch.int32))
        return reuse.plan(batch, out=out).tolist()

    assert plan([5000, 6000], [8, 16]) == [0, 0]
    assert reuse.kept_pages[[1, 2]].tolist() == [8, 16]
    assert plan([5001, 6001], [8, 16]) == [5000, 6000]              # the same budgets: reuse
    assert plan([5002, 6002], [16, 16]) == [0, 6000]                # slot 1 now asks for 16 pages: select
    assert reuse.kept_pages[[1, 2]].tolist() == [16, 16]


def test_selection_reuse_attends_kept_pages_and_every_new_one():
    """Reference decode over steps: a reusing step attends the pages kept at the selecting step plus every page
    written since, so the newest token is always attended; a budget covering the context stays exact."""
    config, pool, q, meta, batch = _setup("quest", [3000, 2200], token_budget=512, min_context=0, dense_layers=0,
                                          reselect_every=64)
    reuse = policies.SelectionReuse(config, 1, pool.req_to_token.shape[0], 2, "cpu")
    reuse_from = torch.empty(2, dtype=torch.int32)
    lens0 = pool.seq_lens.clone()
    for step, grow in enumerate([0, 5, 30, 63]):
        batch.seq_lens = lens0 - 63 + grow                                     # the requests grow by `grow` tokens
        batch.reuse_from = reuse.plan(batch, out=reuse_from)
        assert batch.reuse_from.tolist() == ([0, 0] if step == 0 else (lens0 - 63).tolist())
        _, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta,
                                     kept_selection=reuse.layer(0))
        P = config.page_size
        n0 = -(-(lens0 - 63) // P)
        n = -(-batch.seq_lens // P)
        last = batch.seq_lens - (n - 1) * P
        want = (config.top_k_pages + n - n0 - 1) * P + last
        assert counts.tolist() == [[int(w)] * 2 for w in want], step
        assert (policies.selected_tokens(config, batch.seq_lens) >= want).all()
    # a budget covering the context: exact (every row fits; nothing kept)
    config, pool, q, meta, batch = _setup("quest", [700, 333], token_budget=1024, min_context=0, dense_layers=0,
                                          reselect_every=4)
    reuse = policies.SelectionReuse(config, 1, pool.req_to_token.shape[0], 2, "cpu")
    batch.reuse_from = reuse.plan(batch, out=reuse_from)
    out, _ = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, 1 / 8,
                              kept_selection=reuse.layer(0))
    assert relative_l2(out, dense_attention(q, pool.k_cache, pool.v_cache, batch, 1 / 8)).max() < 1e-2
    assert (reuse.selected_at[:-1] == 0).all()                # the last entry absorbs the rows that keep nothing


def test_pool_append_token_follows_the_paged_allocator():
    gen = torch.Generator().manual_seed(5)
    pool = make_pool([15, 16, 17], 2, 8, 16, torch.float32, "cpu", gen)
    last = pool.last_slots.clone()
    free = list(pool.free_pages)
    new = torch.zeros(3, dtype=torch.int64)
    pool.append_token(new)
    assert pool.seq_lens.tolist() == [16, 17, 18] and torch.equal(pool.last_slots, new)
    assert new[0] == last[0] + 1 and new[2] == last[2] + 1                 # within the request's last page
    assert new[1] % 16 == 0 and int(new[1]) // 16 == free[-1]              # a page boundary: a free page
    assert pool.free_pages == free[:-1]


def test_drift_test_refuses_more_than_32_kv_heads_per_rank():
    """The drift kernel runs a warp per KV head in one block: more than 32 KV heads per rank is refused when the
    operator is built, naming the fix (the plain reuse and the other methods have no such limit)."""
    from sgl_sparse.decode import SparseDecodeOperator

    cfg = SparseConfig.load("quest-fast")
    with pytest.raises(ValueError, match="up to 32 KV heads per rank.*reselect_min_cosine: -1"):
        SparseDecodeOperator(cfg, num_qo_heads=40, num_kv_heads=40, head_dim=128, num_layers=4, max_batch=2,
                             max_context=8192, device="cpu")
    with pytest.raises(ValueError, match="head_dim and dtype"):
        policies.SelectionReuse(cfg, 2, 4, 2, "cpu")


@pytest.mark.parametrize("method", METHODS)
def test_per_request_budgets_in_the_reference_step(method):
    """DecodeBatch.row_top_k: each request attends what its own budget gives (Quest: exactly selected_tokens with
    its pages; Twilight and vAttention: their candidates / exact part from that many pages), a request within its
    own budget is attended densely, and with every budget at the config's the step is the config's."""
    config, pool, q, meta, batch = _setup(method, [3000, 3000, 700, 900], token_budget=1024, min_context=0,
                                          dense_layers=0)
    sm = 1 / math.sqrt(q.shape[-1])
    P = config.page_size
    _, base = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    batch.row_top_k = torch.tensor([config.top_k_pages] * 4, dtype=torch.int32)
    _, same = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    assert torch.equal(same, base)
    pages = torch.tensor([16, config.top_k_pages, 48, 16], dtype=torch.int32)   # 256, 1024, 768, 256 tokens
    batch.row_top_k = pages
    out, counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    want = policies.selected_tokens(config, pool.seq_lens, pages)
    # 3000 = 187.5 pages; 700 and 900 tokens are within the server's 64 pages: dense whatever they ask for
    assert want.tolist() == [16 * P - 8, 64 * P - 8, 700, 900]
    if method == "quest":
        assert counts.tolist() == [[int(w)] * 2 for w in want]
    elif method == "twilight":                                                  # top-p keeps part of them
        assert (counts[:2] <= want[:2, None]).all()
    else:                                                                       # the exact pages + a sample
        assert (counts[:2] >= want[:2, None]).all()
    assert counts[2:].tolist() == [[700] * 2, [900] * 2]
    dense = dense_attention(q, pool.k_cache, pool.v_cache, batch, sm)
    assert relative_l2(out[2:], dense[2:]).max() < 1e-2                        # within the server's budget: dense


def test_request_budget_problems():
    cfg = SparseConfig.load("quest")                                            # 2048 tokens, page 16, 1 + 4 pages
    assert cfg.request_budget_problem(1024) is None and cfg.request_budget_problem(80) is None
    for bad in (64, 2064, 1000, 4096, "512", True, 512.0):
        assert cfg.request_budget_problem(bad), bad
    assert "multiple of 16 between 80" in cfg.request_budget_problem(1000)


# ----------------------------------------------------------------------------- coarse-to-fine scoring

def _coarse_case(lens, coarse_budget, *, P=8, C=32, seed=3, kind="heavy_tailed"):
    """A pool of C-token SGLang pages, q, a config with coarse-to-fine scoring and the same config without it,
    each with its tables and the batch."""
    config = SparseConfig.load("quest").replace(page_size=P, token_budget=8 * P, sink_tokens=P, local_tokens=2 * P,
                                                min_context=0, dense_layers=0, coarse_page_tokens=C,
                                                coarse_token_budget=coarse_budget, bounds_dtype="bf16")
    plain = config.replace(coarse_page_tokens=0, coarse_token_budget=0)
    gen = torch.Generator().manual_seed(seed)
    HK, G, D = 2, 3, 64
    pool = make_pool(lens, HK, D, C, torch.bfloat16, "cpu", gen)
    q = shape_attention(pool, torch.randn((len(lens), HK * G, D), generator=gen).to(torch.bfloat16), kind, gen)
    tables = {}
    for cfg in (config, plain):
        meta = SparseKVMetadata(cfg, num_layers=1, num_slots=pool.k_cache.shape[0], num_kv_heads=HK, head_dim=D,
                                dtype=torch.bfloat16, device="cpu")
        meta.update_reference(0, pool.k_cache, pool.written_slots)
        tables[cfg.coarse] = policies.LayerTables(meta.page_key_bounds[0], coarse_key_bounds=(
            meta.coarse_key_bounds[0] if meta.coarse_key_bounds else None))
    batch = DecodeBatch(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, -(-max(lens) // P) + 2)
    return config, plain, tables, q, batch


def test_coarse_to_fine_selects_like_quest_when_every_coarse_page_is_kept():
    import cupy_kernels.reference as ref

    lens = [1000, 70, 513, 2047]
    whole = -(-max(lens) // 32) * 32
    config, plain, tables, q, batch = _coarse_case(lens, whole)
    got = policies.select_pages(ref, config, q, tables[True], batch)
    want = policies.select_pages(ref, plain, q, tables[False], batch)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_coarse_to_fine_selects_inside_the_kept_coarse_pages():
    """With a small coarse budget: the same number of pages as Quest, each a sink, local page or a page inside
    one of the coarse pages with the best coarse scores, and among those the best by fine score."""
    import cupy_kernels.reference as ref

    lens = [1000, 2047, 1500]
    config, plain, tables, q, batch = _coarse_case(lens, 16 * 32)
    P, C, R = config.page_size, config.coarse_page_tokens, config.coarse_ratio
    sel, cnt = policies.select_pages(ref, config, q, tables[True], batch)
    _, want_cnt = policies.select_pages(ref, plain, q, tables[False], batch)
    assert torch.equal(cnt, want_cnt)
    fine = ref.quest_page_scores(q, tables[True].page_key_bounds, batch.req_to_token, batch.req_pool_indices,
                                 batch.seq_lens, P, batch.max_pages)
    coarse = ref.quest_page_scores(q, tables[True].coarse_key_bounds, batch.req_to_token, batch.req_pool_indices,
                                   batch.seq_lens, C, -(-batch.max_pages // R))
    for b, n_tokens in enumerate(lens):
        n = -(-n_tokens // P)
        for h in range(cnt.shape[1]):
            n_coarse = -(-n // R)
            bound = coarse[b, h, :n_coarse].repeat_interleave(R)[:n]
            kept = set(torch.sort(coarse[b, h, :n_coarse], descending=True, stable=True).indices[
                :config.coarse_top_k].tolist())
            forced = set(range(config.sink_pages)) | set(range(n - config.local_pages, n))
            chosen = set(sel[b, h, :int(cnt[b, h])].tolist())
            free = chosen - forced
            assert all(j // R in kept for j in free), (b, h)
            candidates = [j for j in range(n) if j // R in kept and j not in forced]
            best = sorted(candidates, key=lambda j: (-float(fine[b, h, j]), j))[:len(free)]
            assert free == set(best), (b, h)


@pytest.mark.parametrize("method", METHODS)
def test_reference_decode_with_a_covering_coarse_budget_equals_plain_selection(method):
    """Every method's decode through coarse-to-fine scoring, with a coarse budget that covers the context, equals its
    decode without it (the same pages, the same output); and it is sparse (the budget is far below the context)."""
    lens = [700, 333]
    config, pool, q, meta, batch = _setup(method, lens, token_budget=128, min_context=0, dense_layers=0, page_size=8,
                                          coarse_page_tokens=16, coarse_token_budget=704, bounds_dtype="bf16")
    plain = config.replace(coarse_page_tokens=0, coarse_token_budget=0)
    plain_meta = SparseKVMetadata(plain, num_layers=1, num_slots=pool.k_cache.shape[0],
                                  num_kv_heads=pool.k_cache.shape[1], head_dim=q.shape[-1], dtype=torch.bfloat16,
                                  device="cpu")
    plain_meta.update_reference(0, pool.k_cache, pool.written_slots)
    sm = 1 / math.sqrt(q.shape[-1])
    got, got_counts = reference_decode(config, 0, q, pool.k_cache, pool.v_cache, batch, meta, sm)
    want, want_counts = reference_decode(plain, 0, q, pool.k_cache, pool.v_cache, batch, plain_meta, sm)
    assert torch.equal(got_counts, want_counts) and torch.equal(got, want)
    if method != "vattention":          # vAttention's sample may cover a short residual whole
        assert (got_counts < pool.seq_lens[:, None]).all()


def test_default_coarse_budget_keeps_more_than_the_top_k():
    assert SparseConfig(page_size=16, token_budget=256, coarse_page_tokens=2048).coarse_top_k == 2
    assert SparseConfig(coarse_page_tokens=64).coarse_top_k == 4 * 2048 // 64
    cfg = SparseConfig(token_budget=1008, page_size=16, coarse_page_tokens=512)
    assert cfg.coarse_top_k * 512 >= 1008 + 512


def test_coarse_tables_are_counted_and_refreshed():
    cfg = SparseConfig.load("quest").replace(coarse_page_tokens=64, bounds_dtype="bf16")
    plain = SparseKVMetadata.bytes_per_token(cfg.replace(coarse_page_tokens=0), 8, 128, torch.bfloat16)
    assert SparseKVMetadata.bytes_per_token(cfg, 8, 128, torch.bfloat16) == plain + 2 * 8 * 128 * 2 // 64
    meta = SparseKVMetadata(cfg, num_layers=2, num_slots=256, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                            device="cpu")
    assert [tuple(t.shape) for t in meta.coarse_key_bounds] == [(4, 2, 2, 64)] * 2
    k = torch.randn((256, 2, 64)).to(torch.bfloat16)
    meta.update_reference(1, k, torch.arange(64, 128))
    assert torch.equal(meta.coarse_key_bounds[1][1, :, 0], k[64:128].amin(0))
    assert torch.equal(meta.coarse_key_bounds[1][1, :, 1], k[64:128].amax(0))
    assert not meta.coarse_key_bounds[0].any()
    with pytest.raises(ValueError, match="multiple of page_size"):
        SparseKVMetadata(cfg, num_layers=1, num_slots=96, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                         device="cpu")


@pytest.mark.parametrize("coarse", [0, 32])
def test_group_score_reaches_the_selection(coarse):
    """group_score "mean" ranks pages by the mean of the group's bounds, with or without the coarse pass: the
    selection is the top-k of those scores, and differs from the max's on this data."""
    import cupy_kernels.reference as ref

    lens = [1000, 2047]
    config, plain, tables, q, batch = _coarse_case(lens, -(-max(lens) // 32) * 32)
    if not coarse:
        config = plain
    mean_cfg = config.replace(group_score="mean")
    got = policies.select_pages(ref, mean_cfg, q, tables[bool(coarse)], batch)
    scores = ref.quest_page_scores(q, tables[bool(coarse)].page_key_bounds, batch.req_to_token,
                                   batch.req_pool_indices, batch.seq_lens, config.page_size, batch.max_pages,
                                   group_score="mean")
    want = ref.topk_pages(scores, batch.seq_lens, config.page_size, config.top_k_pages, config.sink_pages,
                          config.local_pages, select_all_upto=config.dense_pages)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    by_max = policies.select_pages(ref, config, q, tables[bool(coarse)], batch)
    assert not torch.equal(got[0], by_max[0])


def test_batch_floor_decides_the_dense_path():
    """min_batch_tokens: a step selects only when its requests past the budget hold at least that many tokens in
    all; shorter requests and opted-out rows do not count toward it, and 0 keeps the old rule (any long request)."""
    config = SparseConfig.load("quest").replace(token_budget=1024, min_context=4096, min_batch_tokens=20000)
    lens = torch.tensor([9000, 8000, 3000, 1])                  # 17000 tokens past the budget, 3001 within it
    assert not policies.needs_selection(config, lens)
    assert not policies.needs_selection(config, torch.tensor([9000, 8000, 3000, 3000]))  # short ones do not count
    assert policies.needs_selection(config, torch.tensor([12000, 8000, 3000]))             # 20000: at the floor
    assert not policies.needs_selection(config, torch.tensor([12000, 8000]), torch.tensor([False, True]))
    off = config.replace(min_batch_tokens=0)
    assert policies.needs_selection(off, lens)
    assert not policies.needs_selection(off, torch.tensor([3000, 4096, 1]))         # every one within its budget
    assert not policies.needs_selection(SparseConfig(method="dense"), torch.tensor([10**6]))


def test_batch_floor_is_validated_and_the_long_chains_set_it():
    """vAttention and Twilight (measured slower than dense serving one or four 32K requests without it) keep a
    quiet server's steps on the dense path; the Quest presets, faster than dense there, select from one request."""
    with pytest.raises(SparseConfigError, match="min_batch_tokens=-1 is invalid"):
        SparseConfig(min_batch_tokens=-1)
    with pytest.raises(SparseConfigError, match="min_batch_tokens=.*must be an integer"):
        SparseConfig.load("quest:min_batch_tokens=0.5")
    for preset in ("vattention", "twilight"):
        assert SparseConfig.load(preset).min_batch_tokens > 4 * 32768, preset
    assert {p: SparseConfig.load(p).min_batch_tokens for p in ("quest", "quest-fast")} == {"quest": 0, "quest-fast": 0}
