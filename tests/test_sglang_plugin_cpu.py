"""The SGLang plugin on CPU, against the real sglang 0.5.17: discovery, --help, start-up errors.

Each check runs SGLang in a subprocess (plugins patch SGLang's globals once per process, as in a server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

pytest.importorskip("sglang")

from sgl_sparse.sglang_backend import BACKEND_NAME  # noqa: E402


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _server_args_outcomes(cases: dict, build: str) -> dict:
    """Run ``build`` (a statement over ``case``) for every case in one fresh process with the plugin loaded; returns
    name -> [exception type or "ok", message, the config published for the scheduler processes]."""
    code = f"""
        import json, os
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import ServerArgs, prepare_server_args
        from sgl_sparse.config import SparseConfig
        out = {{}}
        for name, case in {json.dumps(cases)}.items():
            os.environ.pop("SGL_SPARSE_CONFIG", None)
            try:
                {build}
                out[name] = ["ok", "", os.environ.get("SGL_SPARSE_CONFIG", "")]
            except Exception as e:
                out[name] = [type(e).__name__, str(e), os.environ.get("SGL_SPARSE_CONFIG", "")]
        print("RESULT" + json.dumps(out))
    """
    p = _run(code)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(line[0][len("RESULT"):])


def test_entry_point_is_discovered():
    eps = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
    assert eps.get(BACKEND_NAME) == "sgl_sparse.sglang_backend:register"


def test_launch_server_help_lists_backend_and_sparse_config():
    p = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-2000:]
    choices = [line for line in p.stdout.splitlines() if line.strip().startswith("--attention-backend {")]
    assert choices and BACKEND_NAME in choices[0]
    assert "--sparse-config SPARSE_CONFIG" in p.stdout
    assert "preset name" in p.stdout


def test_startup_errors_name_the_flag(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: quest\ntoken_budget: 100\n")
    cases = {
        "page": [],
        "preset": ["--page-size", "16", "--sparse-config", "nope"],
        "yaml": ["--page-size", "16", "--sparse-config", str(bad_yaml)],
        "dp": ["--page-size", "16", "--enable-dp-attention"],
        "spec": ["--page-size", "16", "--speculative-algorithm", "EAGLE"],
        "hicache": ["--page-size", "16", "--enable-hierarchical-cache"],
        "pd": ["--page-size", "16", "--disaggregation-mode", "prefill"],
        "page32": ["--page-size", "16", "--sparse-config", str(tmp_path / "p32.yaml")],
        "page8": ["--page-size", "16", "--sparse-config", "quest:page_size=8"],
        "coarse64": ["--page-size", "16", "--sparse-config", "quest:bounds_dtype=bf16,coarse_page_tokens=64"],
        "coarse64_ok": ["--page-size", "64", "--sparse-config", "quest:bounds_dtype=bf16,coarse_page_tokens=64"],
        "coarse_int8": ["--page-size", "64", "--sparse-config", "quest:coarse_page_tokens=64"],  # preset: int8 bounds
        "no_backend": ["--sparse-config", "quest"],
        "split_decode": ["--page-size", "16", "--decode-attention-backend", "triton"],
        "split_prefill": ["--page-size", "16", "--prefill-attention-backend", "triton"],
        "fp8": ["--page-size", "16", "--kv-cache-dtype", "fp8_e4m3"],
        "pp": ["--page-size", "16", "--pp-size", "2"],
        "tbo": ["--page-size", "16", "--enable-two-batch-overlap"],
        "lmcache": ["--page-size", "16", "--enable-lmcache"],
        "flexkv": ["--page-size", "16", "--enable-flexkv"],
        "decode_only": ["--page-size", "16", "--decode-attention-backend", "sgl_sparse"],
        "ok": ["--page-size", "16", "--sparse-config", "twilight"],
    }
    (tmp_path / "p32.yaml").write_text("method: quest\npage_size: 32\n")
    cases = {name: ["flashinfer" if name in ("no_backend", "decode_only") else BACKEND_NAME, extra]
             for name, extra in cases.items()}
    out = _server_args_outcomes(cases, 'prepare_server_args(["--model-path", "/nonexistent-model", '
                                       '"--attention-backend", case[0]] + case[1])')
    assert out["page"][0] == "SparseServerArgsError" and "--page-size 16" in out["page"][1]
    assert out["preset"][0] == "SparseConfigError" and "presets:" in out["preset"][1]
    assert out["yaml"][0] == "SparseConfigError" and "token_budget" in out["yaml"][1]
    assert "remove --enable-dp-attention" in out["dp"][1]
    assert "remove --speculative-algorithm" in out["spec"][1]
    # the hierarchical cache is served (its load-backs refresh the side tables): our checks pass it
    assert "Sparse" not in out["hicache"][0] and json.loads(out["hicache"][2])["method"] == "quest"
    assert "remove --disaggregation-mode" in out["pd"][1]
    assert "needs a --page-size that is a multiple of it, e.g. --page-size 32" in out["page32"][1]
    assert "Sparse" not in out["page8"][0] and json.loads(out["page8"][2])["page_size"] == 8
    assert "coarse_page_tokens=64 needs a --page-size that is a multiple of it, e.g. --page-size 64" in \
        out["coarse64"][1]
    assert "Sparse" not in out["coarse64_ok"][0] and json.loads(out["coarse64_ok"][2])["coarse_page_tokens"] == 64
    assert out["coarse_int8"][0] == "SparseConfigError" and \
        "choose bf16 (e.g. quest:bounds_dtype=bf16,coarse_page_tokens=64)" in out["coarse_int8"][1]
    assert out["no_backend"][0] == "SparseConfigError" and "no effect" in out["no_backend"][1]
    assert "remove --decode-attention-backend triton" in out["split_decode"][1]
    assert "remove --prefill-attention-backend triton" in out["split_prefill"][1]
    assert "remove --kv-cache-dtype fp8_e4m3" in out["fp8"][1]
    assert "remove --pp-size" in out["pp"][1]
    assert "--enable-two-batch-overlap: remove it" in out["tbo"][1]
    assert "--enable-lmcache: remove it" in out["lmcache"][1]
    assert "--enable-flexkv: remove it" in out["flexkv"][1]
    assert "pass --attention-backend sgl_sparse instead" in out["decode_only"][1]
    # A valid combination passes our checks and publishes the config for the scheduler processes (SGLang itself
    # may then stop on this CPU machine: no accelerator, no such model).
    assert "Sparse" not in out["ok"][0]
    assert json.loads(out["ok"][2])["method"] == "twilight"


def test_load_back_hook_refreshes_the_loaded_slots():
    """The hierarchical cache's per-layer copy from host memory is followed by a refresh of exactly those slots'
    side tables, for that layer (host-side indices moved to the device); nothing without a sparse backend."""
    from types import SimpleNamespace

    import torch

    from sgl_sparse import sglang_backend as sb

    calls = []
    ours = [torch.zeros(4) for _ in range(6)]
    backend = SimpleNamespace(config=SimpleNamespace(is_sparse=True), key_buffers=ours,
                              refresh_slots=lambda layer, keys, slots: calls.append((layer, keys, slots.tolist())))
    device_pool = SimpleNamespace(_get_key_buffer=lambda layer: ours[layer])
    draft_pool = SimpleNamespace(_get_key_buffer=lambda layer: torch.zeros(4))     # another pool's layers
    saved = dict(sb._ACTIVE)
    try:
        sb._ACTIVE.clear()
        assert sb._refresh_loaded_kv(None, "host", device_pool, None, torch.tensor([16, 17]), 3, "kernel") is None
        assert calls == []
        sb._ACTIVE["backend"] = backend
        sb._refresh_loaded_kv(None, "host", device_pool, torch.tensor([0, 1]), torch.tensor([32, 33, 34]), 5, "direct")
        sb._refresh_loaded_kv(None, "host", draft_pool, torch.tensor([0]), torch.tensor([48]), 1, "kernel")
        assert calls == [(5, ours[5], [32, 33, 34])]
    finally:
        sb._ACTIVE.clear()
        sb._ACTIVE.update(saved)
    for target in sb.LOAD_BACK_TARGETS:                 # the SGLang symbols exist with the signature used
        import inspect
        import pkgutil

        cls_path, method = target.rsplit(".", 1)
        params = list(inspect.signature(getattr(pkgutil.resolve_name(cls_path), method)).parameters)
        assert params[:5] == ["self", "device_pool", "host_indices", "device_indices", "layer_id"], (target, params)
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    assert callable(MHATokenToKVPool._get_key_buffer)


def test_python_api_checks_like_the_cli():
    """sgl.Engine / Runtime build ServerArgs(**kwargs) without the CLI: sparse_config= is accepted there and
    validated, the server flags checked and the config published exactly as with launch_server."""
    cases = {
        "bad": dict(attention_backend=BACKEND_NAME, page_size=16, sparse_config="quest:token_budget=1000"),
        "page": dict(attention_backend=BACKEND_NAME, sparse_config="twilight"),
        "fp8": dict(attention_backend=BACKEND_NAME, page_size=16, kv_cache_dtype="fp8_e4m3"),
        "no_backend": dict(sparse_config="quest"),
        "ok": dict(attention_backend=BACKEND_NAME, page_size=16, sparse_config="quest-fast:token_budget=1024"),
        "default": dict(attention_backend=BACKEND_NAME, page_size=16),
        "object": dict(attention_backend=BACKEND_NAME, page_size=16, sparse_config="@quest-fast"),   # a SparseConfig
        "not_a_name": dict(attention_backend=BACKEND_NAME, page_size=16, sparse_config=7),
    }
    out = _server_args_outcomes(cases, 'ServerArgs(model_path="/nonexistent-model", **{k: SparseConfig.load(v[1:]) '
                                       'if k == "sparse_config" and str(v).startswith("@") else v '
                                       'for k, v in case.items()})')
    assert out["bad"][0] == "SparseConfigError" and "token_budget=1000 is invalid" in out["bad"][1]
    assert out["page"][0] == "SparseServerArgsError" and "e.g. --page-size 16 (got --page-size 1)" in out["page"][1]
    assert "remove --kv-cache-dtype fp8_e4m3" in out["fp8"][1]
    assert out["no_backend"][0] == "SparseConfigError" and "sparse_config='quest' has no effect" in out["no_backend"][1]
    # valid: our checks pass and the config is published (SGLang itself may then stop: no accelerator here)
    assert "Sparse" not in out["ok"][0] and "Sparse" not in out["default"][0]
    published = json.loads(out["ok"][2])
    assert published["reselect_every"] == 4 and published["token_budget"] == 1024
    assert json.loads(out["default"][2])["method"] == "quest"
    assert json.loads(out["object"][2])["reselect_every"] == 4
    assert out["not_a_name"][0] == "SparseConfigError" and "sparse_config=7" in out["not_a_name"][1]


@pytest.mark.parametrize("extra,needle", [
    (["--page-size", "16", "--sparse-config", "quest:token_budget=1000,top_p=7"],
     "token_budget=1000 is invalid: must be a positive multiple of page_size (16); top_p=7 is invalid"),
    (["--sparse-config", "quest"], "a multiple of it, e.g. --page-size 16 (got --page-size 1)"),
])
def test_launch_server_bad_input_is_one_line_and_exit_2(extra, needle):
    p = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", "/nonexistent-model",
                        "--attention-backend", BACKEND_NAME, *extra], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("sglang.launch_server: error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr[-3000:]


def test_hook_targets_exist_in_this_sglang():
    """Every SGLang attribute the plugin patches resolves in the installed sglang (0.5.17)."""
    import pkgutil

    from sgl_sparse import sglang_backend

    import inspect

    # target -> the leading parameters our hook relies on
    targets = {"sglang.srt.server_args.ServerArgs.add_cli_args": ["parser"],
               "sglang.srt.server_args.ServerArgs.from_cli_args": ["args"],
               sglang_backend.CELL_SIZE_TARGET: ["self", "kvc", "num_layers"],
               sglang_backend.POOL_BUDGET_TARGET: ["self", "pre_model_load_memory"],
               sglang_backend.VERIFY_TARGET: ["self", "vocab_size"],
               sglang_backend.FORWARD_BATCH_TARGET: ["batch", "model_runner"],
               sglang_backend.CAN_RUN_GRAPH_TARGET: ["self", "forward_batch"],
               sglang_backend.CAPTURE_SHAPE_TARGET: ["self", "size", "forward", "stream_idx", "variant_label"],
               sglang_backend.GRAPH_VARIANT_TARGET: ["self", "forward_batch"],
               sglang_backend.DECODE_RESULT_TARGET: ["self", "batch"],
               sglang_backend.PREFILL_RESULT_TARGET: ["self", "batch"],
               sglang_backend.COLLECT_INFO_TARGET: ["self", "i", "req"],
               sglang_backend.SERVER_ARGS_INIT_TARGET: ["self"],
               sglang_backend.SERVER_ARGS_POST_INIT_TARGET: ["self"]}
    for t, params in targets.items():
        owner, attr = t.rsplit(".", 1)
        fn = getattr(pkgutil.resolve_name(owner), attr)
        names = list(inspect.signature(fn).parameters)
        assert names[: len(params)] == params, (t, names)
    from sglang.srt.model_executor import pool_configurator
    assert hasattr(pool_configurator, "get_parallel")
    # what the pool-budget hook calls: SGLang's own sizing of the pool, the request slots and the captured batches
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.runner.base_cuda_graph_runner import get_batch_sizes_to_capture
    assert list(inspect.signature(KVCacheConfigurator.config_from_budget).parameters)[:2] == ["self", "budget_bytes"]
    assert list(inspect.signature(KVCacheConfigurator.resolve_max_num_reqs).parameters) == ["self", "token_capacity"]
    assert list(inspect.signature(get_batch_sizes_to_capture).parameters)[0] == "model_runner"
    assert "model_runner.req_to_token_pool.size" in inspect.getsource(get_batch_sizes_to_capture)
    from sglang.srt.managers.schedule_batch import Req
    assert "customized_info" in inspect.getsource(Req.__init__)


def test_each_batch_size_gets_a_graph_per_path():
    """capture_one_shape runs three times per batch size (sparse, then mixed and dense under their own ShapeKey
    variant labels, beside SGLang's LoRA labels), with the backend's capture_path set for each; a replay picks the
    label of the path plan() chose."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.runner.shape_key import ShapeKey

    from sgl_sparse import sglang_backend as sb

    backend = SimpleNamespace(plans_two_paths=True, capture_path=None, operator=SimpleNamespace(path="sparse"))
    runner = SimpleNamespace(attn_backend=backend)
    captured = []

    def capture_one_shape(self, size, forward, stream_idx=None, variant_label=None):
        captured.append((size, variant_label, self.attn_backend.capture_path))

    for label in (None, "lora", "nolora"):
        sb._capture_both_paths(capture_one_shape, runner, 8, None, None, label)
        assert backend.capture_path is None
    mixed, dense = sb.MIXED_PATH_VARIANT, sb.DENSE_PATH_VARIANT
    assert captured == [(8, None, "sparse"), (8, mixed, "mixed"), (8, dense, "dense"),
                        (8, "lora", "sparse"), (8, "lora+" + mixed, "mixed"), (8, "lora+" + dense, "dense"),
                        (8, "nolora", "sparse"), (8, "nolora+" + mixed, "mixed"), (8, "nolora+" + dense, "dense")]
    keys = {ShapeKey(size=s, variant_label=v) for s, v, _ in captured}
    assert len(keys) == 9

    assert sb._replay_path_graph("lora", runner, None) == "lora"
    backend.operator.path = "mixed"
    assert sb._replay_path_graph("lora", runner, None) == "lora+" + mixed
    backend.operator.path = "dense"
    assert sb._replay_path_graph("lora", runner, None) == "lora+" + dense
    assert sb._replay_path_graph(None, runner, None) == dense
    # a runner whose backend is not ours (or a dense config) is left alone
    other = SimpleNamespace(attn_backend=SimpleNamespace())
    assert sb._replay_path_graph(None, other, None) is None
    captured.clear()
    sb._capture_both_paths(lambda self, *a: captured.append(a), other, 4, None, None, None)
    assert captured == [(4, None, None, None)]


def test_opt_out_parameter_is_validated_on_arrival():
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_sparse import sglang_backend

    assert sglang_backend.wants_dense({"sparse": False})
    assert not sglang_backend.wants_dense({"sparse": True}) and not sglang_backend.wants_dense(None)
    assert sglang_backend._check_opt_out(SamplingParams(custom_params={"sparse": False})) is None
    with pytest.raises(ValueError, match="must be true, false or"):
        sglang_backend._check_opt_out(SamplingParams(custom_params={"sparse": "no"}))


def test_request_budget_is_validated_on_arrival(monkeypatch):
    """{"sparse": {"token_budget": N}}: accepted within the server's config (page multiple, sink + local pages up
    to the server's budget), else a ValueError (SGLang answers 400) naming the limits; refused on a server that
    does not run the sparse backend."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_sparse import sglang_backend as sb
    from sgl_sparse.config import SparseConfig

    def check(options):
        return sb._check_opt_out(SamplingParams(custom_params={"sparse": options}))

    monkeypatch.delenv(sb.ENV_CONFIG, raising=False)
    with pytest.raises(ValueError, match="does not run --attention-backend sgl_sparse"):
        check({"token_budget": 1024})
    monkeypatch.setenv(sb.ENV_CONFIG, json.dumps(SparseConfig.load("quest").to_dict()))
    assert check({"token_budget": 1024}) is None and check({"token_budget": 80}) is None
    assert sb.request_budget({"sparse": {"token_budget": 1024}}) == 1024 and sb.request_budget({"sparse": True}) is None
    for bad, msg in (({"token_budget": 1000}, "multiple of 16 between 80"), ({"token_budget": 4096}, "2048"),
                     ({"token_budget": "512"}, "integer"), ({}, "integer"), ({"budget": 512}, "unknown option")):
        with pytest.raises(ValueError, match=msg):
            check(bad)
    # checked again in the scheduler: an invalid budget that got there is dropped (once), the server's is used
    from types import SimpleNamespace

    cfg = SparseConfig.load("quest")
    good = SimpleNamespace(rid="a", sampling_params=SimpleNamespace(custom_params={"sparse": {"token_budget": 512}}))
    bad = SimpleNamespace(rid="b", sampling_params=SimpleNamespace(custom_params={"sparse": {"token_budget": 1000}}))
    assert sb._checked_budget(good, cfg) == 512
    assert sb._checked_budget(bad, cfg) is None and sb.request_budget(bad.sampling_params.custom_params) is None


@pytest.mark.parametrize("method", ["quest", "twilight", "vattention", "dense", "quest:bounds_dtype=bf16,coarse_page_tokens=64",
                                    "twilight:page_size=8,coarse_page_tokens=16", "quest:bounds_dtype=int8",
                                    "twilight:bounds_dtype=int8"])
def test_metadata_bytes_per_token_match_the_tables(method):
    """The per-token cost added to SGLang's pool sizing is what SparseKVMetadata really allocates."""
    import torch

    from sgl_sparse.config import SparseConfig
    from sgl_sparse.metadata import SparseKVMetadata

    cfg = SparseConfig.load(method)
    slots, hk, d, layers = 64 * cfg.sglang_page_size, 2, 64, 3
    if not cfg.is_sparse:
        assert SparseKVMetadata.bytes_per_token(cfg, hk, d, torch.bfloat16) == 0
        return
    meta = SparseKVMetadata(cfg, num_layers=layers, num_slots=slots, num_kv_heads=hk, head_dim=d,
                            dtype=torch.bfloat16, device="cpu")
    tables = meta.page_key_bounds + meta.coarse_key_bounds + meta.key_int4 + meta.key_scale_zero
    assert bool(meta.coarse_key_bounds) == cfg.coarse
    allocated = sum(t.numel() * t.element_size() for t in tables)
    assert SparseKVMetadata.bytes_per_token(cfg, hk, d, torch.bfloat16) * slots * layers == allocated


def test_opt_out_and_fraction_hooks_on_real_requests():
    """On SGLang's own Req objects: the opt-out survives Req's custom_params augmentation, and the per-token
    attended fraction is attached only to the request it was read for (identity, not a reused id)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_sparse import sglang_backend as sb

    opted = Req("a", "x", [1, 2, 3], SamplingParams(custom_params={"sparse": False}))
    plain = Req("b", "y", [4, 5], SamplingParams())
    assert "__req__" in opted.sampling_params.custom_params        # SGLang adds it; the flag still reads
    assert sb.wants_dense(opted.sampling_params.custom_params)
    assert not sb.wants_dense(plain.sampling_params.custom_params)

    from types import SimpleNamespace

    from sgl_sparse.config import SparseConfig

    own = Req("c", "z", [6], SamplingParams(custom_params={"sparse": {"token_budget": 512}}))
    saved = dict(sb._ACTIVE)
    try:
        sb._ACTIVE["backend"] = SimpleNamespace(config=SparseConfig.load("quest"), metrics=None)
        sb._ACTIVE["fractions"] = {id(opted): (opted, None)}       # prefill result: first token has no value
        sb._attach_fraction(None, None, 0, opted, None)
        sb._ACTIVE["fractions"] = {id(opted): (opted, 0.25), id(own): (own, 0.1)}
        sb._attach_fraction(None, None, 0, opted, None)
        sb._attach_fraction(None, None, 1, plain, None)            # not in this result: nothing attached
        sb._attach_fraction(None, None, 2, own, None)
        assert opted.customized_info == {sb.STATS_KEY: [None, 0.25], sb.BUDGET_KEY: [None, None]}   # dense
        assert own.customized_info == {sb.STATS_KEY: [0.1], sb.BUDGET_KEY: [512]}
        assert plain.customized_info is None
    finally:
        sb._ACTIVE.clear()
        sb._ACTIVE.update(saved)


def test_only_long_opted_out_requests_beyond_the_mixed_pass_leave_the_cuda_graph():
    """A decode step's opted-out rows that the config attends in full anyway (within budget or below min_context)
    need no dense pass; longer ones take the mixed path's graph while its dense pass holds their tokens; past that,
    the step runs eagerly."""
    import torch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams

    from types import SimpleNamespace

    from sgl_sparse import sglang_backend as sb
    from sgl_sparse.config import SparseConfig
    from sgl_sparse.decode import SparseDecodeOperator

    config = SparseConfig.load("quest")                            # attends in full up to 4096 tokens (min_context)
    full = config.dense_pages * config.page_size
    operator = object.__new__(SparseDecodeOperator)               # its host-only decisions, no buffers
    operator.config, operator.max_batch, operator.max_dense_row_tokens = config, 8, 20000 + 8
    reqs = [Req(str(i), "x", [1], SamplingParams(custom_params={"sparse": False} if i < 2 else None))
            for i in range(3)]
    saved = dict(sb._ACTIVE)
    try:
        sb._ACTIVE["backend"] = SimpleNamespace(config=config, metrics=None, operator=operator)
        outcomes = []
        for lens in ([full, 100, 9000],             # the opted-out rows are short: no dense pass, the graph
                     [full + 1, 100, 9000],         # a long one: the mixed path's graph
                     [9000, 100, 100],              # only opted-out rows are long: the dense path's graph
                     [full + 1, 20000, 9000]):      # more opted-out tokens than the mixed pass holds: eager
            step = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens_cpu=torch.tensor(lens))
            sb._mark_dense_rows(step, None, SimpleNamespace(reqs=reqs))
            outcomes.append((sb._ACTIVE["dense_rows"], sb._no_graph_for_dense_rows(True, None, step)))
        assert outcomes == [(None, True), ([True, False, False], True), ([True, False, False], True),
                            ([True, True, False], False)]
    finally:
        sb._ACTIVE.clear()
        sb._ACTIVE.update(saved)


def test_vattention_cap_warning_names_the_fix():
    from sgl_sparse.config import SparseConfig
    from sgl_sparse.sglang_backend import vattention_cap_warning

    preset = SparseConfig.load("vattention")                       # budget 2048 + cap 4096
    msg = vattention_cap_warning(preset, 32768)
    assert msg and "sample_capacity: 32768" in msg and "6144" in msg
    assert vattention_cap_warning(preset, 6144) is None               # the cap cannot bind
    assert vattention_cap_warning(preset.replace(sample_capacity=32768), 32768) is None
    assert vattention_cap_warning(SparseConfig.load("quest"), 131072) is None
    assert vattention_cap_warning(SparseConfig.load("twilight"), 131072) is None
    sampled = vattention_cap_warning(SparseConfig.load("twilight:residual_sample=true"), 32768)   # 4096 + 4096
    assert sampled and "Twilight's residual sample" in sampled and "8192" in sampled and "sample size" in sampled


def test_batch_floor_warning_when_the_pool_cannot_reach_it():
    from sgl_sparse.config import SparseConfig
    from sgl_sparse.sglang_backend import batch_floor_warning

    preset = SparseConfig.load("vattention")                       # floor 262144
    msg = batch_floor_warning(preset, 200000)
    assert msg and "min_batch_tokens=262144" in msg and "200000" in msg and "vattention:min_batch_tokens=0" in msg
    assert batch_floor_warning(preset, 262144) is None
    assert batch_floor_warning(SparseConfig.load("quest"), 1000) is None
    assert batch_floor_warning(SparseConfig(method="dense", min_batch_tokens=10**6), 1000) is None


def test_captured_decode_batch_reads_sglangs_graph_config():
    """The operator's graph buffers are sized for the largest decode batch SGLang's CUDA-graph config captures (0
    with graphs off; the fallback where the config is missing)."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig, PhaseConfig

    from sgl_sparse.sglang_backend import captured_decode_batch

    def args(**kw):
        return SimpleNamespace(disable_cuda_graph=False, disable_decode_cuda_graph=False, **kw)

    full = CudaGraphConfig(decode=PhaseConfig(backend="full", max_bs=8, bs=[1, 2, 4, 8]))
    assert captured_decode_batch(args(cuda_graph_config=full), 256) == 8
    assert captured_decode_batch(args(cuda_graph_config=CudaGraphConfig(decode=PhaseConfig(backend="full",
                                                                                            max_bs=48))), 256) == 48
    off = CudaGraphConfig(decode=PhaseConfig(backend="disabled", max_bs=8, bs=[1, 2, 4, 8]))
    assert captured_decode_batch(args(cuda_graph_config=off), 256) == 0
    assert captured_decode_batch(SimpleNamespace(disable_cuda_graph=True), 256) == 0     # no config: legacy flags
    assert captured_decode_batch(args(), 256) == 256
    assert captured_decode_batch(args(cuda_graph_config=full), 6) == 6          # clamped to the request slots
