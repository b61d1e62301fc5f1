"""Sparse attention configuration: one validated dataclass, presets in ``configs/``, YAML files.

A config says which method runs and with which budget; everything else (policies, kernels, FlashInfer) derives
from it. Invalid values raise :class:`SparseConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any

METHODS = ("dense", "quest", "twilight", "vattention")
GROUP_SCORES = ("max", "mean")
BOUNDS_DTYPES = ("bf16", "int8")


def _config_dir() -> pathlib.Path:
    """The presets: ``configs/`` of the checkout (editable install), else the copy a wheel installs under
    ``<prefix>/share/sgl-sparse/configs`` (pyproject's data-files)."""
    checkout = pathlib.Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return pathlib.Path(sys.prefix) / "share" / "sgl-sparse" / "configs"


CONFIG_DIR = _config_dir()


class SparseConfigError(ValueError):
    """A sparse config value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """How decode attention is sparsified.

    Attributes:
        method: ``dense`` (stock FlashInfer), ``quest``, ``twilight`` or ``vattention``.
        page_size: tokens per selection page: the key bounds are kept, and pages selected, per ``page_size``
            tokens. Must divide SGLang's ``--page-size`` (equal to it, or e.g. 8 inside SGLang's 16-token pages:
            finer selection, twice the bounds to scan, SGLang's own page size unchanged).
        token_budget: tokens attended per (request, KV head): Quest's top-k pages x page size; vAttention's
            deterministic set (sinks + local + top-k); Twilight's *candidate* budget before top-p pruning.
        sink_tokens: leading tokens always attended (rounded up to whole pages).
        local_tokens: trailing tokens always attended, the current page included (rounded up to pages, >= 1 page).
        dense_layers: the first ``dense_layers`` layers run dense attention.
        min_context: requests with fewer tokens (at page granularity: at most ceil((min_context-1)/page_size)
            pages), or that fit in the budget, are attended densely.
        top_p: Twilight's kept attention mass, in (0, 1].
        int4_group: channels per int4 quantization group for Twilight's key copy (32, 64, 128; 0 = head_dim).
        epsilon, delta: vAttention's target: relative output error above epsilon with probability <= delta.
        base_rate: vAttention's base sample: a fraction of the residual tokens in (0, 1), or a whole number of
            draws (>= 1) — a fixed count keeps the cost flat at 128K contexts.
        sample_capacity: most residual tokens vAttention samples per (request, KV head). Where the (epsilon,
            delta) target asks for more, the sample is capped and the bound does not hold; the context length
            keeps it at every length (a larger index buffer and, where the target asks, a larger sample).
        seed: vAttention's RNG seed (samples differ per step, layer and request, reproducibly).
        residual_sample: Twilight only: besides its top-p survivors, attend vAttention's sample of the tokens
            outside the candidate pages, importance-weighted and merged as vAttention merges it (sized by
            ``epsilon``, ``delta`` and ``base_rate``, at most ``sample_capacity`` tokens, drawn with ``seed``).
            Selection alone drops the attention mass of the unselected tokens, which aggregation tasks (counting
            the most frequent words of a long list) need; the sample estimates it. The candidate tokens that
            top-p prunes are in neither part. (Quest with a residual sample is the ``vattention`` method.)
        reselect_every: decode steps a request's page selection serves (1 = select every step). In between,
            the pages scored last time are reused and every page written since is attended too, so the
            newest tokens are never missed; a request selects again once it has grown by this many tokens, and
            at its first decode step after a prefill. Saves the page scan (the bounds of every page, 1/P of the
            context's K bytes) on all but one step in ``reselect_every``. Keeps ``top_k`` pages per layer, KV
            head and request slot: sparse layers x max running requests x HK x top_k x 4 bytes of GPU memory.
        reselect_min_cosine: the drift test of a reused selection (with ``reselect_every > 1``): in a layer
            where the group-mean query of some KV head has moved since the selection was made (cosine
            similarity below this), the request selects again in that layer at once. -1 (the default) turns the
            test off. Costs one small kernel per sparse layer and keeps the stored queries: sparse layers x max
            running requests x HK x head_dim x 2 bytes. Supports up to 32 KV heads per rank.
        coarse_page_tokens: coarse-to-fine scoring (0 = off): key bounds are also kept per ``coarse_page_tokens``
            (a multiple of ``page_size`` that divides SGLang's ``--page-size``, so a coarse page is contiguous in
            the pool). Each selecting step scores the coarse pages (1/coarse_page_tokens of the context's K bytes
            instead of 1/page_size), keeps the best ``coarse_token_budget`` tokens' worth of them, and scores only
            the pages inside those; the top-k is then taken as without it. A coarse bound bounds every page inside
            it, so a page outside the kept coarse pages can only be one whose bound is below the kept ones'.
            Costs a second bounds table: 2/coarse_page_tokens of the K cache's bytes per layer.
        min_batch_tokens: the batch floor (0 = off): a decode step whose requests needing a selection hold fewer
            tokens than this in all (each request's whole context) runs the dense path, FlashInfer's dense decode
            in every layer. For methods whose selection has a fixed cost per layer that one or a few requests'
            dense attention does not cover (Twilight's int4 scores and top-p, vAttention's sample and merge; both
            presets set 262144), so that a quiet server is never slower than dense while a busy one, where sparse
            pays, selects as before. Per server, not per request; such rows count as ``dense`` in the metrics and
            report an attended fraction of 1.
        group_score: how the query heads of a KV head (a GQA group) combine into its page score: ``max`` (Quest's:
            an upper bound of every head's logits, so a page that any head needs ranks as that head ranks it) or
            ``mean`` (the pages the group needs most on average; no per-head guarantee).
        coarse_token_budget: tokens covered by the coarse pages kept for refinement, per (request, KV head): a
            multiple of ``coarse_page_tokens`` of at least ``token_budget + coarse_page_tokens`` (0: 4 x
            ``token_budget`` in whole coarse pages, at least one coarse page more than the budget).
        bounds_dtype: storage of the per-page key bounds that every selecting step reads: ``bf16`` (min and max
            per channel in the KV cache's dtype, bf16 or fp16: 4 * D bytes per page and KV head) or ``int8``
            (per page and KV head an fp32 (lo, scale) and 2 * D uint8 codes rounded outward, min down and max
            up, so Quest's score still bounds every q.k of the page: 2 * D + 8 bytes, 264 instead of 512 at
            D = 128; the bounds widen by at most about (max - min) / 255 of the page-head per side). ``int8``
            is not supported with coarse-to-fine scoring (``coarse_page_tokens``).
    """

    method: str = "quest"
    page_size: int = 16
    token_budget: int = 2048
    sink_tokens: int = 16
    local_tokens: int = 64
    dense_layers: int = 2
    min_context: int = 4096
    top_p: float = 0.95
    int4_group: int = 0
    epsilon: float = 0.05
    delta: float = 0.05
    base_rate: float = 0.02
    sample_capacity: int = 4096
    seed: int = 0
    residual_sample: bool = False
    reselect_every: int = 1
    reselect_min_cosine: float = -1.0
    coarse_page_tokens: int = 0
    coarse_token_budget: int = 0
    group_score: str = "max"
    bounds_dtype: str = "bf16"
    min_batch_tokens: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SparseConfigError("sparse config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, as ``field=value is invalid: what is allowed`` (empty when the config is valid)."""
        out: list[str] = []

        def bad(field: str, msg: str) -> None:
            out.append(f"{field}={getattr(self, field)!r} is invalid: {msg}")

        if self.method not in METHODS:
            bad("method", f"choose one of {', '.join(METHODS)}")
        if self.group_score not in GROUP_SCORES:
            bad("group_score", f"choose one of {', '.join(GROUP_SCORES)}")
        if self.bounds_dtype not in BOUNDS_DTYPES:
            bad("bounds_dtype", f"choose one of {', '.join(BOUNDS_DTYPES)}")
        elif self.bounds_dtype == "int8" and isinstance(self.coarse_page_tokens, int) and self.coarse_page_tokens:
            bad("bounds_dtype", "int8 is not supported with coarse-to-fine scoring (coarse_page_tokens > 0): "
                                "choose bf16 (e.g. quest:bounds_dtype=bf16,coarse_page_tokens=64) or set "
                                "coarse_page_tokens to 0")
        ints = ("page_size", "token_budget", "sink_tokens", "local_tokens", "dense_layers", "min_context",
                "int4_group", "sample_capacity", "seed", "reselect_every", "coarse_page_tokens",
                "coarse_token_budget", "min_batch_tokens")
        not_int = {f for f in ints if not isinstance(getattr(self, f), int) or isinstance(getattr(self, f), bool)}
        for f in sorted(not_int, key=ints.index):
            bad(f, "must be an integer")
        numbers = ("top_p", "epsilon", "delta", "base_rate", "reselect_min_cosine")
        def finite(v) -> bool:
            try:
                return math.isfinite(v)
            except OverflowError:                     # an int too large for a float
                return False

        not_number = {f for f in numbers if not isinstance(getattr(self, f), (int, float)) or
                      isinstance(getattr(self, f), bool) or not finite(getattr(self, f))}
        for f in sorted(not_number, key=numbers.index):
            bad(f, "must be a number")
        page_ok = "page_size" not in not_int and self.page_size >= 1 and not self.page_size & (self.page_size - 1)
        if "page_size" not in not_int and not page_ok:
            bad("page_size", "must be a power of two >= 1 (and divide SGLang's --page-size)")
        budget_ok = page_ok and "token_budget" not in not_int and self.token_budget >= self.page_size and \
            self.token_budget % self.page_size == 0
        if page_ok and "token_budget" not in not_int and not budget_ok:
            bad("token_budget", f"must be a positive multiple of page_size ({self.page_size})")
        for f in ("sink_tokens", "local_tokens", "dense_layers", "min_context", "min_batch_tokens"):
            if f not in not_int and getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if budget_ok and not {"sink_tokens", "local_tokens"} & not_int and self.sink_tokens >= 0 and \
                self.local_tokens >= 0 and self.sink_pages + self.local_pages > self.top_k_pages:
            bad("token_budget", f"must hold the sink and local pages: {self.sink_pages} + {self.local_pages} "
                                f"pages > {self.top_k_pages} budget pages; raise token_budget or lower "
                                "sink_tokens/local_tokens")
        if "top_p" not in not_number and not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if "int4_group" not in not_int and self.int4_group not in (0, 32, 64, 128):
            bad("int4_group", "must be 0 (= head_dim), 32, 64 or 128")
        if "epsilon" not in not_number and not 0 < self.epsilon < 1:
            bad("epsilon", "must be in (0, 1)")
        if "delta" not in not_number and not 0 < self.delta < 1:
            bad("delta", "must be in (0, 1)")
        if "base_rate" not in not_number and not (0 < self.base_rate < 1 or (
                self.base_rate >= 1 and float(self.base_rate).is_integer())):
            bad("base_rate", "must be a fraction in (0, 1) or a whole number of draws >= 1")
        if "sample_capacity" not in not_int and self.sample_capacity < 2:
            bad("sample_capacity", "must be >= 2")
        if not isinstance(self.residual_sample, bool):
            bad("residual_sample", "must be true or false")
        elif self.residual_sample and self.method != "twilight":
            bad("residual_sample", "only Twilight takes it (Quest's selection with a residual sample is the "
                                   "vattention method): set method: twilight, or use method: vattention")
        if "reselect_every" not in not_int and not 1 <= self.reselect_every <= 64:
            bad("reselect_every", "must be in 1..64 (1 = select every decode step)")
        if "reselect_min_cosine" not in not_number and not -1 <= self.reselect_min_cosine <= 1:
            bad("reselect_min_cosine", "must be a cosine similarity in [-1, 1] (-1 = no drift test)")
        if not {"coarse_page_tokens", "coarse_token_budget"} & not_int and budget_ok:
            self._coarse_problems(bad)
        return out

    def _coarse_problems(self, bad) -> None:
        C, P = self.coarse_page_tokens, self.page_size
        if C == 0:
            if self.coarse_token_budget != 0:
                bad("coarse_token_budget", "needs coarse_page_tokens > 0 (coarse-to-fine scoring is off)")
            return
        if C <= P or C % P or C & (C - 1):
            bad("coarse_page_tokens", f"must be 0 (off) or a power of two above page_size ({P}) that divides "
                                      "SGLang's --page-size")
            return
        budget = self.coarse_token_budget
        least = self.token_budget + C
        if budget != 0 and (budget < least or budget % C):
            bad("coarse_token_budget", f"must be 0 (4 x token_budget) or a multiple of coarse_page_tokens ({C}) of at "
                                       f"least token_budget + coarse_page_tokens ({least}): the kept coarse pages "
                                       "must hold more pages than the top-k takes")

    # ------------------------------------------------------------------ derived sizes (pages)

    @property
    def sglang_page_size(self) -> int:
        """The smallest ``--page-size`` that serves this config: its page, or its coarse page."""
        return max(self.page_size, self.coarse_page_tokens)

    @property
    def coarse(self) -> bool:
        """Coarse-to-fine scoring is on."""
        return self.coarse_page_tokens > 0

    @property
    def coarse_ratio(self) -> int:
        """Selection pages per coarse page (R)."""
        return self.coarse_page_tokens // self.page_size if self.coarse else 1

    @property
    def coarse_top_k(self) -> int:
        """Coarse pages kept for refinement per (request, KV head)."""
        if not self.coarse:
            return 0
        C = self.coarse_page_tokens
        default = max(-(-4 * self.token_budget // C), self.token_budget // C + 1 + (self.token_budget % C > 0))
        return self.coarse_token_budget // C if self.coarse_token_budget else default

    @property
    def top_k_pages(self) -> int:
        return self.token_budget // self.page_size

    @property
    def sink_pages(self) -> int:
        return -(-self.sink_tokens // self.page_size)

    @property
    def local_pages(self) -> int:
        return max(1, -(-self.local_tokens // self.page_size))

    @property
    def min_context_pages(self) -> int:
        """Requests with at most this many pages are below ``min_context`` (attended densely)."""
        return -(-(self.min_context - 1) // self.page_size) if self.min_context > 1 else 0

    @property
    def dense_pages(self) -> int:
        """Requests with at most this many pages are attended densely (budget or min_context)."""
        return max(self.top_k_pages, self.min_context_pages)

    @property
    def least_budget_pages(self) -> int:
        """The smallest budget a request may ask for, in pages: its sink and local pages."""
        return self.sink_pages + self.local_pages

    def request_budget_problem(self, token_budget) -> str | None:
        """Why ``token_budget`` cannot be a request's own budget under this config (None: it can)."""
        if not isinstance(token_budget, int) or isinstance(token_budget, bool):
            return f"token_budget must be an integer, got {token_budget!r}"
        least = self.least_budget_pages * self.page_size
        if not least <= token_budget <= self.token_budget or token_budget % self.page_size:
            return (f"token_budget={token_budget} must be a multiple of {self.page_size} between {least} (the sink "
                    f"and local pages) and the server's token_budget {self.token_budget}")
        return None

    @property
    def reuse_extra_pages(self) -> int:
        """Pages a reused selection can gain (written since it was made): ceil((reselect_every - 1) / P)."""
        return -(-(self.reselect_every - 1) // self.page_size)

    @property
    def drift_test(self) -> bool:
        """A reused selection is checked against how far the query moved (``reselect_min_cosine > -1``)."""
        return self.reselect_every > 1 and self.reselect_min_cosine > -1

    @property
    def selection_width(self) -> int:
        """Most pages a (request, KV head) attends per step: all of a request within ``dense_pages``, else
        ``top_k`` (+ the pages written since a reused selection)."""
        return max(self.dense_pages, self.top_k_pages + self.reuse_extra_pages)

    @property
    def is_sparse(self) -> bool:
        return self.method != "dense"

    @property
    def samples_residual(self) -> bool:
        """The step also attends a sample of the tokens outside the selection (vAttention's, or Twilight's with
        ``residual_sample``)."""
        return self.method == "vattention" or self.residual_sample is True

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "SparseConfig":
        """Build from a mapping of fields; every problem (unknown fields, invalid values) in one error that
        names ``source``."""
        if not isinstance(data, dict):
            raise SparseConfigError(f"sparse config {source}: expected a mapping of fields, got "
                                    f"{type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        problems = []
        unknown = [k for k in data if k not in names]
        if unknown:
            problems.append(f"unknown field(s) {', '.join(map(str, unknown))} (known: {', '.join(names)})")
        config = cls.__new__(cls)                      # the fields as given, validated all at once below
        for name in names:
            default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
            object.__setattr__(config, name, data.get(name, default))
        problems += config.problems()
        if problems:
            raise SparseConfigError(f"sparse config {source}: " + "; ".join(problems))
        return cls(**{k: data[k] for k in names if k in data})

    @classmethod
    def load(cls, spec: str) -> "SparseConfig":
        """A preset name from ``configs/`` (``quest``, ``quest-fast``, ``twilight``, ``vattention``, ``dense``) or a
        YAML path, optionally followed by inline overrides: ``quest:token_budget=1024,reselect_every=4``."""
        import yaml

        base, overrides = split_spec(spec)
        path = pathlib.Path(base)
        if not path.suffix and (CONFIG_DIR / f"{base}.yaml").exists():
            path = CONFIG_DIR / f"{base}.yaml"
        if not path.exists():
            raise SparseConfigError(f"sparse config {base!r}: no such file, and not a preset (presets: "
                                    f"{', '.join(presets())}; or a YAML file, optionally followed by "
                                    ":field=value,...)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SparseConfigError(f"sparse config {path}: not valid YAML: {first}") from e
        if data is None:
            raise SparseConfigError(f"sparse config {path}: the file is empty; write at least one field, e.g. "
                                    "'method: quest'")
        if overrides and isinstance(data, dict):
            data = {**data, **overrides}
        return cls.from_dict(data, source=spec if overrides else str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the config as YAML (what ``--sparse-config PATH`` and :meth:`load` read); returns the path."""
        import yaml

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict()))
        return path

    def replace(self, **changes: Any) -> "SparseConfig":
        return dataclasses.replace(self, **changes)


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A config spec -> (preset name or YAML path, its inline overrides): ``quest:token_budget=1024`` ->
    (``quest``, ``{"token_budget": 1024}``); a spec without ``:`` (or an existing path) has none."""
    if ":" not in spec or pathlib.Path(spec).exists():
        return spec, {}
    base, _, inline = spec.partition(":")
    overrides = parse_overrides(inline.split(","), f"sparse config {spec!r}")
    if not overrides:
        raise SparseConfigError(f"sparse config {spec!r}: no overrides after ':' (write e.g. quest:token_budget=1024)")
    return base, overrides


def parse_overrides(items, source: str) -> dict[str, Any]:
    """``["field=value", ...]`` -> a mapping, each value read as YAML (``1024`` an int, ``0.9`` a float); empty
    items are skipped. ``source`` names where they came from in the error."""
    import yaml

    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in items)):
        field, eq, value = item.partition("=")
        if not eq or not field.strip():
            raise SparseConfigError(f"{source}: override {item!r} is not field=value (write e.g. "
                                    "token_budget=1024 or quest:token_budget=1024,reselect_every=4)")
        try:
            out[field.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            out[field.strip()] = value.strip()
    return out


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
