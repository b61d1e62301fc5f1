"""The top-k kernels compile with NVRTC for every define their wrapper can produce, without spilling (no GPU
needed: NVRTC and ptxas run on the host; skipped where CuPy or NVRTC is missing). The GPU tests
(tests/test_kernels_gpu.py) check what they compute."""

from __future__ import annotations

import pytest

from cupy_kernels.topk_pages import MAX_KEYS_PER_THREAD, THREADS, keys_per_thread


def test_keys_per_thread_holds_a_row_up_to_the_register_capacity():
    pages = (1, 512, 513, 1024, 2048, 2049, 4096, 8192, 8193, 131072)
    assert [keys_per_thread(m) for m in pages] == [1, 1, 2, 2, 4, 8, 8, 16, 16, 16]
    for m in range(1, 3 * MAX_KEYS_PER_THREAD * THREADS, 97):
        kpt = keys_per_thread(m)
        assert kpt * THREADS >= m or kpt == MAX_KEYS_PER_THREAD


def _compile(name: str, defines: dict[str, int]) -> str:
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from cupy_kernels import _cuda
    try:
        prog = nvrtc.createProgram(_cuda._source(name), name, [], [])
    except Exception as e:  # noqa: BLE001 - libnvrtc not loadable on this host
        pytest.skip(f"NVRTC unavailable: {e}")
    options = ["--std=c++17", "--gpu-architecture=sm_90", "-Xptxas", "-v"]
    options += [f"-D{k}={v}" for k, v in defines.items()]
    try:
        nvrtc.compileProgram(prog, options)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{name} {defines} does not compile: {e}\n{nvrtc.getProgramLog(prog)}")
    return nvrtc.getProgramLog(prog)


@pytest.mark.parametrize("kpt", sorted({keys_per_thread(m) for m in range(1, 20000, 64)}))
def test_topk_pages_compiles_without_spills(kpt):
    log = _compile("topk_pages.cu", {"PAGE_SIZE": 16, "KEYS_PER_THREAD": kpt})
    if "spill" in log:    # ptxas -v output (absent if this NVRTC drops it)
        assert "0 bytes spill stores" in log and "0 bytes stack frame" in log, log


def test_topk_pages_benchmark_baseline_compiles():
    _compile("topk_pages_radix4.cu", {"PAGE_SIZE": 16})


def test_token_rows_compiles_without_spills():
    log = _compile("token_rows.cu", {})
    if "spill" in log:
        assert "0 bytes spill stores" in log and "0 bytes stack frame" in log, log
