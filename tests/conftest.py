"""Shared test set-up: the ``gpu`` marker skips cleanly without CUDA or CuPy.

On the GPU host a skip hides a broken install (CuPy, FlashInfer, SGLang or a model missing makes ``pytest -m gpu``
pass with everything skipped): ``SGL_SPARSE_REQUIRE_GPU=1`` turns every skipped ``gpu`` test into a failure that
names what was missing, except the skips of tests that need more GPUs than the host has.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_GPU = "SGL_SPARSE_REQUIRE_GPU"
MORE_GPUS = "needs two GPUs"          # a hardware skip (tests/test_tp_gpu.py) stays a skip


def _gpu_ready() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False, "CuPy is not installed (pip install 'sgl-sparse[cuda12]' or '[cuda13]')"
    return True, ""


def pytest_collection_modifyitems(config, items):
    ok, why = _gpu_ready()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"gpu test skipped: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and "gpu" in item.keywords and os.environ.get(REQUIRE_GPU) == "1"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if MORE_GPUS in reason:
        return
    report.outcome = "failed"
    report.longrepr = f"{REQUIRE_GPU}=1 and this gpu test was skipped: {reason}"
