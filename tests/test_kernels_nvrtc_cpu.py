"""The top-k and page-score kernels compile with NVRTC for every define their wrappers can produce, without
spilling (no GPU needed: NVRTC and ptxas run on the host; skipped where CuPy or NVRTC is missing). The GPU tests
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


def _assert_no_spills(log: str) -> None:
    if "spill" in log:    # ptxas -v output (absent if this NVRTC drops it)
        assert "0 bytes spill stores" in log and "0 bytes stack frame" in log, log


@pytest.mark.parametrize("kpt", sorted({keys_per_thread(m) for m in range(1, 20000, 64)}))
def test_topk_pages_compiles_without_spills(kpt):
    _assert_no_spills(_compile("topk_pages.cu", {"PAGE_SIZE": 16, "KEYS_PER_THREAD": kpt}))


def test_topk_pages_benchmark_baseline_compiles():
    _compile("topk_pages_radix4.cu", {"PAGE_SIZE": 16})


def _registers(log: str) -> int:
    import re
    found = re.findall(r"Used (\d+) registers", log)
    return int(found[-1]) if found else 0


@pytest.mark.parametrize("int8", [0, 1])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group,mean,bf16", [(1, 0, 1), (4, 0, 1), (7, 1, 0), (8, 0, 1)])
def test_page_score_kernels_compile_without_spills(int8, head_dim, group, mean, bf16):
    """The score kernel for each head dim, bounds dtype, group size, group score and query dtype: no spills, and two
    blocks of 256 threads per SM (<= 128 registers) up to head_dim 128."""
    defines = {"KV_BF16": bf16, "HEAD_DIM": head_dim, "NUM_KV_HEADS": 8, "GROUP": group, "PAGE_SIZE": 16,
               "GROUP_MEAN": mean, "BOUNDS_INT8": int8}
    log = _compile("quest_scores.cu", defines)
    _assert_no_spills(log)
    if head_dim <= 128 and "registers" in log:
        assert _registers(log) <= 128, (defines, log)


def test_token_rows_compiles_without_spills():
    log = _compile("token_rows.cu", {})
    _assert_no_spills(log)
