// Top-k page selection per (request, KV head), sinks and local window forced in (see reference.topk_pages).
//
// One block of 512 threads per (b, h). Scores become order-preserving 32-bit keys (forced pages get the largest
// key, MAX_KEY); a radix select finds the k-th largest key T and how many keys equal to T are needed; an ordered
// compaction writes every page with a key > T and the first needed pages with key == T, in ascending page order.
// Request b selects k = row_top_k[b] pages (top_k when row_top_k is nullptr) and keeps all its pages when it has at
// most max(k, select_all_upto).
//
// Why this shape. The previous kernel (topk_pages_radix4.cu, now only the benchmark baseline) took 25 us at 2048
// pages a row and 40-50 us at 8192 on an H200, bound by latency: 4 radix passes, each a loop re-reading every score
// from L2 with 4 barriers, then a compaction of two block scans (4 barriers) per 512-page tile. Per thread: at 2048
// pages 20 score loads and 32 barriers, at 8192 pages 80 loads and 80 barriers. This kernel:
//  1. Keys in registers. Each thread loads its KEYS_PER_THREAD keys once, all loads independent (in flight
//     together). Key i of thread t is page i*512 + t (tile i): every load is coalesced whatever max_pages' alignment
//     (contiguous runs per thread would need aligned vector loads or a transpose through shared memory). Tiles past
//     the row's n are skipped by block-uniform branches. The wrapper picks KEYS_PER_THREAD from max_pages (the
//     smallest power of two holding a row, at most 16 = 8192 pages = 128K tokens at page 16); a longer row runs the
//     same code over chunks of KEYS_PER_THREAD * 512 pages, reloading each chunk (from L2) in every pass.
//  2. Fewer passes, one barrier each. First a block reduction of the min and max key of the free (not forced)
//     pages: they share every bit above the highest bit hb where min and max differ, so the radix starts at hb
//     (8-bit digits, the last one clamped at bit 0) instead of bit 31. Forced pages take no part: with F = n_sink +
//     n_local forced pages (all MAX_KEY) and r = k - F, T is MAX_KEY when r <= 0, else the r-th largest free key;
//     the keys == T needed are the r' the select leaves, plus F when T is MAX_KEY itself (forced pages then compare
//     equal to T, as in the old kernel; only the NaN 0x7fffffff has that key). Early stop: when the chosen digit's
//     bin holds exactly the keys still needed (ge == r), every key of the bin is taken and every free key not
//     taken is below the bin, so the answer is every key >= prefix (the prefix's bits below the digit are zero):
//     k keys. The old kernel returns the same set (its T is the bin's least key: every key above T is in the set
//     and it takes all keys equal to T), so the compaction takes every key > prefix and every key == prefix
//     (need_eq = n). The histogram is triple buffered and every warp scans all 256 bins itself (8 bins a lane, a
//     warp suffix scan), so a pass has one barrier (after its atomics) and clears the buffer it uses next-but-one.
//     Passes (a Python model of this select on random rows, k 128-512 of 2048-8192 pages): scores spread over one
//     to three exponents (Quest's) take 2, randn 2-3, heavy ties 4 (never more: ceil((hb + 1) / 8)); rows mostly
//     -inf (coarse-to-fine) start at bit 31.
//  3. One scan for the compaction. A taken page j goes to (keys > T before j) + min(keys == T before j, need_eq).
//     Both counts travel packed in one int (greater << 16 | equal; at most 8192 each in a chunk): lane 0 of each
//     warp writes the packed ballot counts of tile i to a [tile][warp] table; after one barrier every warp scans the
//     table itself (lane i sums tile i's row, all of it and the warps before its own; then a warp scan over tiles)
//     and each thread gets its offset for tile i by a shuffle. A warp's taken pages of a tile land in consecutive
//     slots, so the writes stay coalesced.
// Per thread now: 4 (2048 pages) or 16 (8192 pages) loads in one round, and 2 + passes barriers (4-6), whatever n.
// __launch_bounds__(512, MIN_BLOCKS): 2 blocks an SM (64 registers) at KEYS_PER_THREAD 8-16, where ptxas otherwise
// stops at 64 with a spill; 3 (40 registers, no spill on sm_90) at 1-4. 2 blocks an SM hold 264 rows on an H200
// (batch 32 x 8 KV heads = 256), 3 hold 396.
//
// FlashInfer rows (indptr != nullptr): the row's selection is also written as FlashInfer's per-head paged row
// (what page_rows.cu writes from selected_pages; spec: reference.page_rows of reference.topk_pages), saving that
// launch. Its offset, the pages of the rows before it, comes from their inputs alone (every page of a request
// within its budget, k for a selecting row, k + the pages written since for a reusing row, whose kept row no block
// writes in this launch: rows that select or reuse have distinct request slots; the operator's padding rows, which
// share slot 0, are within their budget), so no block waits for another.
//
// Selection reuse (kept != nullptr): a row with reuse_from[b] > 0 is not selected again: it copies the k
// pages kept for its request slot (kept[req_pool_indices[b], h]) and appends every page after both the planned
// selection's last page (ceil(reuse_from / P)) and the last kept page (a layer that selected again since, on
// the drift test, kept later pages) up to the request's last page. Rows that select write their selection into
// the slot's kept row too.
// Defines: PAGE_SIZE, KEYS_PER_THREAD (1..32; the pages of a row held in registers: KEYS_PER_THREAD * 512).

#define THREADS 512
#define WARPS (THREADS / 32)
#ifndef KEYS_PER_THREAD
#define KEYS_PER_THREAD 16
#endif
#define CHUNK (KEYS_PER_THREAD * THREADS)   // pages of a row held in registers at once
#define BINS 256                            // 8-bit digits
#define MAX_KEY 0xffffffffu
#define FULL_WARP 0xffffffffu
#define MIN_BLOCKS (KEYS_PER_THREAD <= 4 ? 3 : 2)   // blocks an SM must hold (register budget: 40 or 64)

static_assert(KEYS_PER_THREAD >= 1 && KEYS_PER_THREAD <= 32, "KEYS_PER_THREAD must be in 1..32");
static_assert(CHUNK <= 65535, "packed counts (greater << 16 | equal) need at most 65535 pages a chunk");
static_assert(WARPS % 4 == 0 && BINS == 8 * 32, "the table and histogram scans read int4 rows");

__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ u32 warp_min_u32(u32 x) {
#if __CUDA_ARCH__ >= 800
    return __reduce_min_sync(FULL_WARP, x);
#else
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(FULL_WARP, x, o));
    return x;
#endif
}

__device__ __forceinline__ u32 warp_max_u32(u32 x) {
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(FULL_WARP, x);
#else
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(FULL_WARP, x, o));
    return x;
#endif
}

// The keys of pages base + i * THREADS + tid (tile i) of one row into key[i]: forced pages (sinks, local window)
// MAX_KEY, pages past n 0. Returns the free-page bits (bit i: page of tile i is scored and not forced). The loads
// of all tiles are independent, so they are in flight together.
__device__ __forceinline__ u32 load_chunk(const float* __restrict__ scores, int base, int n, int n_sink,
                                          int local_begin, u32 (&key)[KEYS_PER_THREAD]) {
    float s[KEYS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
        const int j = base + i * THREADS + (int)threadIdx.x;
        s[i] = (j >= n_sink && j < local_begin) ? scores[j] : 0.f;
    }
    u32 free_bits = 0u;
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
        const int j = base + i * THREADS + (int)threadIdx.x;
        const bool is_free = j >= n_sink && j < local_begin;
        key[i] = is_free ? order_key(s[i]) : (j < n ? MAX_KEY : 0u);
        free_bits |= (u32)is_free << i;
    }
    return free_bits;
}

// The keys of one row, a chunk of CHUNK pages at a time in registers (the whole row when it is resident).
struct RowKeys {
    const float* __restrict__ scores;
    int n, n_sink, local_begin;
    bool resident;                 // n <= CHUNK: the keys stay in key[] for every pass
    u32 key[KEYS_PER_THREAD];
    u32 free_bits;

    __device__ __forceinline__ void load(int base) {
        free_bits = load_chunk(scores, base, n, n_sink, local_begin, key);
    }

    // body(base, tiles) once per chunk, its keys in key[] / free_bits; tiles: the chunk's tiles that hold pages
    // (block-uniform). (A template, not a generic lambda: NVRTC compiles only non-generic lambdas as device code.)
    template <class Body>
    __device__ __forceinline__ void for_each_chunk(Body&& body) {
        if (resident) {
            body(0, (n + THREADS - 1) / THREADS);
            return;
        }
        for (int base = 0; base < n; base += CHUNK) {
            load(base);
            body(base, min(KEYS_PER_THREAD, (n - base + THREADS - 1) / THREADS));
        }
    }
};

// A reusing row's first page after its kept selection: past both the planned selection's last page (written
// before reuse_from tokens) and the last kept page (a layer that selected again since may have kept later ones).
__device__ __forceinline__ int first_new_page(int reuse_from, int last_kept) {
    return max((reuse_from + PAGE_SIZE - 1) / PAGE_SIZE, last_kept + 1);
}

// Every warp, redundantly, on a histogram h of BINS bins of the candidate keys (every warp reads the same h after a
// barrier): the digit d whose bin holds the r-th largest candidate (1 <= r <= candidates). *gt: candidates in the
// bins above d (< r); *ge: *gt + h[d] (>= r). Lane l owns bins 8l..8l+7.
__device__ __forceinline__ int select_digit(const int* h, int r, int* gt, int* ge) {
    const int lane = threadIdx.x & 31;
    const int4 a = reinterpret_cast<const int4*>(h)[2 * lane];
    const int4 b = reinterpret_cast<const int4*>(h)[2 * lane + 1];
    const int c[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    const int s = c[0] + c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7];
    int suf = s;                                   // candidates in bins >= 8 * lane
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_down_sync(FULL_WARP, suf, o);
        if (lane + o < 32) suf += t;
    }
    const int lane_d = __ffs(__ballot_sync(FULL_WARP, suf >= r && suf - s < r)) - 1;   // exactly one lane
    int g = suf - s, q_d = 0, g_d = 0;             // walk this lane's bins from the top
#pragma unroll
    for (int q = 7; q >= 0; --q) {
        const int g2 = g + c[q];
        if (g < r && g2 >= r) { q_d = q; g_d = g; }
        g = g2;
    }
    const int d = 8 * lane_d + __shfl_sync(FULL_WARP, q_d, lane_d);
    *gt = __shfl_sync(FULL_WARP, g_d, lane_d);
    *ge = *gt + h[d];
    return d;
}

// After a barrier (out[] holds this row's count pages), this block's row of FlashInfer's per-head paged rows. Its
// offset sums the pages of the rows before it from their inputs: every page of a request within its budget, k for
// a selecting row, k + the pages written since for a reusing row.
__device__ __forceinline__ void flashinfer_row(
    const int* out, int count, const int* __restrict__ seq_lens, const int* __restrict__ req_pool_indices,
    const int* __restrict__ reuse_from, const int* __restrict__ kept, const int* __restrict__ row_top_k,
    const int* __restrict__ req_to_token, int* __restrict__ indptr, int* __restrict__ page_indices,
    int* __restrict__ last_page_len, int* __restrict__ num_tokens, int num_kv_heads, int top_k, int select_all_upto,
    int r2t_stride, int* red)
{
    const int b = blockIdx.y, h = blockIdx.x, row_id = b * num_kv_heads + h;
    auto row_pages = [&](int i) {
        const int bi = i / num_kv_heads, hi = i - bi * num_kv_heads;
        const int ni = (seq_lens[bi] + PAGE_SIZE - 1) / PAGE_SIZE;
        const int ki = row_top_k != nullptr ? row_top_k[bi] : top_k;
        if (ni <= max(ki, select_all_upto)) return ni;
        if (kept != nullptr && reuse_from[bi] > 0)
            return ki + ni - first_new_page(
                reuse_from[bi], kept[((long long)req_pool_indices[bi] * num_kv_heads + hi) * top_k + ki - 1]);
        return ki;
    };
    __syncthreads();
    const int offset = block_sum_before_of<WARPS>(row_pages, row_id, red);
    write_page_row<PAGE_SIZE>(out, count, req_to_token + (long long)req_pool_indices[b] * r2t_stride, seq_lens[b], h,
                              num_kv_heads, row_id, gridDim.x * gridDim.y, offset, indptr, page_indices, last_page_len,
                              num_tokens);
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) topk_pages(
    const float* __restrict__ page_scores,  // [B, HK, max_pages]
    const int* __restrict__ seq_lens,       // [B]
    int* __restrict__ selected_pages,       // [B, HK, width]
    int* __restrict__ num_selected,         // [B, HK]
    const int* __restrict__ req_pool_indices, // [B] (reuse only)
    const int* __restrict__ reuse_from,     // [B]: seq_len at the kept selection, 0 = select (reuse only)
    int* __restrict__ kept,                 // [max_reqs, HK, top_k] or nullptr (no reuse): first k valid
    const int* __restrict__ row_top_k,      // [B] pages each request selects, or nullptr: top_k for all
    int num_kv_heads, int max_pages, int top_k, int n_sink, int n_local, int select_all_upto, int width,
    const int* __restrict__ req_to_token,   // [max_reqs, r2t_stride] (FlashInfer rows only)
    int* __restrict__ indptr,               // [B * HK + 1] FlashInfer rows, or nullptr (then none of the four)
    int* __restrict__ page_indices,         // [>= pages selected]
    int* __restrict__ last_page_len,        // [B * HK]
    int* __restrict__ num_tokens,           // [B * HK]
    int r2t_stride)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ __align__(16) int hist[3][BINS];                          // triple-buffered histogram
    __shared__ __align__(16) int tile_counts[KEYS_PER_THREAD * WARPS];   // packed counts per [tile][warp]
    __shared__ u32 warp_lo[WARPS], warp_hi[WARPS];
    __shared__ int row_red[WARPS];

    const int b = blockIdx.y, h = blockIdx.x;
    const int row_id = b * num_kv_heads + h;
    const float* scores = page_scores + (long long)row_id * max_pages;
    int* out = selected_pages + (long long)row_id * width;
    const int n = (seq_lens[b] + PAGE_SIZE - 1) / PAGE_SIZE;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int k_b = row_top_k != nullptr ? row_top_k[b] : top_k;

    // This row's kept selection (reuse): [top_k] of its request slot.
    auto kept_row = [&]() { return kept + ((long long)req_pool_indices[b] * num_kv_heads + h) * top_k; };
    int count;                               // pages this row attends
    if (n <= max(k_b, select_all_upto)) {    // short request: every page (dense fallback)
        for (int j = tid; j < n; j += THREADS) out[j] = j;
        count = n;
    } else if (kept != nullptr && reuse_from[b] > 0) {   // reuse: the kept pages, then every page written since
        const int* keep = kept_row();
        const int first_new = first_new_page(reuse_from[b], keep[k_b - 1]);
        for (int j = tid; j < k_b; j += THREADS) out[j] = keep[j];
        for (int j = first_new + tid; j < n; j += THREADS) out[k_b + j - first_new] = j;
        count = k_b + n - first_new;
    } else {                                 // select, into out[] and (reuse) this slot's kept row
        int* keep = kept != nullptr ? kept_row() : nullptr;
        count = k_b;
        RowKeys keys;
        keys.scores = scores;
        keys.n = n;
        keys.n_sink = n_sink;
        keys.local_begin = n - n_local;
        keys.resident = n <= CHUNK;             // block-uniform
        if (keys.resident) keys.load(0);        // a resident row's keys are loaded once, here

        // Taken: every key > prefix, and the first need_eq keys == prefix (in page order).
        u32 prefix = MAX_KEY;
        int need_eq = k_b;                       // r <= 0: the k-th largest key is MAX_KEY (forced pages)
        const int n_forced = n_sink + n_local;
        int r = k_b - n_forced;                  // free pages to take (n > k: at least r + 1 free pages)
        if (r > 0) {
            u32 lo = MAX_KEY, hi = 0u;
            keys.for_each_chunk([&](int, int tiles) {
#pragma unroll
                for (int i = 0; i < KEYS_PER_THREAD; ++i) {
                    if (i < tiles && ((keys.free_bits >> i) & 1u)) {
                        lo = min(lo, keys.key[i]);
                        hi = max(hi, keys.key[i]);
                    }
                }
            });
            lo = warp_min_u32(lo);
            hi = warp_max_u32(hi);
            if (lane == 0) { warp_lo[warp] = lo; warp_hi[warp] = hi; }
            for (int i = tid; i < BINS; i += THREADS) hist[0][i] = 0;
            __syncthreads();
#pragma unroll
            for (int w = 0; w < WARPS; ++w) { lo = min(lo, warp_lo[w]); hi = max(hi, warp_hi[w]); }
            prefix = lo;
            bool all_taken = false;
            if (lo != hi) {
                const int hb = 31 - __clz(lo ^ hi);          // free keys share every bit above hb
                u32 cmask = hb == 31 ? 0u : MAX_KEY << (hb + 1);   // candidates: (key & cmask) == prefix
                prefix = lo & cmask;
                int buf = 0;
                for (int top = hb; top >= 0;) {
                    const int shift = max(top - 7, 0);        // digit: bits shift..shift+7 (above top: the prefix's)
                    int* hcur = hist[buf];
                    const int next = buf == 2 ? 0 : buf + 1;
                    for (int i = tid; i < BINS; i += THREADS) hist[next][i] = 0;   // read two passes ago: free
                    const u32 m = cmask, p = prefix;
                    keys.for_each_chunk([&](int, int tiles) {
#pragma unroll
                        for (int i = 0; i < KEYS_PER_THREAD; ++i) {
                            if (i < tiles && ((keys.free_bits >> i) & 1u) && (keys.key[i] & m) == p)
                                atomicAdd(&hcur[(keys.key[i] >> shift) & (BINS - 1)], 1);
                        }
                    });
                    __syncthreads();
                    int gt, ge;
                    const int d = select_digit(hcur, r, &gt, &ge);
                    prefix |= (u32)d << shift;
                    cmask = MAX_KEY << shift;
                    all_taken = ge == r;                      // the bin holds exactly the keys still needed
                    r -= gt;
                    if (all_taken) break;
                    top = shift - 1;
                    buf = next;
                }
            }
            need_eq = all_taken ? n : r + (prefix == MAX_KEY ? n_forced : 0);
        }

        // Ordered compaction, one chunk at a time.
        const u32 lanes_below = (1u << lane) - 1u;
        int gt_seen = 0, eq_seen = 0;            // over the chunks before
        keys.for_each_chunk([&](int base, int tiles) {
#pragma unroll
            for (int i = 0; i < KEYS_PER_THREAD; ++i) {
                if (i < tiles) {
                    const bool page = base + i * THREADS + tid < n;
                    const u32 gt = __ballot_sync(FULL_WARP, page && keys.key[i] > prefix);
                    const u32 eq = __ballot_sync(FULL_WARP, page && keys.key[i] == prefix);
                    if (lane == 0) tile_counts[i * WARPS + warp] = (__popc(gt) << 16) | __popc(eq);
                }
            }
            __syncthreads();
            // Every warp scans the table: lane i < tiles sums tile i over all warps and over the warps before its own.
            int row_sum = 0, before_warp = 0;
            if (lane < tiles) {
                const int4* row = reinterpret_cast<const int4*>(tile_counts + lane * WARPS);
#pragma unroll
                for (int q = 0; q < WARPS / 4; ++q) {
                    const int4 v = row[q];
                    row_sum += v.x + v.y + v.z + v.w;
                    before_warp += (4 * q < warp ? v.x : 0) + (4 * q + 1 < warp ? v.y : 0) +
                                   (4 * q + 2 < warp ? v.z : 0) + (4 * q + 3 < warp ? v.w : 0);
                }
            }
            int incl = row_sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int t = __shfl_up_sync(FULL_WARP, incl, o);
                if (lane >= o) incl += t;
            }
            const int offset = incl - row_sum + before_warp;   // packed counts before (tile lane, this warp)
            const int chunk_total = __shfl_sync(FULL_WARP, incl, 31);
#pragma unroll
            for (int i = 0; i < KEYS_PER_THREAD; ++i) {
                if (i < tiles) {
                    const int j = base + i * THREADS + tid;
                    const bool is_gt = j < n && keys.key[i] > prefix, is_eq = j < n && keys.key[i] == prefix;
                    const u32 gt = __ballot_sync(FULL_WARP, is_gt);
                    const u32 eq = __ballot_sync(FULL_WARP, is_eq);
                    const int off = __shfl_sync(FULL_WARP, offset, i);
                    const int gt_before = gt_seen + (off >> 16) + __popc(gt & lanes_below);
                    const int eq_before = eq_seen + (off & 0xffff) + __popc(eq & lanes_below);
                    if (is_gt || (is_eq && eq_before < need_eq)) {
                        const int pos = gt_before + min(eq_before, need_eq);
                        out[pos] = j;
                        if (keep != nullptr) keep[pos] = j;
                    }
                }
            }
            gt_seen += chunk_total >> 16;
            eq_seen += chunk_total & 0xffff;
            if (!keys.resident) __syncthreads();      // tile_counts is rewritten by the next chunk
        });
    }
    if (tid == 0) num_selected[row_id] = count;
    // One exit, so that the row writer is inlined once (inlined at each of three exits, or called, it spilled).
    if (indptr != nullptr)
        flashinfer_row(out, count, seq_lens, req_pool_indices, reuse_from, kept, row_top_k, req_to_token, indptr,
                       page_indices, last_page_len, num_tokens, num_kv_heads, top_k, select_all_upto, r2t_stride,
                       row_red);
}
