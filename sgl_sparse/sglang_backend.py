"""All SGLang-specific glue: the plugin entry point, ``--sparse-config``, start-up checks and the backend.

Installed, this package declares an entry point in SGLang's general plugin group ``sglang.srt.plugins``, which
``launch_server``, ``Engine`` and every scheduler process load (``SGLANG_PLUGINS`` is its allow-list). The
plugin adds ``sgl_sparse`` to ``--attention-backend``, registers its factory, adds ``--sparse-config`` (a preset
name from ``configs/`` or a YAML path, with optional inline overrides) and validates the flags before
``ServerArgs`` is built from them; ``ServerArgs(..., sparse_config=...)`` (``sgl.Engine``) gets the same checks.
The resolved config travels to the scheduler/TP processes in the environment variable ``SGL_SPARSE_CONFIG``
(JSON).

The backend keeps prefill/extend on SGLang's dense FlashInfer backend and sends decode through
:class:`sgl_sparse.decode.SparseDecodeOperator`; the side tables (:class:`sgl_sparse.metadata.SparseKVMetadata`)
are indexed by physical page/slot of SGLang's KV pool and refreshed from the pool right after each layer's KV
write (read back at ``out_cache_loc``).

The side tables' bytes per token are added to SGLang's per-token KV cost (``_compute_cell_size``), and what the
backend allocates besides (FlashInfer workspaces and wrappers, index buffers, kept selections) is taken out of
the pool's byte budget before SGLang sizes the pool (``_profile_available_bytes``), so the pool is sized for all.

Per-request opt-out (``custom_params={"sparse": False}``), per-request budgets (``{"sparse": {"token_budget": N}}``)
and the statistics in each response's meta info (``sparse_attended_fraction``, ``sparse_token_budget``) are hooks
on SGLang's scheduler, registered here too.

Tested: CPU (plugin, CLI, start-up checks, hook targets) against the real SGLang 0.5.17; GPU
(``tests/test_server_gpu.py``: real servers on SmolLM2-135M, CUDA graphs and eager, eviction, opt-out, stats).
"""

from __future__ import annotations

import json
import logging
import os

from .config import SparseConfig, SparseConfigError
from .policies import within_budget

logger = logging.getLogger(__name__)

BACKEND_NAME = "sgl_sparse"
ENV_CONFIG = "SGL_SPARSE_CONFIG"
DEFAULT_CONFIG = "quest"


class SparseServerArgsError(ValueError):
    """An SGLang option the sparse backend cannot honour; the message says which flag to change."""


# ----------------------------------------------------------------------------- config hand-over

def config_from_env() -> SparseConfig:
    """The config resolved by the launching process (or the default preset)."""
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        return SparseConfig.load(DEFAULT_CONFIG)
    return SparseConfig.from_dict(json.loads(raw), source=ENV_CONFIG)


def publish_config(config: SparseConfig) -> None:
    os.environ[ENV_CONFIG] = json.dumps(config.to_dict())


def uses_sparse_backend(server_args) -> bool:
    return BACKEND_NAME in (getattr(server_args, "attention_backend", None),
                            getattr(server_args, "decode_attention_backend", None))


KV_DTYPES = (None, "auto", "bf16", "bfloat16", "fp16", "float16")   # what the sparse kernels read


def check_server_args(server_args, config: SparseConfig) -> None:
    """Fail at start-up, naming the flag, for every mode the sparse backend cannot serve."""
    get = lambda name, default=None: getattr(server_args, name, default)  # noqa: E731
    # Split backends: SGLang would build a hybrid whose prefill side is another backend, which never fills the
    # side tables (page bounds, int4 keys), so the selection would run on stale data.
    prefill, decode = get("prefill_attention_backend"), get("decode_attention_backend")
    if get("attention_backend") != BACKEND_NAME and decode == BACKEND_NAME:
        raise SparseServerArgsError(f"--decode-attention-backend {BACKEND_NAME} alone is not supported (its tables "
                                    f"are filled by its own prefill): pass --attention-backend {BACKEND_NAME} "
                                    "instead")
    if get("attention_backend") == BACKEND_NAME:
        for flag, value in (("--prefill-attention-backend", prefill), ("--decode-attention-backend", decode)):
            if value not in (None, BACKEND_NAME):
                raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} runs prefill and decode itself: "
                                            f"remove {flag} {value}")
    if get("kv_cache_dtype") not in KV_DTYPES:
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} reads a bf16/fp16 KV cache: remove "
                                    f"--kv-cache-dtype {get('kv_cache_dtype')} (or pass auto)")
    if (get("pp_size") or 1) > 1:
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} does not support pipeline parallelism: "
                                    "remove --pp-size (tensor parallelism, --tp, is supported)")
    for flag in ("enable_two_batch_overlap", "enable_single_batch_overlap", "enable_lmcache", "enable_flexkv",
                 "enable_pdmux"):
        if get(flag, False):
            raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} does not support "
                                        f"--{flag.replace('_', '-')}: remove it")
    if get("radix_cache_backend") is not None:
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} keeps its tables in step with SGLang's "
                                    f"built-in radix cache only: remove --radix-cache-backend")
    # The config's page (the granularity of the bounds and the selection) must lie within one of SGLang's pages:
    # its slots are then contiguous and aligned (SGLang allocates and shares whole pages, filled from offset 0),
    # so 8-token selection inside SGLang's 16-token pages keeps SGLang's page size for everything else.
    page_size = getattr(server_args, "page_size", None) or 1
    if page_size % config.page_size:
        raise SparseServerArgsError(
            f"--attention-backend {BACKEND_NAME} with sparse config page_size={config.page_size} needs a --page-size "
            f"that is a multiple of it, e.g. --page-size {max(config.page_size, 16)} (got --page-size {page_size})")
    if config.coarse and page_size % config.coarse_page_tokens:    # coarse pages must be contiguous too
        raise SparseServerArgsError(
            f"--attention-backend {BACKEND_NAME} with sparse config coarse_page_tokens={config.coarse_page_tokens} "
            f"needs a --page-size that is a multiple of it, e.g. --page-size {config.coarse_page_tokens} (got "
            f"--page-size {page_size})")
    if getattr(server_args, "speculative_algorithm", None):
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} does not support speculative decoding: "
                                    "remove --speculative-algorithm")
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} does not support PD disaggregation: "
                                    "remove --disaggregation-mode")
    if getattr(server_args, "enable_dp_attention", False):
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} does not support DP attention: "
                                    "remove --enable-dp-attention")


def vattention_cap_warning(config: SparseConfig, context_len: int) -> str | None:
    """The start-up warning for a config with a residual sample (vAttention, Twilight with ``residual_sample``)
    whose sample cap can bind below the served context length
    (then the sample is capped and the (epsilon, delta) bound does not hold for that head and step)."""
    if not config.samples_residual or config.token_budget + config.sample_capacity >= context_len:
        return None
    vattention = config.method == "vattention"
    target = (f"vAttention's (epsilon={config.epsilon}, delta={config.delta}) bound holds" if vattention else
              f"Twilight's residual sample meets its (epsilon={config.epsilon}, delta={config.delta}) size")
    return (f"sgl-sparse: {target} only while the "
            f"required sample fits sample_capacity={config.sample_capacity}; requests longer than "
            f"{config.token_budget + config.sample_capacity} tokens (context length {context_len}; fewer for a "
            f"request that asks for a smaller budget) can need more, and their sample is then capped. Set sample_capacity: {context_len} in the sparse config to keep the "
            f"{'bound' if vattention else 'sample size'} at every length (a larger sample, slower).")


def batch_floor_warning(config: SparseConfig, pool_tokens: int) -> str | None:
    """The start-up warning for a batch floor (``min_batch_tokens``) above what the KV pool can hold: no decode
    step can reach it, so the server would run every step on the dense path."""
    if not config.is_sparse or config.min_batch_tokens <= pool_tokens:
        return None
    return (f"sgl-sparse: min_batch_tokens={config.min_batch_tokens} is more than this server's KV pool holds "
            f"({pool_tokens} tokens): every decode step will run the dense path and nothing is sparse. Lower it "
            f"(e.g. --sparse-config {config.method}:min_batch_tokens=0 to select from the first long request) or "
            "give the pool more memory.")


# ----------------------------------------------------------------------------- CLI hooks

def _add_cli_args(result, parser):
    parser.add_argument(
        "--sparse-config", type=str, default=None,
        help=f"sgl-sparse: the sparse decode method for --attention-backend {BACKEND_NAME}: a preset name "
             f"(dense, quest, quest-fast, twilight, vattention; default {DEFAULT_CONFIG}) or a YAML file path, "
             "optionally with overrides, e.g. quest:token_budget=1024,reselect_every=4.")
    return result


def _running_launch_server() -> bool:
    """``python -m sglang.launch_server ...`` or ``sglang serve ...`` (the command-line entry points)."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) == "sglang.launch_server":
        return True
    return len(sys.argv) > 1 and os.path.basename(sys.argv[0]) == "sglang" and sys.argv[1] == "serve"


def _validate_cli_args(cls, args):
    """Before ``ServerArgs`` is built from the parsed flags: resolve, check and publish the sparse config.

    Under ``python -m sglang.launch_server`` a bad flag or config ends the process with one line on stderr and
    exit code 2 (argparse's convention), before anything slow starts; called from Python it raises."""
    try:
        _resolve_cli_config(args)
    except (SparseConfigError, SparseServerArgsError) as e:
        if not _running_launch_server():
            raise
        import sys

        print(f"sglang.launch_server: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return None


def _resolve_cli_config(args) -> None:
    name = getattr(args, "sparse_config", None)
    _resolve_config(args, name, f"--sparse-config {name}", f"--attention-backend {BACKEND_NAME}")


def _resolve_config(args, name: str | SparseConfig | None, given: str, needed: str) -> None:
    """Shared by the CLI and the Python API: resolve the config (``name``, else the one already published, else
    the default preset), check the server flags ``args`` (parsed flags or a ``ServerArgs``) against it, turn
    prefill graphs off, publish it for the scheduler processes."""
    if uses_sparse_backend(args):
        if isinstance(name, SparseConfig):                       # given to ServerArgs as an object
            config = name
        elif name is not None or ENV_CONFIG not in os.environ:
            config = SparseConfig.load(name or DEFAULT_CONFIG)
        else:
            config = config_from_env()
        check_server_args(args, config)
        if getattr(args, "cuda_graph_backend_prefill", None) is None:
            # Prefill stays on SGLang's dense FlashInfer path; its captured prefill graphs are not validated with
            # the side-table refresh (and cost minutes at start-up). Decode CUDA graphs stay on.
            args.cuda_graph_backend_prefill = "disabled"
            logger.info("sgl-sparse: prefill CUDA graphs off (pass --cuda-graph-backend-prefill to override)")
        publish_config(config)
        logger.info("sgl-sparse: %s", config.to_dict())
    elif name is not None:
        raise SparseConfigError(f"{given} has no effect without {needed}")


# ----------------------------------------------------------------------------- the Python API (sgl.Engine)

SERVER_ARGS_INIT_TARGET = "sglang.srt.server_args.ServerArgs.__init__"
SERVER_ARGS_POST_INIT_TARGET = "sglang.srt.server_args.ServerArgs.__post_init__"


def _take_sparse_config(server_args, *args, **kwargs):
    """Before ``ServerArgs(...)``: ``sgl.Engine(..., sparse_config="quest")`` is the Python API's
    ``--sparse-config`` (not a ServerArgs field: kept on the instance until ``__post_init__``)."""
    name = kwargs.pop("sparse_config", None)
    if name is not None and not isinstance(name, (str, SparseConfig)):
        raise SparseConfigError(f"sparse_config={name!r}: pass a preset name, a YAML path (optionally with "
                                ":field=value overrides) or a SparseConfig")
    if name is not None:
        server_args.__dict__["_sgl_sparse_config"] = name
    return (server_args, *args), kwargs


def _check_engine_args(server_args, *args, **kwargs):
    """Before ``ServerArgs.__post_init__``: the same checks and defaults as the CLI (``sgl.Engine`` and
    ``Runtime`` build ServerArgs without it)."""
    name = server_args.__dict__.pop("_sgl_sparse_config", None)
    _resolve_config(server_args, name, f"sparse_config={name!r}", f"attention_backend={BACKEND_NAME!r}")
    return None


def captured_decode_batch(server_args, max_requests: int) -> int:
    """The largest decode batch SGLang may replay from a CUDA graph: the largest of
    ``server_args.cuda_graph_config.decode``'s sizes, clamped as SGLang's ``get_batch_sizes_to_capture`` clamps
    them (to the request slots, padded to the graph batch alignment); 0 with graphs off. The operator sizes the
    buffers its graphs read for it, as SGLang's FlashInfer backend does. ``max_requests`` where the config is
    missing (then every batch size shares buffers sized for it)."""
    decode = getattr(getattr(server_args, "cuda_graph_config", None), "decode", None)
    if decode is None:                            # (SGLang 0.5.17 decides from the config alone when it has one)
        legacy_off = getattr(server_args, "disable_cuda_graph", False) or \
            getattr(server_args, "disable_decode_cuda_graph", False)
        return 0 if legacy_off else max_requests
    if getattr(decode, "backend", None) == "disabled":
        return 0
    sizes = getattr(decode, "bs", None)
    largest = max(sizes) if sizes else (getattr(decode, "max_bs", None) or max_requests)
    try:
        from sglang.srt.utils.common import get_cuda_graph_max_batch_size
        cap = get_cuda_graph_max_batch_size(server_args, max_requests)
    except (ImportError, AttributeError):         # no alignment known: a capture past it raises in the operator
        cap = max_requests
    return min(largest, cap)


# ----------------------------------------------------------------------------- KV pool sizing

CELL_SIZE_TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"


def _account_metadata(cell_size, configurator, kvc, num_layers):
    """SGLang sizes the KV pool from bytes per token (``cell_size``): add the side tables' bytes per token so
    the pool and its metadata together fit the default ``--mem-fraction-static``."""
    if kvc.use_mla_backend or not uses_sparse_backend(kvc.server_args):
        return cell_size
    from sglang.srt.model_executor import pool_configurator

    from .metadata import SparseKVMetadata

    tp = pool_configurator.get_parallel().attn_tp_size
    mc = kvc.model_config
    per_layer = SparseKVMetadata.bytes_per_token(config_from_env(), mc.get_num_kv_heads(tp), mc.head_dim,
                                                 kvc.kv_cache_dtype)
    return cell_size + per_layer * num_layers


# The KV pool's byte budget, measured once, before any attention backend exists; SGLang then sizes the pool from it
# (DefaultPoolConfigurator.calculate_pool_sizes) and the request slots from the pool. The hook is here rather than
# on calculate_pool_sizes: in SGLang 0.5.17 that receives the budget and the page size only (its configurator keeps
# no server args or model config to size the operator from), and it also serves the resize after CUDA-graph
# capture (compute_post_capture_kv_resize), whose budget is measured with the backend already allocated, where a
# subtraction would count the backend twice.
POOL_BUDGET_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"


def _reserve_fixed_memory(available_bytes, kvc, *args, **kwargs):
    """After SGLang measures the KV pool's byte budget: take out what the backend allocates that does not scale per
    token (:func:`fixed_memory`), so the pool, its side tables and the backend together fit the default
    ``--mem-fraction-static``. Logs the amount by component."""
    if kvc.use_mla_backend or not uses_sparse_backend(kvc.server_args):
        return available_bytes
    # The operator's buffers follow the request slots, which SGLang derives from the pool's size after this budget:
    # count them for the slots the whole budget would give, at least as many as the smaller pool gets.
    max_reqs = kvc.resolve_max_num_reqs(kvc.config_from_budget(available_bytes).max_total_num_tokens)
    parts = fixed_memory(kvc.server_args, kvc.model_config, config_from_env(), max_reqs, kvc.kv_cache_dtype)
    total = sum(parts.values())
    logger.info("sgl-sparse: %.1f MiB besides the per-token tables, taken from the KV pool's budget (%s; for %d "
                "request slots)", total / 2**20, ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in parts.items()),
                max_reqs)
    return available_bytes - total


def operator_shape(server_args, model_config, max_reqs: int) -> dict:
    """The :class:`SparseDecodeOperator` arguments that follow from SGLang's config and its request slots
    (``max_reqs``, ``req_to_token_pool.size``): the backend builds the operator with them and the pool sizing
    counts it with them. ``max_requests`` (rows of ``req_to_token``) is ``max_reqs + 1``: SGLang's
    ``ReqToTokenPool`` keeps a padding row."""
    from sglang.srt.runtime_context import get_parallel

    tp = get_parallel().attn_tp_size                  # as SGLang's FlashInfer backend divides the heads
    graph_bs = captured_decode_batch(server_args, max_reqs)
    return dict(num_qo_heads=model_config.num_attention_heads // tp, num_kv_heads=model_config.get_num_kv_heads(tp),
                head_dim=model_config.head_dim, num_layers=model_config.num_hidden_layers,
                max_batch=max(max_reqs, graph_bs), max_context=model_config.context_len, max_requests=max_reqs + 1,
                graph_batch=graph_bs)


def captured_decode_sizes(server_args, max_requests: int) -> list[int]:
    """The decode batch sizes SGLang captures CUDA graphs for with ``max_requests`` request slots (its own
    ``get_batch_sizes_to_capture``); [] with decode graphs off."""
    largest = captured_decode_batch(server_args, max_requests)
    if largest == 0:
        return []
    if not getattr(getattr(getattr(server_args, "cuda_graph_config", None), "decode", None), "bs", None):
        return [largest]
    from types import SimpleNamespace

    from sglang.srt.model_executor.runner.base_cuda_graph_runner import get_batch_sizes_to_capture

    runner = SimpleNamespace(server_args=server_args, req_to_token_pool=SimpleNamespace(size=max_requests))
    return get_batch_sizes_to_capture(runner)[0]


def request_totals(max_reqs: int, device) -> tuple:
    """Per request slot (SGLang's padding row included), float64: tokens attended and tokens available so far over
    the sparse layers and KV heads (the attended fraction's numerator and denominator)."""
    import torch

    return tuple(torch.zeros(max_reqs + 1, dtype=torch.float64, device=device) for _ in range(2))


def fixed_memory(server_args, model_config, config: SparseConfig, max_reqs: int, dtype) -> dict[str, int]:
    """Device bytes the backend allocates besides its per-token side tables, by component, for ``max_reqs`` request
    slots: the operator (:meth:`SparseDecodeOperator.fixed_bytes`) holding the wrappers of SGLang's captured decode
    batch sizes and of the eager sizes it keeps, and the per-slot statistics (:func:`request_totals`)."""
    from .decode import SparseDecodeOperator, allocated_bytes, held_batch_sizes

    shape = operator_shape(server_args, model_config, max_reqs)
    sizes = held_batch_sizes(captured_decode_sizes(server_args, max_reqs), shape["max_batch"])
    parts = SparseDecodeOperator.fixed_bytes(config, **shape, dtype=dtype, batch_sizes=sizes)
    parts["statistics"] = sum(allocated_bytes(t.nbytes) for t in request_totals(max_reqs, "meta"))
    return parts


# ----------------------------------------------------------------------------- per-request opt-out and statistics

def decode_rows_by_attention(config: SparseConfig, seq_lens_cpu: torch.Tensor, path: str,
                             dense_rows: list[bool] | None = None) -> tuple[int, int]:
    """(sparse, dense) rows of a planned decode step for the metrics (host ``[B]`` lengths; ``dense_rows``: the
    opt-out flags, one per row): CUDA-graph padding rows (seq_len 1) left out; a row is dense when it fits its
    budget or is below ``min_context``, opted out, or the whole step ran the dense path (nothing to select, or
    below ``min_batch_tokens``)."""
    import torch

    real = seq_lens_cpu > 1
    dense = within_budget(config, seq_lens_cpu) if path != "dense" else torch.ones_like(real)
    if dense_rows is not None:
        dense |= torch.tensor(dense_rows, dtype=torch.bool)
    n_dense = int((dense & real).sum())
    return int(real.sum()) - n_dense, n_dense


# A request opts out of sparsity with ``sampling_params={"custom_params": {"sparse": False}}``: it is attended
# densely in every layer: a step holding a long one replays the mixed path's graph (the sparse step plus a dense
# pass over those rows only; SparseDecodeOperator.plan), eagerly only past that pass's index buffer.
# A request asks for its own budget with ``{"sparse": {"token_budget": N}}`` (a multiple of the page size between
# the sink + local pages and the server's budget): a per-row value the step reads on the device, so CUDA graphs
# serve it. Each response's meta info then reports ``sparse_token_budget`` (the budget applied, tokens).
OPT_OUT_PARAM = "sparse"
REQUEST_OPTIONS = ("token_budget",)
BUDGET_KEY = "sparse_token_budget"
# Each response's meta info gets ``sparse_attended_fraction``: one entry per generated token, the request's mean
# attended fraction (tokens attended / tokens in context, over the sparse layers and the KV heads of TP rank 0)
# over its decode steps so far (``None`` for the first token, which prefill produces); the last element is the
# figure for the whole request. With the overlap scheduler a value may already include the step in flight.
STATS_KEY = "sparse_attended_fraction"

FORWARD_BATCH_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
_GRAPH_RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
CAN_RUN_GRAPH_TARGET = _GRAPH_RUNNER + ".can_run_graph"
CAPTURE_SHAPE_TARGET = _GRAPH_RUNNER + ".capture_one_shape"
GRAPH_VARIANT_TARGET = _GRAPH_RUNNER + "._resolve_lora_variant"
VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
_RESULTS = "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
DECODE_RESULT_TARGET = _RESULTS + ".process_batch_result_decode"
PREFILL_RESULT_TARGET = _RESULTS + ".process_batch_result_prefill"
COLLECT_INFO_TARGET = _RESULTS + "._maybe_collect_customized_info"

# Per process: "backend" (the SparseAttnBackend), "dense_rows" (opt-out flags of the decode step being run),
# "row_budgets" (the requests' own token budgets of that step, None where a request asked for none),
# "fractions" ({id(req): (req, value)} of the result being processed).
_ACTIVE: dict = {}


def wants_dense(custom_params) -> bool:
    """True when a request's ``custom_params`` opt it out of sparse attention (validated on arrival)."""
    return isinstance(custom_params, dict) and custom_params.get(OPT_OUT_PARAM) is False


def request_budget(custom_params) -> int | None:
    """A request's own token budget from its ``custom_params`` (validated on arrival), or None."""
    value = custom_params.get(OPT_OUT_PARAM) if isinstance(custom_params, dict) else None
    return value.get("token_budget") if isinstance(value, dict) else None


def request_options_problem(options: dict) -> str | None:
    """What is wrong with a request's ``{"sparse": {...}}`` options on this server (None: nothing)."""
    unknown = sorted(str(k) for k in options if k not in REQUEST_OPTIONS)
    if unknown:
        return f"unknown option(s) {', '.join(unknown)} (known: {', '.join(REQUEST_OPTIONS)})"
    if not os.environ.get(ENV_CONFIG):
        return f"this server does not run --attention-backend {BACKEND_NAME}"
    config = config_from_env()
    if not config.is_sparse:
        return "this server's sparse config is dense"
    return config.request_budget_problem(options.get("token_budget"))


def _check_opt_out(sampling_params, *args, **kwargs):
    """Before ``SamplingParams.verify`` (tokenizer manager, on arrival): reject a malformed opt-out or budget
    with a 400."""
    params = sampling_params.custom_params
    if not isinstance(params, dict) or OPT_OUT_PARAM not in params or isinstance(params[OPT_OUT_PARAM], bool):
        return None
    value = params[OPT_OUT_PARAM]
    if isinstance(value, dict):
        problem = request_options_problem(value)
        if problem:
            raise ValueError(f"sgl-sparse: custom_params[{OPT_OUT_PARAM!r}]: {problem}")
        return None
    raise ValueError(f"sgl-sparse: custom_params[{OPT_OUT_PARAM!r}] must be true, false or {{\"token_budget\": N}}, "
                     f"got {value!r}; pass {{\"{OPT_OUT_PARAM}\": false}} to attend densely")


def _mark_dense_rows(forward_batch, cls, batch, *args, **kwargs):
    """After ``ForwardBatch.init_new``: which rows of this step's decode batch opted out and are longer than what
    the config attends in full (host list, or None: the step can replay its CUDA graph).

    Kept beside the backend rather than on the ForwardBatch: SGLang's eager runner copies the batch into a new
    ForwardBatch (dataclass fields only) before the backend plans it. ``init_new`` and that forward run back to
    back in the scheduler's forward call, so the value always belongs to the step being planned."""
    if _ACTIVE.get("backend") is None:
        return forward_batch
    reqs = getattr(batch, "reqs", None)
    rows = budgets = None
    if reqs is not None and forward_batch.forward_mode.is_decode():
        backend = _ACTIVE["backend"]
        rows = [wants_dense(r.sampling_params.custom_params) for r in reqs]
        seq_cpu = forward_batch.seq_lens_cpu
        if any(rows) and seq_cpu is None:              # lengths unknown on the host: a dense pass over every row
            _ACTIVE["dense_rows_eager"] = True
        elif any(rows):
            # the rows the config attends in full anyway need no dense pass; the others take the dense or the
            # mixed path's graph while its dense pass holds them
            lens = seq_cpu[:len(rows)]
            opted = backend.operator.dense_pass_rows(lens, rows)
            rows = opted.tolist() if opted is not None else None
            _ACTIVE["dense_rows_eager"] = not backend.operator.replays_graph(lens, opted)
        budgets = [_checked_budget(r, backend.config) for r in reqs]
    _ACTIVE["dense_rows"] = rows if rows and any(rows) else None
    if _ACTIVE["dense_rows"] is None:
        _ACTIVE["dense_rows_eager"] = False
    _ACTIVE["row_budgets"] = budgets if budgets and any(b is not None for b in budgets) else None
    return forward_batch


def _checked_budget(req, config: SparseConfig) -> int | None:
    """A request's own budget, checked again in the scheduler (arrival checks run in another process, and a
    request could reach the scheduler without them): an invalid one is logged once and the config's used."""
    budget = request_budget(req.sampling_params.custom_params)
    problem = None if budget is None else config.request_budget_problem(budget)
    if problem:
        req.sampling_params.custom_params[OPT_OUT_PARAM] = True     # drop it, so the warning is logged once
        logger.warning("sgl-sparse: request %s: %s; the server's budget is used", getattr(req, "rid", "?"), problem)
        return None
    return budget


def _no_graph_for_dense_rows(can_run, runner, forward_batch, *args, **kwargs):
    """After ``DecodeCudaGraphRunner.can_run_graph``: a batch whose opted-out requests hold more tokens than the
    mixed path's dense pass runs eagerly (a sparse step with a dense pass over every row)."""
    if can_run and _ACTIVE.get("dense_rows") and _ACTIVE.get("dense_rows_eager"):
        return False
    return can_run


# ----------------------------------------------------------------------------- hierarchical cache load-back

# With --enable-hierarchical-cache, KV evicted to host memory comes back through the host pool's per-layer copy on
# the cache controller's load stream, not through the backend's extend. The side tables of those slots are refreshed
# right after each layer's copy, on the same stream and before the controller marks the layer loaded, so the
# forward that waits for the layer reads tables of the KV the slots now hold.
LOAD_BACK_TARGETS = ("sglang.srt.mem_cache.pool_host.mha.MHATokenToKVPoolHost.load_to_device_per_layer",
                     "sglang.srt.mem_cache.pool_host.mha.AsymmetricMHATokenToKVPoolHost.load_to_device_per_layer")


def _refresh_loaded_kv(result, host_pool, device_pool, host_indices, device_indices, layer_id, *args, **kwargs):
    """After ``MHATokenToKVPoolHost.load_to_device_per_layer``: refresh the side tables of the loaded slots.

    The key buffer is read with the pool's plain accessor (``_get_key_buffer``: ``get_key_buffer`` is the attention
    layers' and waits for layer loads), and only when it is one of this backend's own layers (not a draft model's
    pool, nor a pool whose layer ids are local to a group)."""
    backend = _ACTIVE.get("backend")
    if backend is None or not backend.config.is_sparse:
        return result
    keys = device_pool._get_key_buffer(layer_id)
    if layer_id < len(backend.key_buffers) and keys.data_ptr() == backend.key_buffers[layer_id].data_ptr():
        backend.refresh_slots(layer_id, keys, device_indices)
    return result


# ----------------------------------------------------------------------------- one decode graph per path

# A decode step in which no request needs a selection runs the dense path (SparseDecodeOperator.plan), which
# launches other kernels than the sparse path: each captured batch size gets a graph of each path, told apart by
# SGLang's own ShapeKey.variant_label (the field its LoRA / no-LoRA graphs use), and the replay picks the graph of
# the path that plan() chose for the step. Why not one graph whose selection kernels skip short rows on the
# device: those kernels would still be launched in every layer, and at 8 x 1K (every request short) the sparse
# chain made a step 14 % slower than the dense backend (6.20 vs 5.33 ms, H200), mostly in those launches.
# A step with opted-out requests takes the mixed path (the sparse path plus a dense pass over those rows only), a
# third graph per batch size.
DENSE_PATH_VARIANT = "sgl_sparse_dense"
MIXED_PATH_VARIANT = "sgl_sparse_mixed"
PATH_VARIANTS = {"sparse": None, "mixed": MIXED_PATH_VARIANT, "dense": DENSE_PATH_VARIANT}   # capture order


def path_label(label: str | None, path: str) -> str | None:
    """The graph variant label of ``path``'s graph beside SGLang's own label (None, "lora", "nolora"); the sparse
    path keeps SGLang's."""
    variant = PATH_VARIANTS[path]
    return label if variant is None else variant if label is None else f"{label}+{variant}"


def _sparse_backend_of(runner):
    backend = getattr(runner, "attn_backend", None)
    return backend if getattr(backend, "plans_two_paths", False) else None


def _capture_both_paths(original, runner, size, forward, stream_idx=None, variant_label=None):
    """Around ``DecodeCudaGraphRunner.capture_one_shape``: capture the sparse path's graph, then the mixed
    path's and the dense path's, for this batch size (the backend's plan() follows ``capture_path`` while
    capturing)."""
    backend = _sparse_backend_of(runner)
    if backend is None:
        return original(runner, size, forward, stream_idx, variant_label)
    try:
        for path in PATH_VARIANTS:
            backend.capture_path = path
            result = original(runner, size, forward, stream_idx, path_label(variant_label, path))
        return result
    finally:
        backend.capture_path = None


def _replay_path_graph(label, runner, *args, **kwargs):
    """After ``DecodeCudaGraphRunner._resolve_lora_variant`` (called when a replay is loaded, after the
    backend planned the step): the graph of the path plan() chose."""
    backend = _sparse_backend_of(runner)
    return label if backend is None else path_label(label, backend.operator.path)


def _snapshot_fractions(processor, batch, *args, **kwargs):
    """Before a decode result is processed: the attended fractions of its requests (their slots are still held)."""
    backend = _ACTIVE.get("backend")
    if backend is None or not backend.config.is_sparse:
        return None
    reqs = [r for r in batch.reqs if getattr(r, "req_pool_idx", None) is not None]
    values = backend.attended_fractions([r.req_pool_idx for r in reqs])
    _ACTIVE["fractions"] = {id(r): (r, v) for r, v in zip(reqs, values)}
    return None


def _snapshot_prefill(processor, batch, *args, **kwargs):
    """Before a prefill result is processed: its first output tokens get ``None`` (no decode step yet)."""
    backend = _ACTIVE.get("backend")
    if backend is not None and backend.config.is_sparse:
        _ACTIVE["fractions"] = {id(r): (r, None) for r in batch.reqs}
    return None


def _attach_fraction(result, processor, i, req, *args, **kwargs):
    """After SGLang collects a request's per-token customized info: append its attended fraction, so the list
    has one entry per output token."""
    entry = _ACTIVE.get("fractions", {}).get(id(req))
    backend = _ACTIVE.get("backend")
    if entry is not None and entry[0] is req and backend is not None:
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info.setdefault(STATS_KEY, []).append(entry[1])
        params = req.sampling_params.custom_params
        applied = None if wants_dense(params) else request_budget(params) or backend.config.token_budget
        req.customized_info.setdefault(BUDGET_KEY, []).append(applied)
        if backend.metrics is not None and entry[1] is not None and req.finished():
            backend.metrics.attended_fraction.observe(entry[1])
    return result


# ----------------------------------------------------------------------------- the backend

def create_backend(runner):
    """``--attention-backend sgl_sparse``: the factory SGLang's attention registry calls."""
    if runner.use_mla_backend:
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} supports MHA/GQA models only (this model "
                                    "uses MLA): choose another --attention-backend")
    if runner.sliding_window_size is not None:
        raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} does not handle sliding-window attention "
                                    "layers: choose another --attention-backend for this model")
    config = config_from_env()
    check_server_args(runner.server_args, config)
    return _backend_class()(runner, config)


def _backend_class():
    """Defined lazily: importing SGLang's FlashInfer backend needs its GPU stack."""
    import torch
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_parallel

    from .decode import SparseDecodeOperator
    from .metadata import SparseKVMetadata

    class SparseAttnBackend(FlashInferAttnBackend):
        """Dense FlashInfer prefill, sparse decode (see the module docstring)."""

        def __init__(self, runner, config: SparseConfig):
            super().__init__(runner, init_new_workspace=runner.init_new_workspace)
            mc = runner.model_config
            max_reqs = self.req_to_token_pool.size
            shape = operator_shape(runner.server_args, mc, max_reqs)
            self.config = config
            self.num_qo_heads, self.num_kv_heads = shape["num_qo_heads"], shape["num_kv_heads"]
            self.head_dim = mc.head_dim
            k0 = self.token_to_kv_pool.get_key_buffer(0) if hasattr(self.token_to_kv_pool, "get_key_buffer") else None
            if k0 is None or k0.dim() != 3:
                raise SparseServerArgsError(f"--attention-backend {BACKEND_NAME} needs SGLang's MHA KV pool "
                                            "([slots, heads, head_dim] per layer)")
            layers = mc.num_hidden_layers
            self.last_layer = layers - 1
            self.key_buffers = [self.token_to_kv_pool.get_key_buffer(i) for i in range(layers)]
            self.metadata = SparseKVMetadata(config, num_layers=layers, num_slots=k0.shape[0],
                                             num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                             dtype=k0.dtype, device=k0.device)
            # (the pool sizing counted this operator with the same shape: fixed_memory)
            self.operator = SparseDecodeOperator(
                config, **{**shape, "max_requests": self.req_to_token_pool.req_to_token.shape[0]}, dtype=k0.dtype,
                device=k0.device)
            # per request slot (req_pool_idx): attended / available tokens over the sparse layers and KV heads
            self.attended_tokens, self.context_tokens = request_totals(max_reqs, k0.device)
            self._stats_stream = torch.cuda.Stream(device=k0.device)
            self._eager = False
            # decode graphs: one per batch size and path (see _capture_both_paths); the path being captured
            self.plans_two_paths = config.is_sparse
            self.capture_path: str | None = None
            missing = [t for t in (CELL_SIZE_TARGET, POOL_BUDGET_TARGET) if t not in HookRegistry._patched]
            if missing:
                raise RuntimeError(f"sgl-sparse: SGLang hooks not applied: {missing}; the KV pool was sized without "
                                   "the backend's memory (check the SGLang version)")
            if config.is_sparse and runner.server_args.enable_hierarchical_cache:
                missing = [t for t in LOAD_BACK_TARGETS if t not in HookRegistry._patched]
                if missing:
                    raise RuntimeError(f"sgl-sparse: SGLang hooks not applied: {missing}; the side tables would not "
                                       "follow hierarchical-cache load-backs (check the SGLang version)")
            if config.is_sparse and not runner.server_args.disable_cuda_graph:
                missing = [t for t in (CAN_RUN_GRAPH_TARGET, FORWARD_BATCH_TARGET, CAPTURE_SHAPE_TARGET,
                                       GRAPH_VARIANT_TARGET) if t not in HookRegistry._patched]
                if missing:
                    raise RuntimeError(f"sgl-sparse: SGLang hooks not applied: {missing}; per-request dense opt-out "
                                       "would be ignored under CUDA graphs")
            # Prometheus metrics (sgl_sparse.metrics) with --enable-metrics, recorded by attention-TP rank 0
            self.metrics = None
            if getattr(runner.server_args, "enable_metrics", False) and get_parallel().attn_tp_rank == 0:
                from .metrics import SparseMetrics
                self.metrics = SparseMetrics.get()
                self.metrics.side_table_bytes.set(self.side_table_bytes())
            _ACTIVE["backend"] = self
            for warning in (vattention_cap_warning(config, mc.context_len), batch_floor_warning(config, k0.shape[0])):
                if warning:
                    logger.warning(warning)
            logger.info("sgl-sparse backend: %s; %d layers, %d/%d query/KV heads per rank, head_dim %d, "
                        "KV pool %d slots, up to %d requests; side tables and kept selections %.1f MiB",
                        config.to_dict(), layers, self.num_qo_heads, self.num_kv_heads, self.head_dim, k0.shape[0],
                        max_reqs, self.side_table_bytes() / 2**20)

        # -- metadata, outside the graph, once per step
        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            if not forward_batch.forward_mode.is_decode_or_idle():
                return super().init_forward_metadata_out_graph(forward_batch, in_capture)
            bs = forward_batch.batch_size
            if bs == 0:                                        # idle (e.g. DP padding): nothing to plan
                return
            dense_rows = None if in_capture else _ACTIVE.get("dense_rows")
            if dense_rows and not self._eager and _ACTIVE.get("dense_rows_eager"):
                raise RuntimeError("sgl-sparse: a batch whose opted-out requests exceed the mixed path's dense pass "
                                   "reached CUDA-graph replay")
            if dense_rows and (len(dense_rows) > bs or (self._eager and len(dense_rows) != bs)):
                raise RuntimeError(f"sgl-sparse: {len(dense_rows)} opt-out flags for a decode batch of {bs}")
            if dense_rows:                                     # CUDA-graph padding rows: sparse
                dense_rows = dense_rows + [False] * (bs - len(dense_rows))
            seq_cpu = forward_batch.seq_lens_cpu
            seq_cpu = seq_cpu[:bs] if seq_cpu is not None else forward_batch.seq_lens[:bs].cpu()
            budgets = None if in_capture else _ACTIVE.get("row_budgets")
            if budgets is not None:                            # CUDA-graph padding rows: the config's budget
                if len(budgets) > bs or (self._eager and len(budgets) != bs):
                    raise RuntimeError(f"sgl-sparse: {len(budgets)} request budgets for a decode batch of {bs}")
                budgets = budgets + [None] * (bs - len(budgets))
            path = self.operator.plan(self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices[:bs],
                                      forward_batch.seq_lens[:bs], seq_cpu, dense_rows=dense_rows,
                                      path=self.capture_path if in_capture else None, row_budgets=budgets)
            if dense_rows and not self._eager and path == "sparse":    # never a replay without the dense pass
                raise RuntimeError("sgl-sparse: opted-out requests planned without the mixed path's dense pass in a "
                                   "CUDA-graph replay")
            if self.metrics is not None and not in_capture and self.config.is_sparse:
                self.metrics.count_rows(*decode_rows_by_attention(self.config, seq_cpu, path, dense_rows))

        def init_forward_metadata(self, forward_batch):
            if forward_batch.forward_mode.is_decode_or_idle():
                self._eager = True
                try:
                    self.init_forward_metadata_out_graph(forward_batch)
                finally:
                    self._eager = False
            else:
                super().init_forward_metadata(forward_batch)

        def _refresh_metadata(self, layer, forward_batch):
            self.metadata.update(layer.layer_id, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                                 forward_batch.out_cache_loc)

        def refresh_slots(self, layer_id: int, key_buffer, slots) -> None:
            """Side tables of ``slots`` (``[n]`` int64, device or host) of one layer, from ``key_buffer`` (KV that
            entered the pool without this backend's extend: a hierarchical-cache load-back), on the current
            stream."""
            if slots.numel():
                self.metadata.update(layer_id, key_buffer, slots.to(key_buffer.device, non_blocking=True))

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            self._refresh_metadata(layer, forward_batch)
            if layer.layer_id == 0:                             # a (re)started request: fresh statistics and
                idx = forward_batch.req_pool_indices.long()    # no kept selection (reselect_every)
                self.attended_tokens[idx] = 0
                self.context_tokens[idx] = 0
                self.operator.forget(idx)
            return o

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if k is not None and save_kv_cache:
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v,
                                                    *self._kv_write_scales(layer))
            if abs(layer.scaling - self.operator.sm_scale) > 1e-6 * self.operator.sm_scale:
                raise SparseServerArgsError(f"sgl-sparse: layer {layer.layer_id} uses softmax scale "
                                            f"{layer.scaling}, not 1/sqrt(head_dim); not supported yet")
            kb = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            vb = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            self.metadata.update_keys_int4(layer.layer_id, kb, forward_batch.out_cache_loc)
            bs = forward_batch.batch_size
            o = self.operator.run(layer.layer_id, q.contiguous().view(bs, self.num_qo_heads, self.head_dim), kb, vb,
                                  self.metadata)
            if layer.layer_id == self.last_layer and self.config.is_sparse:
                # every layer's page bounds in one launch (see SparseKVMetadata), then the step's statistics
                self.metadata.update_bounds_all_layers(self.key_buffers, forward_batch.out_cache_loc)
                self.operator.add_request_stats(self.attended_tokens, self.context_tokens)
            return o.view(-1, self.num_qo_heads * self.head_dim)

        def side_table_bytes(self) -> int:
            """GPU bytes of this rank's side tables and kept selections."""
            tables = [*self.metadata.page_key_bounds, *self.metadata.coarse_key_bounds, *self.metadata.key_int4,
                      *self.metadata.key_scale_zero]
            if self.operator.reuse is not None:
                tables += self.operator.reuse.tensors()
            return sum(t.numel() * t.element_size() for t in tables)

        def attended_fractions(self, req_pool_indices: list[int]) -> list[float | None]:
            """Mean attended fraction so far of the requests in these slots (host floats; ``None`` before the
            first sparse decode step). Read on a side stream: it may include a step still running."""
            if not req_pool_indices:
                return []
            with torch.cuda.stream(self._stats_stream):
                idx = torch.tensor(req_pool_indices, dtype=torch.long).to(self.attended_tokens.device)
                pair = torch.stack([self.attended_tokens[idx], self.context_tokens[idx]]).cpu()
            return [float(a / c) if c > 0 else None for a, c in pair.T.tolist()]

    return SparseAttnBackend


# ----------------------------------------------------------------------------- entry point

def register() -> None:
    """Entry point of the ``sglang.srt.plugins`` group (runs in every SGLang process)."""
    from sglang.srt import server_args as sa
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in sa.ATTENTION_BACKEND_CHOICES:
        sa.add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_backend)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _validate_cli_args, HookType.BEFORE)
    HookRegistry.register(SERVER_ARGS_INIT_TARGET, _take_sparse_config, HookType.BEFORE)
    HookRegistry.register(SERVER_ARGS_POST_INIT_TARGET, _check_engine_args, HookType.BEFORE)
    HookRegistry.register(CELL_SIZE_TARGET, _account_metadata, HookType.AFTER)
    HookRegistry.register(POOL_BUDGET_TARGET, _reserve_fixed_memory, HookType.AFTER)
    HookRegistry.register(VERIFY_TARGET, _check_opt_out, HookType.BEFORE)
    HookRegistry.register(FORWARD_BATCH_TARGET, _mark_dense_rows, HookType.AFTER)
    HookRegistry.register(CAN_RUN_GRAPH_TARGET, _no_graph_for_dense_rows, HookType.AFTER)
    HookRegistry.register(CAPTURE_SHAPE_TARGET, _capture_both_paths, HookType.AROUND)
    HookRegistry.register(GRAPH_VARIANT_TARGET, _replay_path_graph, HookType.AFTER)
    HookRegistry.register(DECODE_RESULT_TARGET, _snapshot_fractions, HookType.BEFORE)
    HookRegistry.register(PREFILL_RESULT_TARGET, _snapshot_prefill, HookType.BEFORE)
    HookRegistry.register(COLLECT_INFO_TARGET, _attach_fraction, HookType.AFTER)
    for target in LOAD_BACK_TARGETS:
        HookRegistry.register(target, _refresh_loaded_kv, HookType.AFTER)
