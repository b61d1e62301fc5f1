"""SGL_SPARSE_REQUIRE_GPU=1 (the documented GPU test command) turns a skipped gpu test into a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REQUIRE_GPU, _gpu_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(_gpu_ready()[0], reason="GPU tests run here: nothing is skipped for a missing GPU")
def test_required_gpu_turns_skips_into_failures():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
           "tests/test_kernels_gpu.py::test_compact_kv_rows"]
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_GPU}
    quiet = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "4 skipped" in quiet.stdout, quiet.stdout[-2000:]
    required = subprocess.run(cmd, cwd=ROOT, env={**env, REQUIRE_GPU: "1"}, capture_output=True, text=True,
                              timeout=300)
    assert required.returncode != 0, required.stdout[-2000:]
    assert f"{REQUIRE_GPU}=1 and this gpu test was skipped: gpu test skipped: no CUDA GPU" in required.stdout
    assert "skipped" not in required.stdout.splitlines()[-1]
