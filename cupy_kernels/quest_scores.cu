// Quest page scores: score[b, h, j] = max_g sum_d max(q_gd * min_d, q_gd * max_d) over the G query heads of
// KV head h, for logical page j of request b (see reference.quest_page_scores).
//
// Memory bound: every (page, head) reads its 2*D bounds (512 bytes for D=128 bf16) once. A "row" of
// ROW_LANES = D/8 lanes owns one (page, head) at a time, each lane one 16-byte vector of min and one of max
// (quest_bound in common.cuh: two FMAs per channel and query head). Each row keeps UNROLL pages in flight.
//
// Work comes from the pages present, not from the capacity: a tile is TILE = ROWS * UNROLL consecutive pages
// of one request. Every block first counts the tiles of the batch (a block-wide scan of ceil(pages / TILE)
// over the requests, into shared memory), then walks a contiguous run of the tiles of its KV head, loading the
// next tile's page numbers while the current tile's bounds are in flight. The grid is fixed (about the blocks the GPU holds at once), so one captured CUDA graph keeps every
// block busy at 4K and at 128K. Requests with at most skip_pages_upto pages get no tiles (their selection keeps
// every page; top-k never reads their scores), nor are rows with skip_rows[b] != 0 (a reused selection).
// Columns past a request's pages are not written.
//
// Grid: (blocks, HK); block: 256 threads = ROWS rows; dynamic shared memory: (batch + 1) ints.
// Defines: KV_BF16, HEAD_DIM, NUM_KV_HEADS, GROUP (G), PAGE_SIZE, GROUP_MEAN (0: max over the group, 1: mean),
// BOUNDS_INT8 (1: int8 bounds rows [pages, HK, 2*D + 8] uint8, 264 instead of 512 bytes per (page, head) at
// D = 128; each lane reads 8 min codes, 8 max codes and the row's (lo, scale), see common.cuh).

#ifndef GROUP_MEAN
#define GROUP_MEAN 0
#endif
#ifndef BOUNDS_INT8
#define BOUNDS_INT8 0
#endif
#define ROW_LANES (HEAD_DIM / 8)
#define ROWS (256 / ROW_LANES)
#define UNROLL 4
#define TILE (ROWS * UNROLL)

extern "C" __global__ void __launch_bounds__(256) quest_page_scores(
    const u16* __restrict__ q,                // [B, HK*G, D]
    const void* __restrict__ page_key_bounds, // [pages, HK, 2, D] KV dtype, or [pages, HK, 2D + 8] uint8 (BOUNDS_INT8)
    const int* __restrict__ req_to_token,     // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices, // [B]
    const int* __restrict__ seq_lens,         // [B]
    const int* __restrict__ skip_rows,        // [B] or nullptr: rows not to score where nonzero
    float* __restrict__ scores,               // [B, HK, max_pages]
    int batch, int r2t_stride, int max_pages, int skip_pages_upto)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    extern __shared__ int tile_begin[];       // [batch + 1]: first tile of each request
    __shared__ int warp_totals[256 / 32];
    const int h = blockIdx.y;
    const int row = threadIdx.x / ROW_LANES;
    const int lane_in_row = threadIdx.x % ROW_LANES;
    const int d0 = lane_in_row * 8;

    const int n_tiles = count_tiles<TILE, PAGE_SIZE>(seq_lens, skip_rows, batch, skip_pages_upto, tile_begin,
                                                      warp_totals);

    // This block's tiles: a contiguous run, so consecutive tiles mostly belong to one request (its query and
    // req_to_token row are loaded once) and the next tile's page numbers are loaded while this tile's bounds
    // are in flight (the req_to_token -> bounds chain of dependent loads is paid once, not once per tile).
    const int per_block = (n_tiles + gridDim.x - 1) / gridDim.x;
    const int t_begin = blockIdx.x * per_block;
    const int t_end = min(n_tiles, t_begin + per_block);
    if (t_begin >= t_end) return;

    int b = -1, begin = 0, end = 0;           // the current tile: request b, pages [begin, end)
    const int* r2t = nullptr;
    int page[UNROLL];
    // Locate tile t and load its page numbers into pg (b_out, begin_out, end_out, r2t_out describe it).
    auto locate = [&](int t, int& b_out, int& begin_out, int& end_out, const int*& r2t_out, int* pg) {
        const int lo = tile_request(tile_begin, batch, t);
        if (lo != b_out) r2t_out = req_to_token + (long long)req_pool_indices[lo] * r2t_stride;
        b_out = lo;
        const int n_pages = (seq_lens[lo] + PAGE_SIZE - 1) / PAGE_SIZE;
        begin_out = (t - tile_begin[lo]) * TILE;
        end_out = min(begin_out + TILE, n_pages);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int j = begin_out + u * ROWS + row;
            pg[u] = j < end_out ? r2t_out[(long long)j * PAGE_SIZE] / PAGE_SIZE : -1;
        }
    };
    locate(t_begin, b, begin, end, r2t, page);

    int q_of = -1;                             // request whose query is in qh
    float qh[GROUP][8];                        // half of this lane's 8 query channels, per query head
    for (int t = t_begin; t < t_end; ++t) {
        if (b != q_of) {
            load_half_query<GROUP, NUM_KV_HEADS, HEAD_DIM>(q, b, h, d0, qh);
            q_of = b;
        }
#if BOUNDS_INT8
        Int8Bounds bnd[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            load_page_bounds_int8<NUM_KV_HEADS, HEAD_DIM>(static_cast<const unsigned char*>(page_key_bounds),
                                                          page[u], h, d0, bnd[u]);
#else
        uint4 vmin[UNROLL], vmax[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            load_page_bounds<NUM_KV_HEADS, HEAD_DIM>(static_cast<const u16*>(page_key_bounds), page[u], h, d0,
                                                     vmin[u], vmax[u]);
#endif
        float* out = scores + ((long long)b * NUM_KV_HEADS + h) * max_pages;
        const int cur_begin = begin, cur_end = end;
        if (t + 1 < t_end) locate(t + 1, b, begin, end, r2t, page);     // next tile's pages, loads in flight
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#if BOUNDS_INT8
            const float best = quest_bound_int8<GROUP, ROW_LANES, GROUP_MEAN>(qh, bnd[u]);
#else
            const float best = quest_bound<GROUP, ROW_LANES, GROUP_MEAN>(qh, vmin[u], vmax[u]);
#endif
            const int j = cur_begin + u * ROWS + row;
            if (lane_in_row == 0 && j < cur_end) out[j] = best;
        }
    }
}
