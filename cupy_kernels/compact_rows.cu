// Compact fixed-capacity rows into FlashInfer's CSR form (see reference.compact_kv_rows).
//
// Row r of `rows` holds counts[r] valid entries; FlashInfer wants them back to back with indptr. Grid (R, chunks):
// block (r, z) sums counts[0..r) (a fixed-order reduction, so no cross-block scan is needed), copies entries
// z*THREADS .. z*THREADS+THREADS-1 of its row to flat[offset ...], and block (r, 0) writes indptr[r] (and
// indptr[R] for the last row). Rows are a few thousand at most (batch x KV heads), so re-reading the counts per
// block costs less than a second launch, and a small batch still spreads its copy over many blocks.
// No defines.

#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS) compact_kv_rows(
    const int* __restrict__ rows,     // [R, cap]
    const int* __restrict__ counts,   // [R]
    int* __restrict__ indptr,         // [R + 1]
    int* __restrict__ flat,           // [>= sum(counts)]
    int cap)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ int red[THREADS / 32];
    const int r = blockIdx.x;
    const int j = blockIdx.y * THREADS + threadIdx.x;
    const int tid = threadIdx.x;
    const int n = counts[r];
    if (blockIdx.y > 0 && blockIdx.y * THREADS >= n) return;   // nothing of this row in this chunk (block-uniform)
    const int offset = block_sum_before<THREADS / 32>(counts, r, red);
    const int* src = rows + (long long)r * cap;
    if (j < n) flat[offset + j] = src[j];
    if (blockIdx.y == 0 && tid == 0) {
        indptr[r] = offset;
        if (r == gridDim.x - 1) indptr[r + 1] = offset + n;
    }
}
