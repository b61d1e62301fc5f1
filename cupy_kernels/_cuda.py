"""Compiling and launching the CuPy RawKernels on torch tensors.

Every wrapper in this package goes through three helpers:

- :func:`module` compiles a ``.cu`` file of this folder (with ``common.cuh`` pasted in front, so CuPy's
  source-keyed cache never serves a stale header) once per set of ``-D`` defines, lazily, on first use;
- :func:`launch` runs a kernel on torch's *current* CUDA stream, so the launch is ordered with the
  surrounding torch work and is recorded when a ``torch.cuda.graph`` capture is active. Tensors are passed
  zero-copy as the device pointers of validated contiguous tensors: importing each through DLPack
  (:func:`as_cupy`, kept for callers that want CuPy arrays) cost 100-770 us of host time per launch on the
  GPU host with 6-15 tensors, which dominated eager decode steps. A launch recorded into a CUDA graph on sm_90
  and newer goes through the driver's ``cuLaunchKernelEx`` with programmatic stream serialization
  (programmatic dependent launch, as FlashInfer launches its own kernels there): in the graph's replays a
  kernel may be scheduled while the one before it drains, and waits in ``wait_for_previous_kernel()``
  (``common.cuh``) before it touches memory. Eager launches stay CuPy's: there the host, not the gap between
  two kernels, sets the pace, and building the driver call's arguments in Python costs ~15 us more per launch.
  ``SGL_SPARSE_PDL=0`` turns programmatic launches off.

Nothing here synchronises the host with the device. Importing this module needs neither CuPy nor a GPU:
CuPy is imported the first time a kernel is compiled.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
from typing import Iterable, Sequence

import torch

KERNEL_DIR = pathlib.Path(__file__).resolve().parent

# Element types of the KV cache that the kernels read: the define KV_BF16 selects the conversion.
KV_DTYPES = {torch.bfloat16: 1, torch.float16: 0}


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the host
        raise ImportError(
            "cupy_kernels needs CuPy to launch kernels: pip install 'sgl-sparse[cuda12]' "
            "(cupy-cuda12x) or 'sgl-sparse[cuda13]' (cupy-cuda13x) to match your CUDA driver"
        ) from e
    return cupy


@functools.lru_cache(maxsize=None)
def _source(name: str) -> str:
    common = (KERNEL_DIR / "common.cuh").read_text()
    body = (KERNEL_DIR / name).read_text()
    return common + "\n#line 1 \"" + name + "\"\n" + body


@functools.lru_cache(maxsize=None)
def _module(name: str, defines: tuple[tuple[str, int], ...], device: int):
    cp = _cupy()
    options = ("--std=c++17",) + tuple(f"-D{k}={v}" for k, v in defines)
    with cp.cuda.Device(device):
        mod = cp.RawModule(code=_source(name), options=options)
        mod.compile()
    return mod


@functools.lru_cache(maxsize=None)
def _kernel(name: str, function: str, defines: tuple[tuple[str, int], ...], device: int):
    return _module(name, defines, device).get_function(function)


def kernel(name: str, function: str, device: torch.device, **defines: int):
    """One kernel of ``cupy_kernels/<name>``; the same object for the same arguments (attributes stick)."""
    return _kernel(name, function, tuple(sorted(defines.items())), device.index or 0)


_STREAMS: dict[tuple[int, int], object] = {}


def _cupy_stream(device: torch.device):
    cp = _cupy()
    ts = torch.cuda.current_stream(device)
    key = (device.index or 0, ts.cuda_stream)
    s = _STREAMS.get(key)
    if s is None:
        if hasattr(ts, "__cuda_stream__") and hasattr(cp.cuda.Stream, "from_external"):
            s = cp.cuda.Stream.from_external(ts)
        else:
            s = cp.cuda.ExternalStream(ts.cuda_stream, device.index or 0)
        _STREAMS[key] = s
    return s


def as_cupy(t: torch.Tensor):
    """Zero-copy CuPy view of a contiguous torch CUDA tensor (DLPack)."""
    return _cupy().from_dlpack(t.detach())


# Programmatic dependent launch for the kernels of this package that CUDA graphs record on sm_90+ (see the module
# docstring), unless SGL_SPARSE_PDL=0. Read once, at import: a process launches one way throughout.
PDL = os.environ.get("SGL_SPARSE_PDL", "1") != "0"


def launch(fn, grid: Sequence[int], block: Sequence[int], args: Iterable, device: torch.device,
           shared_mem: int = 0) -> None:
    """Launch ``fn`` on torch's current stream of ``device``.

    ``args`` may hold torch tensors (validated by the caller: CUDA, contiguous, on ``device``; passed as device
    pointers) and numpy scalars.
    """
    import numpy as np

    cp = _cupy()
    stream = _cupy_stream(device)
    grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
    with cp.cuda.Device(device.index or 0), stream:
        if PDL and _pdl_capable(device.index or 0) and torch.cuda.is_current_stream_capturing():
            _launch_programmatic(fn, grid, block, kernel_params(args), stream.ptr, shared_mem)
        else:
            cargs = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
            fn(grid, block, cargs, shared_mem=shared_mem)


# ---------------------------------------------------------------- programmatic dependent launch (driver API)

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6      # cuda.h, CUlaunchAttributeID


class LaunchAttributeValue(ctypes.Union):
    """cuda.h ``CUlaunchAttributeValue``: a 64-byte union (8-byte aligned); the member used here."""
    _fields_ = [("pad", ctypes.c_char * 64), ("programmatic_stream_serialization_allowed", ctypes.c_int),
                ("align", ctypes.c_void_p)]


class LaunchAttribute(ctypes.Structure):
    """cuda.h ``CUlaunchAttribute``: id, padding to 8 bytes, value (72 bytes)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", LaunchAttributeValue)]


class LaunchConfig(ctypes.Structure):
    """cuda.h ``CUlaunchConfig`` (56 bytes: the stream at offset 32, attrs at 40, numAttrs at 48)."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_SCALARS = {"int32": ctypes.c_int32, "uint32": ctypes.c_uint32, "int64": ctypes.c_int64,
            "uint64": ctypes.c_uint64, "float32": ctypes.c_float, "float64": ctypes.c_double, "bool": ctypes.c_bool}


def kernel_params(args: Iterable) -> list:
    """Each kernel argument as the ctypes value the driver copies: a tensor as its device pointer, a numpy
    scalar as its own type, a Python bool/int/float as CuPy passes it (bool, int64, double)."""
    import numpy as np

    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(ctypes.c_uint64(a.data_ptr()))
        elif isinstance(a, np.generic) and a.dtype.name in _SCALARS:
            out.append(_SCALARS[a.dtype.name](a.item()))
        elif isinstance(a, bool):
            out.append(ctypes.c_bool(a))
        elif isinstance(a, int):
            out.append(ctypes.c_int64(a))
        elif isinstance(a, float):
            out.append(ctypes.c_double(a))
        else:
            raise TypeError(f"kernel argument of type {type(a).__name__} is not a tensor or a scalar")
    return out


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _cu_launch_kernel_ex():
    lib = ctypes.CDLL("libcuda.so.1")
    f = lib.cuLaunchKernelEx
    f.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    f.restype = ctypes.c_int
    name = lib.cuGetErrorName
    name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    name.restype = ctypes.c_int
    return f, name


def _launch_programmatic(fn, grid: tuple, block: tuple, params: list, stream: int, shared_mem: int) -> None:
    launch_ex, error_name = _cu_launch_kernel_ex()
    attr = LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.programmatic_stream_serialization_allowed = 1
    grid3, block3 = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    config = LaunchConfig((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), shared_mem, stream,
                          ctypes.pointer(attr), 1)
    pointers = (ctypes.c_void_p * max(1, len(params)))(*[ctypes.addressof(p) for p in params])
    err = launch_ex(ctypes.byref(config), fn.kernel.ptr, pointers, None)
    if err:
        text = ctypes.c_char_p()
        error_name(err, ctypes.byref(text))
        raise RuntimeError(f"cuLaunchKernelEx({fn.name}): {text.value.decode() if text.value else err}")


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def early_launch_pays(batch: int, kv_heads: int, device: torch.device) -> int:
    """1 where a page scan should let the ``topk_pages`` that follows launch early (PDL's
    ``griddepcontrol.launch_dependents``), else 0. Measured on an H200: with a top-k block for every SM (B * HK >=
    SMs) the early launch saves 2-3 % of a Quest step at 32 x 32K; with fewer (8 requests x 8 KV heads) it cost
    2-5 %. A launch-time constant of the batch size, so a captured graph keeps it."""
    return int(batch * kv_heads >= num_sms(device.index or 0))


@functools.lru_cache(maxsize=None)
def resident_blocks(fn, threads: int, device: torch.device) -> int:
    """Blocks of ``threads`` threads of kernel ``fn`` that the whole GPU holds at once (thread and register
    limits; a grid of this size walks its work with every block resident). Cached: asked at every launch."""
    props = torch.cuda.get_device_properties(device.index or 0)
    max_threads = getattr(props, "max_threads_per_multi_processor", 2048)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    per_sm = min(max_threads // threads, regs // (max(int(fn.num_regs), 1) * threads))
    return max(1, per_sm) * props.multi_processor_count


_MAX_DYNAMIC_SMEM: dict[int, int] = {}   # id of a kernel object cached (kept alive) by _kernel -> limit set


def set_max_dynamic_smem(fn, nbytes: int) -> None:
    """Allow ``fn`` (a cached object from :func:`kernel`) ``nbytes`` of dynamic shared memory, so static +
    dynamic may exceed 48 KiB. The limit only grows, so earlier launches stay valid."""
    if nbytes > _MAX_DYNAMIC_SMEM.get(id(fn), 0):
        fn.max_dynamic_shared_size_bytes = nbytes
        _MAX_DYNAMIC_SMEM[id(fn)] = nbytes


# ---------------------------------------------------------------- argument checks (no host sync)

def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(t: torch.Tensor, name: str, *, dtypes: Sequence[torch.dtype], ndim: int | None = None,
                 device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor (the CPU path is cupy_kernels.reference)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int32 (a device-side cast when it is int64; no host sync)."""
    return t if t.dtype == torch.int32 else t.to(torch.int32)


# ---------------------------------------------------------------- scalar kernel arguments

def i32(x: int):
    import numpy as np
    return np.int32(x)


def f32(x: float):
    import numpy as np
    return np.float32(x)


def f64(x: float):
    import numpy as np
    return np.float64(x)


def u64(x: int):
    import numpy as np
    return np.uint64(x)


def check_batch(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate SGLang's batch index tensors; returns them as int32 (device-side casts only)."""
    check_tensor(req_to_token, "req_to_token", dtypes=[torch.int32], ndim=2, device=device)
    check_tensor(req_pool_indices, "req_pool_indices", dtypes=[torch.int32, torch.int64], ndim=1, device=device)
    check_tensor(seq_lens, "seq_lens", dtypes=[torch.int32, torch.int64], ndim=1, device=device)
    check(req_pool_indices.shape == seq_lens.shape,
          f"req_pool_indices {tuple(req_pool_indices.shape)} and seq_lens {tuple(seq_lens.shape)} must match")
    return req_to_token, as_int32(req_pool_indices), as_int32(seq_lens)


MAX_GROUP = 8


def check_group(num_q_heads: int, num_kv_heads: int) -> int:
    check(num_q_heads % num_kv_heads == 0,
          f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    g = num_q_heads // num_kv_heads
    check(1 <= g <= MAX_GROUP, f"GQA group size {g} is not supported (1..{MAX_GROUP} query heads per KV head)")
    return g
