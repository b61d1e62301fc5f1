// BENCHMARK BASELINE ONLY: the previous topk_pages kernel (4-pass radix select over global memory), kept so that
// launch/bench_kernels.py can time it against topk_pages.cu on the same inputs in one process (case
// topk_pages_radix4) and the GPU tests can check both agree. The product uses topk_pages.cu; do not call this one.
//
// Top-k page selection per (request, KV head), sinks and local window forced in (see reference.topk_pages).
//
// One block per (b, h). Scores become order-preserving 32-bit keys (forced pages get the largest key); a
// 4-pass radix select (8 bits a pass, shared-memory histogram, warp-shuffle suffix sums) finds the k-th largest key T and how many
// keys equal to T are needed; a final ordered compaction (ballot scans over tiles of the block) writes every
// page with key > T and the first needed pages with key == T, in ascending page order. Reads of the score
// row hit L2 after the first pass; no sort, no dynamic shared memory, any page count.
//
// Request b selects k = row_top_k[b] pages (its own budget; top_k when row_top_k is nullptr) and keeps all its
// pages when it has at most max(k, select_all_upto).
//
// Selection reuse (kept != nullptr): a row with reuse_from[b] > 0 is not selected again: it copies the k
// pages kept for its request slot (kept[req_pool_indices[b], h]) and appends every page after both the planned
// selection's last page (ceil(reuse_from / P)) and the last kept page (a layer that selected again since, on
// the drift test, kept later pages) up to the request's last page. Rows that select write their selection into
// the slot's kept row too.
// Defines: PAGE_SIZE.

#define THREADS 512
#define WARPS (THREADS / 32)

__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(THREADS) topk_pages_radix4(
    const float* __restrict__ page_scores,  // [B, HK, max_pages]
    const int* __restrict__ seq_lens,       // [B]
    int* __restrict__ selected_pages,       // [B, HK, width]
    int* __restrict__ num_selected,         // [B, HK]
    const int* __restrict__ req_pool_indices, // [B] (reuse only)
    const int* __restrict__ reuse_from,     // [B]: seq_len at the kept selection, 0 = select (reuse only)
    int* __restrict__ kept,                 // [max_reqs, HK, top_k] or nullptr (no reuse): first k valid
    const int* __restrict__ row_top_k,      // [B] pages each request selects, or nullptr: top_k for all
    int num_kv_heads, int max_pages, int top_k, int n_sink, int n_local, int select_all_upto, int width)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ int hist[256];
    __shared__ int bin_warp_totals[8];
    __shared__ int warp_totals[WARPS];
    __shared__ u32 s_prefix;
    __shared__ int s_remaining;

    const int b = blockIdx.y, h = blockIdx.x;
    const int row_id = b * num_kv_heads + h;
    const float* scores = page_scores + (long long)row_id * max_pages;
    int* out = selected_pages + (long long)row_id * width;
    const int n = (seq_lens[b] + PAGE_SIZE - 1) / PAGE_SIZE;
    const int tid = threadIdx.x;
    const int k_b = row_top_k != nullptr ? row_top_k[b] : top_k;

    if (n <= max(k_b, select_all_upto)) {     // short request: every page (dense fallback)
        for (int j = tid; j < n; j += THREADS) out[j] = j;
        if (tid == 0) num_selected[row_id] = n;
        return;
    }
    int* keep = nullptr;
    if (kept != nullptr) {
        keep = kept + ((long long)req_pool_indices[b] * num_kv_heads + h) * top_k;
        const int from = reuse_from[b];
        if (from > 0) {   // reuse: the kept pages, then every page written since
            const int first_new = max((from + PAGE_SIZE - 1) / PAGE_SIZE, keep[k_b - 1] + 1);
            for (int j = tid; j < k_b; j += THREADS) out[j] = keep[j];
            for (int j = first_new + tid; j < n; j += THREADS) out[k_b + j - first_new] = j;
            if (tid == 0) num_selected[row_id] = k_b + n - first_new;
            return;
        }
    }
    const int local_begin = n - n_local;
#define KEY(j) (((j) < n_sink || (j) >= local_begin) ? 0xffffffffu : order_key(scores[j]))

    if (tid == 0) { s_prefix = 0u; s_remaining = k_b; }
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
        // Suffix sums: hist[d] <- number of matching keys with digit >= d. Warps 0..7 own 32 bins each: a shuffle
        // scan within the warp, then the totals of the warps above (3 barriers; a block-wide doubling scan took 16).
        int v = 0;
        if (tid < 256) {
            const int lane = tid & 31, warp = tid >> 5;
            v = hist[tid];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int t = __shfl_down_sync(0xffffffffu, v, o);
                if (lane + o < 32) v += t;
            }
            if (lane == 0) bin_warp_totals[warp] = v;
        }
        __syncthreads();
        if (tid < 256) {
            int above = 0;
#pragma unroll
            for (int w = 0; w < 8; ++w) above += (w > (tid >> 5)) ? bin_warp_totals[w] : 0;
            hist[tid] = v + above;
        }
        __syncthreads();
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
        const int eq_rank = eq_seen + block_exclusive_scan<WARPS>(eq, warp_totals, &eq_total);
        const bool take = gt || (eq && eq_rank < need_eq);
        int take_total;
        const int pos = written + block_exclusive_scan<WARPS>(take, warp_totals, &take_total);
        if (take) {
            out[pos] = j;
            if (keep != nullptr) keep[pos] = j;
        }
        eq_seen += eq_total;
        written += take_total;
    }
#undef KEY
    if (tid == 0) num_selected[row_id] = k_b;
}
