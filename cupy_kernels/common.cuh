// Shared device helpers for the cupy_kernels sources (pasted in front of each .cu by _cuda.py).
// No CUDA headers are included: NVRTC compiles these sources on any CUDA 12/13 host without include paths.
//
// KV cache elements (fp16 or bf16) travel as raw 16-bit words; KV_BF16 (0 or 1, a -D define) picks the
// conversion to float. 16-byte vector loads (uint4) carry 8 elements.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef KV_BF16
#define KV_BF16 1
#endif

// Programmatic dependent launch (sm_90+; cupy_kernels._cuda.launch records it into CUDA graphs unless
// SGL_SPARSE_PDL=0): a kernel may then be scheduled while the previous kernel on its stream still drains,
// overlapping its launch with that kernel's tail.
// Every kernel calls this first, before it reads or writes memory: it returns once the previous kernel (and, as
// that one waited in turn, every kernel before it) has finished and its writes are visible. Launched without the
// attribute, or before sm_90, it returns at once.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel on the stream launch now (its blocks are scheduled and wait in wait_for_previous_kernel()
// until this kernel has finished), instead of at this kernel's end. Only where the next kernel is one of ours: a
// kernel that touches memory before its wait (FlashInfer's prefill reads the row lengths first) must not follow.
// A no-op without the launch attribute, or before sm_90.
__device__ __forceinline__ void allow_next_kernel_to_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float kv_lo(u32 w) {  // element 0 of a packed pair
#if KV_BF16
    return __uint_as_float(w << 16);
#else
    float f; unsigned short h = (unsigned short)(w & 0xffffu);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ float kv_hi(u32 w) {  // element 1 of a packed pair
#if KV_BF16
    return __uint_as_float(w & 0xffff0000u);
#else
    float f; unsigned short h = (unsigned short)(w >> 16);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ float kv_to_float(u16 x) { return kv_lo((u32)x); }

__device__ __forceinline__ u16 float_to_kv(float f) {  // round to nearest even, like torch's .to(dtype)
    unsigned short h;
#if KV_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

// Slot indices written by SGLang (out_cache_loc) are int64; kernels that take them are compiled for the caller's
// dtype (SLOTS_I64=1: int64, else int32) instead of the wrapper casting them, a kernel per call, every layer.
#ifndef SLOTS_I64
#define SLOTS_I64 0
#endif
#if SLOTS_I64
typedef long long slot_t;
#else
typedef int slot_t;
#endif

// 8 elements of a uint4 as floats.
__device__ __forceinline__ void unpack8(const uint4 v, float* f) {
    f[0] = kv_lo(v.x); f[1] = kv_hi(v.x); f[2] = kv_lo(v.y); f[3] = kv_hi(v.y);
    f[4] = kv_lo(v.z); f[5] = kv_hi(v.z); f[6] = kv_lo(v.w); f[7] = kv_hi(v.w);
}

// Quest's bound of q.k over one page for the Heads query heads of one KV head, on a row of Lanes lanes that
// each hold 8 channels of the page's min (vmin) and max (vmax): max_g sum_d max(q_gd * min_d, q_gd * max_d),
// computed as (q/2)(min+max) + |q/2|(max-min), two FMAs per channel and head, from qh = q/2 (the lane's 8
// channels per head). Every lane of the warp must call it (the row sums by shuffles); each lane gets the bound.
// Mean: the mean over the heads instead of the max (sparse config group_score "mean").
template <int Heads, int Lanes, bool Mean>
__device__ __forceinline__ float quest_bound_f(const float (&qh)[Heads][8], const float (&mn)[8],
                                               const float (&mx)[8]) {
    float mid[8], rad[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) { mid[i] = mn[i] + mx[i]; rad[i] = mx[i] - mn[i]; }
    float best = Mean ? 0.f : NEG_INF;
#pragma unroll
    for (int g = 0; g < Heads; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            acc = fmaf(qh[g][i], mid[i], acc);
            acc = fmaf(fabsf(qh[g][i]), rad[i], acc);
        }
#pragma unroll
        for (int o = Lanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        best = Mean ? best + acc : fmaxf(best, acc);
    }
    return Mean ? best / Heads : best;
}

template <int Heads, int Lanes, bool Mean>
__device__ __forceinline__ float quest_bound(const float (&qh)[Heads][8], const uint4 vmin, const uint4 vmax) {
    float mn[8], mx[8];
    unpack8(vmin, mn);
    unpack8(vmax, mx);
    return quest_bound_f<Heads, Lanes, Mean>(qh, mn, mx);
}

// ---------------------------------------------------------------- int8 page bounds (bounds_dtype int8)
// One row of 2*Dim + 8 bytes per (page, KV head): Dim min codes, Dim max codes, fp32 lo, fp32 scale; a bound is
// fl(fl(code * scale) + lo), with explicit round-to-nearest operations so that no multiply-add is fused (the
// reference, reference.quantize_bounds_int8, rounds twice; outwardness is decided on exactly these values).
__device__ __forceinline__ float int8_level(float code, float lo, float scale) {
    return __fadd_rn(__fmul_rn(code, scale), lo);
}

// This lane's 16-byte vectors of the min and max of KV head h of physical page `page` in a bounds table
// [pages, KvHeads, 2, Dim]; zeros for page < 0 (no page: the lane still joins quest_bound's shuffles).
template <int KvHeads, int Dim>
__device__ __forceinline__ void load_page_bounds(const u16* __restrict__ bounds, int page, int h, int d0,
                                                 uint4& vmin, uint4& vmax) {
    if (page >= 0) {
        const u16* bnd = bounds + (((long long)page * KvHeads + h) * 2) * Dim + d0;
        vmin = *reinterpret_cast<const uint4*>(bnd);
        vmax = *reinterpret_cast<const uint4*>(bnd + Dim);
    } else {
        vmin = make_uint4(0, 0, 0, 0);
        vmax = make_uint4(0, 0, 0, 0);
    }
}

// This lane's 8 channels (from d0) of the Group query heads of KV head h of request b (KvHeads KV heads, Dim
// channels), halved (for quest_bound).
template <int Group, int KvHeads, int Dim>
__device__ __forceinline__ void load_half_query(const u16* __restrict__ q, int b, int h, int d0,
                                                float (&qh)[Group][8]) {
#pragma unroll
    for (int g = 0; g < Group; ++g) {
        const uint4 v = *reinterpret_cast<const uint4*>(q + ((long long)b * KvHeads * Group + h * Group + g) * Dim + d0);
        unpack8(v, qh[g]);
#pragma unroll
        for (int i = 0; i < 8; ++i) qh[g][i] *= 0.5f;
    }
}

// Offsets of the warps' totals over the block: every thread gets the sum of the totals of the warps before its own
// and *total, the block's sum. The thread `writer` of each warp passes its warp's total. warp_totals: NWARPS ints
// of shared memory (free again when this returns).
template <int NWARPS>
__device__ __forceinline__ int warps_before(int warp_total, bool writer, int* warp_totals, int* total) {
    const int warp = threadIdx.x >> 5;
    if (writer) warp_totals[warp] = warp_total;
    __syncthreads();
    int before = 0, sum = 0;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
        const int t = warp_totals[w];
        before += (w < warp) ? t : 0;
        sum += t;
    }
    __syncthreads();
    *total = sum;
    return before;
}

// Exclusive prefix count of `flag` over the block, in thread order (every thread of a block of NWARPS warps calls
// it); returns this thread's prefix and sets *total to the block's count. warp_totals: NWARPS ints of shared memory.
template <int NWARPS>
__device__ __forceinline__ int block_exclusive_scan(bool flag, int* warp_totals, int* total) {
    const int lane = threadIdx.x & 31;
    const u32 ballot = __ballot_sync(0xffffffffu, flag);
    return warps_before<NWARPS>(__popc(ballot), lane == 0, warp_totals, total) +
           __popc(ballot & ((1u << lane) - 1u));
}

// Exclusive prefix sum of `v` over the block, in thread order (every thread of a block of NWARPS warps calls it);
// returns this thread's prefix and sets *total to the block's sum. warp_totals: NWARPS ints of shared memory.
template <int NWARPS>
__device__ __forceinline__ int block_exclusive_sum(int v, int* warp_totals, int* total) {
    const int lane = threadIdx.x & 31;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += t;
    }
    return warps_before<NWARPS>(x, lane == 31, warp_totals, total) + x - v;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// ---------------------------------------------------------------- counter-based RNG (see reference.py)
// lowbias32 (C. Wellons): a 32-bit integer hash with a good avalanche; the torch reference mirrors it exactly.
__device__ __forceinline__ u32 hash32(u32 x) {
    x ^= x >> 16; x *= 0x7feb352du;
    x ^= x >> 15; x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// Stream key of one (row seed, kv head): every draw i of that stream is hash32(key ^ hash32(i)).
__device__ __forceinline__ u32 rng_key(u64 seed, u32 head) {
    return hash32((u32)seed ^ hash32((u32)(seed >> 32) ^ hash32(head)));
}

// Uniform integer in [0, n) for draw i (Lemire's multiply-shift).
__device__ __forceinline__ u32 rng_uniform(u32 key, u32 i, u32 n) {
    u32 x = hash32(key ^ hash32(i));
    return (u32)(((u64)x * (u64)n) >> 32);
}

// Sum of counts[0..r) by the whole block, in a fixed order (every thread of a block of NWARPS warps calls it and
// gets the sum): the CSR offset of row r when each block owns one row. red: NWARPS ints of shared memory, read
// after the call's barrier: reuse it only after another __syncthreads().
template <int NWARPS, class CountOf>
__device__ __forceinline__ int block_sum_before_of(CountOf&& count_of, int r, int* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int s = 0;
    for (int i = threadIdx.x; i < r; i += NWARPS * 32) s += count_of(i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    int sum = 0;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) sum += red[w];
    return sum;
}

template <int NWARPS>
__device__ __forceinline__ int block_sum_before(const int* __restrict__ counts, int r, int* red) {
    return block_sum_before_of<NWARPS>([&](int i) { return counts[i]; }, r, red);
}

// FlashInfer's per-head paged row r (= b * HK + h) of n selected logical pages sel[0..n) (ascending) of request b,
// whose row of req_to_token is r2t, from `offset` (see page_rows.cu and reference.page_rows): page index
// r2t[j * P] * HK + h per page j, indptr[r] (and indptr[num_rows] from the last row), the row's last page length
// and its token count. Every thread of the block calls it; sel is read by any thread (write it before a barrier).
template <int P>
__device__ __forceinline__ void write_page_row(const int* sel, int n, const int* __restrict__ r2t, int seq_len,
                                               int h, int num_kv_heads, int r, int num_rows, int offset,
                                               int* __restrict__ indptr, int* __restrict__ page_indices,
                                               int* __restrict__ last_page_len, int* __restrict__ num_tokens) {
    for (int e = threadIdx.x; e < n; e += blockDim.x)
        page_indices[offset + e] = r2t[(long long)sel[e] * P] * num_kv_heads + h;
    if (threadIdx.x == 0) {
        const int last = n > 0 ? min(P, seq_len - sel[n - 1] * P) : 0;
        indptr[r] = offset;
        if (r == num_rows - 1) indptr[r + 1] = offset + n;
        last_page_len[r] = last;
        num_tokens[r] = n > 0 ? (n - 1) * P + last : 0;
    }
}
