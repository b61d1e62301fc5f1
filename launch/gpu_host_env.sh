# Source on the offline GPU host (after ../shared/gpu-host's `host.sh activate`): makes this checkout importable
# and registers its SGLang plugin entry point without pip (the host has no network and no build backend).
#   source launch/gpu_host_env.sh
_sgl_sparse_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_sgl_sparse_ep=/tmp/sgl_sparse_ep/sgl_sparse-0.1.0.dist-info
mkdir -p "$_sgl_sparse_ep"
printf 'Metadata-Version: 2.1\nName: sgl-sparse\nVersion: 0.1.0\n' > "$_sgl_sparse_ep/METADATA"
printf '[sglang.srt.plugins]\nsgl_sparse = sgl_sparse.sglang_backend:register\n' > "$_sgl_sparse_ep/entry_points.txt"
export PYTHONPATH="$_sgl_sparse_root:/tmp/sgl_sparse_ep${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JIT caches (FlashInfer, CuPy, TVM-FFI, Triton) in the checkout's ignored out/jit: a host keeps ignored files of the
# checkout between the commands of one warm session, so only its first command compiles (unless already set)
_sgl_sparse_jit=$_sgl_sparse_root/out/jit
mkdir -p "$_sgl_sparse_jit"
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-$_sgl_sparse_jit}
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$_sgl_sparse_jit/.cupy/kernel_cache}
export TVM_FFI_CACHE_DIR=${TVM_FFI_CACHE_DIR:-$_sgl_sparse_jit/.cache/tvm-ffi}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$_sgl_sparse_jit/.triton}
python3 -c "from importlib.metadata import entry_points as e; import sgl_sparse
assert any(p.name == 'sgl_sparse' for p in e(group='sglang.srt.plugins')), 'entry point not found'
print('sgl-sparse', sgl_sparse.__file__, 'registered as an SGLang plugin')"
