// Quest refinement: the scores of the pages inside the coarse pages a request kept (coarse-to-fine scoring).
// score[b, h, c * R + s] = max_g sum_d max(q_gd * min_d, q_gd * max_d) for every kept coarse page c of (b, h)
// and its R pages s (see reference.quest_refine_scores); the request's other pages get -inf (top-k ranks them
// last). Columns past the request's pages, and the rows of requests not scored, are not written: top-k reads
// neither, so the work is the pages present, whatever the capacity (max_pages).
//
// One block per (request, KV head): its kept coarse pages give it count * R pages, at most a few hundred. A "row"
// of ROW_LANES = D/8 lanes owns one page at a time on the FMA units (one 16-byte vector of min and one of max per
// lane: at a few hundred pages per block, latency rather than instruction issue bounds it), UNROLL pages in flight
// per row. Requests with at most skip_pages_upto pages, and rows with
// skip_rows[b] != 0 (a reused selection), are not scored.
//
// Grid: (B, HK); block: 256 threads. Defines: KV_BF16, HEAD_DIM, NUM_KV_HEADS, GROUP (G), PAGE_SIZE, RATIO (R),
// GROUP_MEAN (as quest_page_scores).

#ifndef GROUP_MEAN
#define GROUP_MEAN 0
#endif
#define ROW_LANES (HEAD_DIM / 8)
#define ROWS (256 / ROW_LANES)
#define UNROLL 4

extern "C" __global__ void __launch_bounds__(256) quest_refine_scores(
    const u16* __restrict__ q,                // [B, HK*G, D]
    const u16* __restrict__ page_key_bounds,  // [pages, HK, 2, D]
    const int* __restrict__ req_to_token,     // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices, // [B]
    const int* __restrict__ seq_lens,         // [B]
    const int* __restrict__ coarse_pages,     // [B, HK, coarse_width]: kept coarse pages, ascending
    const int* __restrict__ coarse_count,     // [B, HK]
    const int* __restrict__ skip_rows,        // [B] or nullptr: rows not to score where nonzero
    float* __restrict__ scores,               // [B, HK, max_pages]
    int r2t_stride, int coarse_width, int max_pages, int skip_pages_upto,
    int early_launch)                         // nonzero: let topk_pages launch now (see early_launch_pays)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    if (early_launch) allow_next_kernel_to_launch();  // PDL: always followed by topk_pages (ours; it waits first)
    const int b = blockIdx.x, h = blockIdx.y;
    const int n = (seq_lens[b] + PAGE_SIZE - 1) / PAGE_SIZE;
    if (n <= skip_pages_upto || (skip_rows != nullptr && skip_rows[b] != 0)) return;
    const int row = threadIdx.x / ROW_LANES;
    const int lane_in_row = threadIdx.x % ROW_LANES;
    const int d0 = lane_in_row * 8;
    const int* r2t = req_to_token + (long long)req_pool_indices[b] * r2t_stride;
    const int* kept = coarse_pages + ((long long)b * NUM_KV_HEADS + h) * coarse_width;
    const int candidates = min(coarse_count[b * NUM_KV_HEADS + h], coarse_width) * RATIO;
    float* out = scores + ((long long)b * NUM_KV_HEADS + h) * max_pages;

    for (int j = threadIdx.x; j < min(n, max_pages); j += blockDim.x) out[j] = NEG_INF;
    __syncthreads();                           // the scores below overwrite some of these

    float qh[GROUP][8];                        // half of this lane's 8 query channels, per query head
    load_half_query<GROUP, NUM_KV_HEADS, HEAD_DIM>(q, b, h, d0, qh);

    // Every row runs the same number of iterations (the shuffles below need the whole warp).
    for (int base = 0; base < candidates; base += ROWS * UNROLL) {
        int page[UNROLL], j[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int i = base + u * ROWS + row;
            j[u] = i < candidates ? kept[i / RATIO] * RATIO + i % RATIO : n;
            page[u] = j[u] >= 0 && j[u] < n ? r2t[(long long)j[u] * PAGE_SIZE] / PAGE_SIZE : -1;
        }
        uint4 vmin[UNROLL], vmax[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            load_page_bounds<NUM_KV_HEADS, HEAD_DIM>(page_key_bounds, page[u], h, d0, vmin[u], vmax[u]);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const float best = quest_bound<GROUP, ROW_LANES, GROUP_MEAN>(qh, vmin[u], vmax[u]);
            if (lane_in_row == 0 && page[u] >= 0 && j[u] < max_pages) out[j[u]] = best;
        }
    }
}
