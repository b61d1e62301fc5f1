// Top-k page selection per (request, KV head), sinks and local window forced in (see reference.topk_pages).
//
// One block per (b, h). Scores become order-preserving 32-bit keys (forced pages get the largest key); a
// 4-pass radix select (8 bits a pass, shared-memory histogram) finds the k-th largest key T and how many
// keys equal to T are needed; a final ordered compaction (ballot scans over tiles of the block) writes every
// page with key > T and the first needed pages with key == T, in ascending page order. Reads of the score
// row hit L2 after the first pass; no sort, no dynamic shared memory, any page count.
//
// Requests with at most `width` pages (width = max(top_k, select_all_upto)) keep all their pages.
// Defines: PAGE_SIZE.

#define THREADS 512
#define WARPS (THREADS / 32)

__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix of `flag` over the block, in thread order; returns it and sets *total.
__device__ __forceinline__ int block_exclusive_scan(bool flag, int* warp_totals, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 ballot = __ballot_sync(0xffffffffu, flag);
    const int in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, sum = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        const int t = warp_totals[w];
        before += (w < warp) ? t : 0;
        sum += t;
    }
    __syncthreads();
    *total = sum;
    return before + in_warp;
}

extern "C" __global__ void __launch_bounds__(THREADS) topk_pages(
    const float* __restrict__ page_scores,  // [B, HK, max_pages]
    const int* __restrict__ seq_lens,       // [B]
    int* __restrict__ selected_pages,       // [B, HK, width], width = max(top_k, select_all_upto)
    int* __restrict__ num_selected,         // [B, HK]
    int num_kv_heads, int max_pages, int top_k, int n_sink, int n_local, int width)
{
    __shared__ int hist[256];
    __shared__ int warp_totals[WARPS];
    __shared__ u32 s_prefix;
    __shared__ int s_remaining;

    const int b = blockIdx.y, h = blockIdx.x;
    const int row_id = b * num_kv_heads + h;
    const float* scores = page_scores + (long long)row_id * max_pages;
    int* out = selected_pages + (long long)row_id * width;
    const int n = (seq_lens[b] + PAGE_SIZE - 1) / PAGE_SIZE;
    const int tid = threadIdx.x;

    if (n <= width) {   // short request: every page (dense fallback)
        for (int j = tid; j < n; j += THREADS) out[j] = j;
        if (tid == 0) num_selected[row_id] = n;
        return;
    }
    const int local_begin = n - n_local;
#define KEY(j) (((j) < n_sink || (j) >= local_begin) ? 0xffffffffu : order_key(scores[j]))

    if (tid == 0) { s_prefix = 0u; s_remaining = top_k; }
    u32 mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += THREADS) hist[i] = 0;
        __syncthreads();
        const u32 prefix = s_prefix;
        const int remaining = s_remaining;
        for (int j = tid; j < n; j += THREADS) {
            const u32 k = KEY(j);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
        }
        __syncthreads();
        // Suffix sums: hist[d] <- number of matching keys with digit >= d.
        for (int off = 1; off < 256; off <<= 1) {
            int v = 0;
            if (tid < 256 && tid + off < 256) v = hist[tid + off];
            __syncthreads();
            if (tid < 256) hist[tid] += v;
            __syncthreads();
        }
        if (tid < 256) {
            const int ge = hist[tid];
            const int gt = (tid + 1 < 256) ? hist[tid + 1] : 0;
            if (ge >= remaining && gt < remaining) {   // exactly one digit satisfies this
                s_prefix = prefix | ((u32)tid << shift);
                s_remaining = remaining - gt;
            }
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const u32 T = s_prefix;          // the k-th largest key
    const int need_eq = s_remaining; // keys equal to T to take, lowest pages first

    int eq_seen = 0, written = 0;
    for (int base = 0; base < n; base += THREADS) {
        const int j = base + tid;
        const u32 k = (j < n) ? KEY(j) : 0u;
        const bool eq = (j < n) && (k == T);
        const bool gt = (j < n) && (k > T);
        int eq_total;
        const int eq_rank = eq_seen + block_exclusive_scan(eq, warp_totals, &eq_total);
        const bool take = gt || (eq && eq_rank < need_eq);
        int take_total;
        const int pos = written + block_exclusive_scan(take, warp_totals, &take_total);
        if (take) out[pos] = j;
        eq_seen += eq_total;
        written += take_total;
    }
#undef KEY
    if (tid == 0) num_selected[row_id] = top_k;
}
