// Top-p pruning by parallel binary search (Twilight), one block per row (see reference.top_p_select).
//
// The row's probabilities sit in dynamic shared memory. mass(tau) = sum of p_i >= tau is computed with a
// fixed-order block reduction, so it is deterministic and monotone in tau (float rounding is monotone). The
// threshold is found by bisection on the bit pattern of tau (non-negative floats order like their bits):
// at most 32 steps give exactly the largest tau with mass(tau) >= top_p * mass(0), no sort needed. An ordered
// compaction then writes the kept positions (or candidate_ids at them) in ascending order. Rows of requests
// flagged in keep_all (Twilight's dense fallback: the request fits in the budget) keep every candidate.
// No defines.

#define THREADS 512
#define WARPS (THREADS / 32)

__device__ __forceinline__ float block_sum(float x, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = warp_sum(x);
    if (lane == 0) red[warp] = x;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w];
    __syncthreads();
    return s;
}

__device__ __forceinline__ float block_max(float x, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = warp_max(x);
    if (lane == 0) red[warp] = x;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s = fmaxf(s, red[w]);
    __syncthreads();
    return s;
}

extern "C" __global__ void __launch_bounds__(THREADS) top_p_select(
    const float* __restrict__ probs,          // [R, C]
    const int* __restrict__ num_candidates,   // [R]
    const int* __restrict__ candidate_ids,    // [R, C] or nullptr
    const unsigned char* __restrict__ keep_all, // [R / rows_per_flag] bool or nullptr
    int* __restrict__ kept,                   // [R, C]
    int* __restrict__ num_kept,               // [R]
    int C, float top_p, int rows_per_flag)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    extern __shared__ float s_p[];            // [C]
    __shared__ float red[WARPS];
    __shared__ int warp_totals[WARPS];

    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int n = num_candidates[row];
    const float* p_row = probs + (long long)row * C;
    for (int i = tid; i < n; i += THREADS) s_p[i] = p_row[i];
    __syncthreads();

    float tau = 0.f;                          // probabilities are >= 0: tau = 0 keeps every candidate
    if (top_p < 1.f && !(keep_all && keep_all[row / rows_per_flag])) {
        float local = 0.f, local_max = 0.f;
        for (int i = tid; i < n; i += THREADS) { local += s_p[i]; local_max = fmaxf(local_max, s_p[i]); }
        const float total = block_sum(local, red);
        const float pmax = block_max(local_max, red);
        const float target = top_p * total;
        u32 lo = 0u, hi = __float_as_uint(pmax) + 1u;   // mass(lo) >= target, mass(hi) < target (or hi past max)
        while (hi - lo > 1u) {
            const u32 mid = lo + ((hi - lo) >> 1);
            const float t = __uint_as_float(mid);
            float m = 0.f;
            for (int i = tid; i < n; i += THREADS) m += (s_p[i] >= t) ? s_p[i] : 0.f;
            if (block_sum(m, red) >= target) lo = mid; else hi = mid;
        }
        tau = __uint_as_float(lo);
    }

    int* out = kept + (long long)row * C;
    const int* ids = candidate_ids ? candidate_ids + (long long)row * C : nullptr;
    int written = 0;
    for (int base = 0; base < n; base += THREADS) {
        const int i = base + tid;
        const bool keep = (i < n) && (s_p[i] >= tau);
        int total;
        const int pos = written + block_exclusive_scan<WARPS>(keep, warp_totals, &total);
        if (keep) out[pos] = ids ? ids[i] : i;
        written += total;
    }
    if (tid == 0) num_kept[row] = written;
}
