"""Programmatic dependent launch (on by default on sm_90+, ``SGL_SPARSE_PDL=0`` turns it off) on CPU: which launch
the environment asks for, the driver structures as cuda.h lays them out, the kernel arguments as the driver copies
them, and every kernel waiting for the one before it before it touches memory (launched with PDL, a kernel without
that wait would read its inputs while they are being written)."""

from __future__ import annotations

import ctypes
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from cupy_kernels import _cuda


@pytest.mark.parametrize("value,expected", [(None, True), ("1", True), ("0", False)])
def test_pdl_is_on_unless_the_environment_turns_it_off(value, expected):
    import os
    env = {k: v for k, v in os.environ.items() if k != "SGL_SPARSE_PDL"}
    if value is not None:
        env["SGL_SPARSE_PDL"] = value
    out = subprocess.run([sys.executable, "-c", "from cupy_kernels import _cuda; print(_cuda.PDL)"], env=env,
                         cwd=pathlib.Path(_cuda.KERNEL_DIR).parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_driver_structures_match_cuda_h():
    # sizeof/offsetof printed by a C program against CUDA 13.0's cuda.h (the same since CUDA 12.0)
    assert ctypes.sizeof(_cuda.LaunchAttribute) == 72 and _cuda.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_cuda.LaunchConfig) == 56
    assert (_cuda.LaunchConfig.stream.offset, _cuda.LaunchConfig.attrs.offset,
            _cuda.LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert _cuda.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION == 6


def test_kernel_params_keep_each_arguments_type_and_value():
    t = torch.zeros(3)
    got = _cuda.kernel_params([t, np.int32(-3), np.uint32(7), np.float32(1.5), np.float64(2.25), np.uint64(1 << 40),
                               np.int64(-5), 4, 0.5, True])
    want = [(ctypes.c_uint64, t.data_ptr()), (ctypes.c_int32, -3), (ctypes.c_uint32, 7), (ctypes.c_float, 1.5),
            (ctypes.c_double, 2.25), (ctypes.c_uint64, 1 << 40), (ctypes.c_int64, -5), (ctypes.c_int64, 4),
            (ctypes.c_double, 0.5), (ctypes.c_bool, True)]
    assert [(type(p), p.value) for p in got] == want
    with pytest.raises(TypeError, match="not a tensor or a scalar"):
        _cuda.kernel_params(["3"])


def test_every_kernel_waits_for_the_previous_one_first():
    sources = sorted(pathlib.Path(_cuda.KERNEL_DIR).glob("*.cu"))
    files = set()
    for path in sources:
        text = path.read_text()
        for m in re.finditer(r'extern "C" __global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\([^{]*\)\s*'
                             r'(?://[^\n]*\n\s*)?\{', text, re.S):
            body = text[m.end():].lstrip()
            assert body.startswith("wait_for_previous_kernel();"), f"{path.name}: kernel {m.group(1)}"
            files.add(path.name)
    assert files == {p.name for p in sources}          # every file's kernels found (a trailing comment included)


def test_early_launch_only_where_our_own_kernel_follows():
    """``allow_next_kernel_to_launch()`` (griddepcontrol.launch_dependents) only in the kernels that the policies
    always follow with another of ours (the page scores and their refinement -> topk_pages; the drift test -> the
    page scores), each right after its wait: FlashInfer's prefill reads the row lengths before its own wait, so no
    kernel that writes them (topk_pages, the token-row kernels) may let it launch early."""
    triggers = {}
    for path in sorted(pathlib.Path(_cuda.KERNEL_DIR).glob("*.cu")):
        text = path.read_text()
        for m in re.finditer(r'extern "C" __global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\([^{]*\)\s*'
                             r'(?://[^\n]*\n\s*)?\{', text, re.S):
            end = text.find('\nextern "C"', m.end())
            body = text[m.end():end if end >= 0 else len(text)]
            if "allow_next_kernel_to_launch();" in body:
                lines = [line.strip() for line in body.strip().splitlines()]
                trigger = lines[1].split("//")[0].strip()
                allowed = ("allow_next_kernel_to_launch();", "if (early_launch) allow_next_kernel_to_launch();")
                assert trigger in allowed, f"{path.name}: {m.group(1)}"
                triggers[m.group(1)] = trigger.startswith("if")
    # the scans trigger only where the wrapper says it pays (early_launch_pays); the drift test always
    assert triggers == {"quest_page_scores": True, "quest_refine_scores": True, "reuse_drift": False}


def test_early_launch_pays_with_a_topk_block_for_every_sm(monkeypatch):
    """The scans' early launch is on where the top-k that follows has a block (request x KV head) per SM: off at 8
    or 16 requests x 8 KV heads on a 132-SM H200, on at 17 and 32; a GPU with fewer SMs turns it on sooner."""
    monkeypatch.setattr(_cuda, "num_sms", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert [_cuda.early_launch_pays(b, 8, dev) for b in (1, 8, 16, 17, 32)] == [0, 0, 0, 1, 1]
    assert _cuda.early_launch_pays(4, 32, dev) == 0 and _cuda.early_launch_pays(5, 32, dev) == 1
    monkeypatch.setattr(_cuda, "num_sms", lambda index: 66)
    assert [_cuda.early_launch_pays(b, 8, dev) for b in (8, 9, 16)] == [0, 1, 1]
