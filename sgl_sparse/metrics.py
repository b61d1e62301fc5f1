"""Prometheus metrics of the sparse backend, exported on SGLang's ``/metrics`` with ``--enable-metrics``.

SGLang serves ``/metrics`` from its HTTP process and collects the scheduler processes' metrics through
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by SGLang before anything imports
prometheus_client), so metrics created in the scheduler process appear there. Only attention-TP rank 0 records
(every rank sees the same requests).

- ``sglang:sparse_attended_fraction`` (histogram): per finished request, the mean fraction of its context attended
  per KV head over the sparse layers and its decode steps.
- ``sglang:sparse_decode_rows_total`` (counter, label ``attention``): decode rows that ran a selection
  (``sparse``) or attended every token (``dense``): they fit their budget, are below ``min_context``, opted out,
  or their step ran the dense path (its long requests held fewer than ``min_batch_tokens`` tokens).
- ``sglang:sparse_side_table_bytes`` (gauge): GPU memory of the backend's own tables on this rank (page bounds,
  int4 keys, kept selections).
"""

from __future__ import annotations

FRACTION_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class SparseMetrics:
    """The three metrics, created once per process (prometheus_client registries are per process)."""

    _instance: "SparseMetrics | None" = None

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.attended_fraction = Histogram(
            "sglang:sparse_attended_fraction", "Per finished request: mean fraction of the context attended per KV "
            "head over the sparse layers", buckets=FRACTION_BUCKETS)
        self.decode_rows = Counter("sglang:sparse_decode_rows", "Decode rows by attention: sparse (a selection) or "
                                   "dense (within the budget, below min_context, opted out or below "
                                   "min_batch_tokens)", labelnames=["attention"])
        self.side_table_bytes = Gauge("sglang:sparse_side_table_bytes", "GPU bytes of the sparse backend's tables "
                                      "on this rank", multiprocess_mode="mostrecent")

    @classmethod
    def get(cls) -> "SparseMetrics":
        if cls._instance is None:
            cls._instance = SparseMetrics()
        return cls._instance

    def count_rows(self, sparse: int, dense: int) -> None:
        if sparse:
            self.decode_rows.labels(attention="sparse").inc(sparse)
        if dense:
            self.decode_rows.labels(attention="dense").inc(dense)
