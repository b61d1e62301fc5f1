"""Programmatic dependent launch (``SGL_SPARSE_PDL=1``) on CPU: the driver structures as cuda.h lays them out, the
kernel arguments as the driver copies them, and every kernel waiting for the one before it before it touches
memory (launched with PDL, a kernel without that wait would read its inputs while they are being written)."""

from __future__ import annotations

import ctypes
import pathlib
import re

import numpy as np
import pytest
import torch

from cupy_kernels import _cuda


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
    kernels = 0
    for path in sources:
        text = path.read_text()
        for m in re.finditer(r'extern "C" __global__[^{]*?(\w+)\s*\([^{]*\)\s*\{', text, re.S):
            body = text[m.end():].lstrip()
            assert body.startswith("wait_for_previous_kernel();"), f"{path.name}: kernel {m.group(1)}"
            kernels += 1
    assert kernels >= len(sources)
