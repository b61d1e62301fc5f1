"""The backend's Prometheus metrics (sgl_sparse.metrics) and the scheduler hook that records them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("prometheus_client")

from prometheus_client import REGISTRY  # noqa: E402

from sgl_sparse import sglang_backend  # noqa: E402
from sgl_sparse.metrics import SparseMetrics  # noqa: E402


def _value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_finished_requests_feed_the_histogram_and_rows_the_counter(monkeypatch):
    metrics = SparseMetrics.get()
    assert SparseMetrics.get() is metrics                      # one set per process
    backend = SimpleNamespace(metrics=metrics, config=SimpleNamespace(is_sparse=True, token_budget=2048))
    plain = SimpleNamespace(custom_params=None)
    running = SimpleNamespace(customized_info=None, finished=lambda: False, sampling_params=plain)
    done = SimpleNamespace(customized_info=None, finished=lambda: True, sampling_params=plain)
    monkeypatch.setitem(sglang_backend._ACTIVE, "backend", backend)
    monkeypatch.setitem(sglang_backend._ACTIVE, "fractions", {id(running): (running, 0.5), id(done): (done, 0.125)})
    count0 = _value("sglang:sparse_attended_fraction_count")
    sum0 = _value("sglang:sparse_attended_fraction_sum")
    low0 = _value("sglang:sparse_attended_fraction_bucket", le="0.2")
    for req in (running, done):
        sglang_backend._attach_fraction("result", None, 0, req)
    assert running.customized_info == {sglang_backend.STATS_KEY: [0.5], sglang_backend.BUDGET_KEY: [2048]}
    assert done.customized_info == {sglang_backend.STATS_KEY: [0.125], sglang_backend.BUDGET_KEY: [2048]}
    assert _value("sglang:sparse_attended_fraction_count") == count0 + 1          # the finished one only
    assert _value("sglang:sparse_attended_fraction_sum") == sum0 + 0.125
    assert _value("sglang:sparse_attended_fraction_bucket", le="0.2") == low0 + 1
    sparse0, dense0 = (_value("sglang:sparse_decode_rows_total", attention=a) for a in ("sparse", "dense"))
    metrics.count_rows(3, 5)
    metrics.count_rows(0, 2)
    assert _value("sglang:sparse_decode_rows_total", attention="sparse") == sparse0 + 3
    assert _value("sglang:sparse_decode_rows_total", attention="dense") == dense0 + 7
    metrics.side_table_bytes.set(12345)
    assert _value("sglang:sparse_side_table_bytes") == 12345


def test_decode_rows_by_attention_counts_the_dense_path_as_dense():
    """The rows counter: padding rows (seq_len 1) left out; rows within the budget or opted out dense; on the dense
    path (the batch floor) every row dense."""
    from sgl_sparse.config import SparseConfig

    config = SparseConfig.load("vattention").replace(token_budget=1024, min_context=4096)
    lens = torch.tensor([40000, 30000, 2000, 1, 1])
    assert sglang_backend.decode_rows_by_attention(config, lens, "sparse") == (2, 1)
    assert sglang_backend.decode_rows_by_attention(config, lens, "mixed", [True, False, False, False, False]) == (1, 2)
    assert sglang_backend.decode_rows_by_attention(config, lens, "dense") == (0, 3)
