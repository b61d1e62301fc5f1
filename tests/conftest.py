"""Shared test set-up: the ``gpu`` marker skips cleanly without CUDA or CuPy."""

from __future__ import annotations

import pytest


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
