"""sgl-sparse: query-aware sparse attention for SGLang decode.

The CUDA kernel layer lives in the sibling package :mod:`cupy_kernels`; the SGLang attention backend, the
sparse decode operator and the method configs are built on top of it (see the README's roadmap).
"""

__version__ = "0.1.0"
