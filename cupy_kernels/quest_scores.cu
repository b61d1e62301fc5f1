// Quest page scores on tensor cores (spec: reference.quest_page_scores) as a matrix product, so that the kernel
// is bound by the bytes it reads rather than by instruction issue (a version on the FMA units, a row of D/8 lanes
// per page, issued ~100 instructions per page and KV head and ran at 87 against 80 us with bf16 rows, 99 against
// 54 us with int8 rows at 32 x 32K: launch/results/bench_kernels_scores_h200.json).
//
// For query head g, with q- = min(q, 0) and q+ = max(q, 0), and a page's bounds min_d <= max_d:
//     u_g = sum_d max(q_gd min_d, q_gd max_d) = sum_d q-_gd min_d + q+_gd max_d,
// the dot product of the page's row of K = 2D bounds [min | max] (the table's layout) with W_g = [q-_g | q+_g].
// A warp multiplies 16 pages (MMA rows) by the G <= 8 heads (MMA columns, zero beyond G) with mma.sync
// m16n8k16: bf16/fp16 products are exact in the float32 sums, whose order alone differs from the reference.
//
// int8 rows (BOUNDS_INT8, [pages, HK, 2D + 8] uint8): min_d = lo + s a_d and max_d = lo + s b_d, so
//     u_g = lo sum_d q_gd + s (codes . W_g).
// The codes (0..255) enter the MMA as fp16, exactly (a byte permute makes 1024 + c, an fp16 subtraction takes
// 1024 off); W as fp16 from the query scaled by the power of two 2^e that puts its largest component in
// [2^13, 2^14) (exact for bf16 and fp16 queries; only components below 2^-27 of the largest lose bits), the
// sums scaled back by 2^-e.
//
// Fragments (PTX ISA, mma.m16n8k16 with 16-bit A and B; lane = 4 gid + tig): A {row gid, k 2tig, 2tig+1},
// {row gid+8, same k}, {row gid, k 2tig+8, +9}, {row gid+8, same k}; B {k 2tig, 2tig+1; column gid},
// {k 2tig+8, +9; column gid}; C {row gid; columns 2tig, 2tig+1}, {row gid+8; same columns}. The sum over k does
// not depend on which row element a logical k is, so in the step (chunk c, half j) a lane's four logical k are
// the row elements c*32 + 8 tig + 4j + {0,1 | 2,3}, in A and B alike: one 16-byte (bf16) or 8-byte (int8) load
// per row and chunk feeds two steps, and W's fragments are built once per request from the lane's query slice.
//
// Work comes from the pages present: a tile is WARPS x 16 consecutive pages of one
// request (count_tiles); each block walks a contiguous run of its KV head's tiles, loading the next tile's page
// numbers while the current tile's bounds are in flight. Rows beyond a request's pages load zeros and are not
// written; columns past a request's pages are not written.
//
// Grid: (blocks, HK); block: 256 threads (WARPS warps); dynamic shared memory: (batch + 1) ints.
// Defines: KV_BF16, HEAD_DIM (64, 128, 256), NUM_KV_HEADS, GROUP (G <= 8), PAGE_SIZE, GROUP_MEAN, BOUNDS_INT8.

#ifndef GROUP_MEAN
#define GROUP_MEAN 0
#endif
#ifndef BOUNDS_INT8
#define BOUNDS_INT8 0
#endif
#if GROUP > 8
#error "quest_scores.cu: at most 8 query heads per KV head (the MMA's 8 columns)"
#endif
#define WARPS 8
#define TILE (WARPS * 16)
#define K_ELEMS (2 * HEAD_DIM)
#define CHUNKS (K_ELEMS / 32)            // 32-element chunks of a row: 8 elements per lane of a group of 4
#define Q_CHUNKS (HEAD_DIM / 32)         // chunks of the min half (the max half reuses the same query slice)
#if BOUNDS_INT8 || !KV_BF16
#define MMA_TYPE "f16"
#else
#define MMA_TYPE "bf16"
#endif

__device__ __forceinline__ void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two packed 16-bit values split by sign, exactly: (the negative ones, zeros elsewhere) and (the others).
__device__ __forceinline__ void split_by_sign(u32 pair, u32& neg, u32& pos) {
    const u32 sign = (pair >> 15) & 0x00010001u;
    const u32 mask = sign * 0xffffu;
    neg = pair & mask;
    pos = pair & ~mask;
}

#if BOUNDS_INT8
// Codes 2i and 2i + 1 (i = 0, 1) of `word` as a packed fp16 pair, exactly.
__device__ __forceinline__ u32 codes_as_half2(u32 word, int i) {
    const u32 biased = __byte_perm(word, 0x64646464u, i == 0 ? 0x4140u : 0x4342u);   // 1024 + c, two halves
    u32 out;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(out) : "r"(biased), "r"(0x64006400u));
    return out;
}

// float -> fp16 pair (round to nearest; exact for the scaled query's components in range)
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 out;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
    return out;
}
#endif

// Tiles: a tile is Tile consecutive pages of one request. Writes tile_begin[b], the first tile
// of request b ([batch + 1] ints of shared memory), from a block-wide scan of ceil(pages / Tile) over the requests
// (0 for a request with at most skip_pages_upto pages or skip_rows[b] != 0), and returns the batch's tile count.
// Every thread of the 256-thread block calls it; it ends with a barrier.
template <int Tile, int PageSize>
__device__ __forceinline__ int count_tiles(const int* __restrict__ seq_lens, const int* __restrict__ skip_rows,
                                           int batch, int skip_pages_upto, int* tile_begin, int* warp_totals) {
    int n_tiles = 0;
    for (int base = 0; base < batch; base += 256) {
        const int b = base + threadIdx.x;
        int tiles = 0;
        if (b < batch) {
            const int n = (seq_lens[b] + PageSize - 1) / PageSize;
            const bool skip = n <= skip_pages_upto || (skip_rows != nullptr && skip_rows[b] != 0);
            tiles = skip ? 0 : (n + Tile - 1) / Tile;
        }
        int total;
        const int before = block_exclusive_sum<256 / 32>(tiles, warp_totals, &total);
        if (b < batch) tile_begin[b] = n_tiles + before;
        n_tiles += total;
    }
    __syncthreads();
    return n_tiles;
}

// The request of tile t: the last b with tile_begin[b] <= t (requests without tiles share the begin of the next
// request, so they are never the last).
__device__ __forceinline__ int tile_request(const int* tile_begin, int batch, int t) {
    int lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile_begin[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Two blocks per SM up to head_dim 128 (<= 128 registers); at 256 a lane holds twice the row, one block.
#if HEAD_DIM <= 128
#define MIN_BLOCKS 2
#else
#define MIN_BLOCKS 1
#endif

extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) quest_page_scores(
    const u16* __restrict__ q,                // [B, HK*G, D]
    const void* __restrict__ page_key_bounds, // [pages, HK, 2, D] KV dtype, or [pages, HK, 2D + 8] uint8 (BOUNDS_INT8)
    const int* __restrict__ req_to_token,     // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices, // [B]
    const int* __restrict__ seq_lens,         // [B]
    const int* __restrict__ skip_rows,        // [B] or nullptr: rows not to score where nonzero
    float* __restrict__ scores,               // [B, HK, max_pages]
    int batch, int r2t_stride, int max_pages, int skip_pages_upto,
    int early_launch)                         // nonzero: let topk_pages launch now (see early_launch_pays)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    if (early_launch) allow_next_kernel_to_launch();  // PDL: always followed by topk_pages (ours; it waits first)
    extern __shared__ int tile_begin[];       // [batch + 1]: first tile of each request
    __shared__ int warp_totals[WARPS];
    const int h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;

    const int n_tiles = count_tiles<TILE, PAGE_SIZE>(seq_lens, skip_rows, batch, skip_pages_upto, tile_begin,
                                                      warp_totals);
    const int per_block = (n_tiles + gridDim.x - 1) / gridDim.x;
    const int t_begin = blockIdx.x * per_block;
    const int t_end = min(n_tiles, t_begin + per_block);
    if (t_begin >= t_end) return;

    int b = -1, begin = 0, end = 0;           // the current tile: request b, pages [begin, end)
    const int* r2t = nullptr;
    int page[2];                              // this lane's MMA rows gid and gid + 8: physical pages, -1 for none
    auto locate = [&](int t, int& b_out, int& begin_out, int& end_out, const int*& r2t_out, int (&pg)[2]) {
        const int lo = tile_request(tile_begin, batch, t);
        if (lo != b_out) r2t_out = req_to_token + (long long)req_pool_indices[lo] * r2t_stride;
        b_out = lo;
        const int n_pages = (seq_lens[lo] + PAGE_SIZE - 1) / PAGE_SIZE;
        begin_out = (t - tile_begin[lo]) * TILE;
        end_out = min(begin_out + TILE, n_pages);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int j = begin_out + warp * 16 + gid + 8 * r;
            pg[r] = j < end_out ? r2t_out[(long long)j * PAGE_SIZE] / PAGE_SIZE : -1;
        }
    };
    locate(t_begin, b, begin, end, r2t, page);

    // W's B fragments for head gid (zero for gid >= GROUP): [chunk][half j][register]
    u32 w[CHUNKS][2][2];
#if BOUNDS_INT8
    float qsum[2] = {0.f, 0.f};               // sum_d q_gd of this lane's C columns g = 2 tig, 2 tig + 1
    float unscale[2] = {1.f, 1.f};            // 2^-e_g of those columns (each head's W has its own scale)
#endif
    int q_of = -1;                            // request whose query w holds
    for (int t = t_begin; t < t_end; ++t) {
        if (b != q_of) {
            uint4 qv[Q_CHUNKS];               // q[b, h G + gid, c*32 + 8 tig + 0..7]
#pragma unroll
            for (int c = 0; c < Q_CHUNKS; ++c) {
                qv[c] = make_uint4(0, 0, 0, 0);
                if (gid < GROUP)
                    qv[c] = *reinterpret_cast<const uint4*>(
                        q + ((long long)b * (NUM_KV_HEADS * GROUP) + h * GROUP + gid) * HEAD_DIM + c * 32 + 8 * tig);
            }
#if BOUNDS_INT8
            float qf[Q_CHUNKS][8];
            float amax = 0.f, sum = 0.f;
#pragma unroll
            for (int c = 0; c < Q_CHUNKS; ++c) {
                unpack8(qv[c], qf[c]);
#pragma unroll
                for (int i = 0; i < 8; ++i) { amax = fmaxf(amax, fabsf(qf[c][i])); sum += qf[c][i]; }
            }
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {             // over the 4 lanes of head gid
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
                sum += __shfl_xor_sync(0xffffffffu, sum, o);
            }
            int ex;
            frexpf(amax, &ex);                            // amax < 2^ex
            const int e = min(126, max(-126, 14 - ex));        // 2^e and 2^-e normal floats
            const float up = ldexpf(1.f, e);
            // head g's sum and scale sit in lanes 4g..4g+3; this lane's C columns are heads 2 tig and 2 tig + 1
            const float own_unscale = ldexpf(1.f, -e);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                qsum[i] = __shfl_sync(0xffffffffu, sum, 8 * tig + 4 * i);
                unscale[i] = __shfl_sync(0xffffffffu, own_unscale, 8 * tig + 4 * i);
            }
#pragma unroll
            for (int c = 0; c < Q_CHUNKS; ++c) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const float x0 = qf[c][4 * j + 2 * r] * up, x1 = qf[c][4 * j + 2 * r + 1] * up;
                        w[c][j][r] = pack_half2(fminf(x0, 0.f), fminf(x1, 0.f));
                        w[c + Q_CHUNKS][j][r] = pack_half2(fmaxf(x0, 0.f), fmaxf(x1, 0.f));
                    }
                }
            }
#else
#pragma unroll
            for (int c = 0; c < Q_CHUNKS; ++c) {
                const u32 words[4] = {qv[c].x, qv[c].y, qv[c].z, qv[c].w};
#pragma unroll
                for (int j = 0; j < 2; ++j) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) split_by_sign(words[2 * j + r], w[c][j][r], w[c + Q_CHUNKS][j][r]);
                }
            }
#endif
            q_of = b;
        }

        // this tile's rows: bounds in flight, then the next tile's page numbers, then the products
        const int cur_page[2] = {page[0], page[1]};
#if BOUNDS_INT8
        uint2 rows[2][CHUNKS];
        float2 lo_scale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const unsigned char* row = static_cast<const unsigned char*>(page_key_bounds)
                + ((long long)cur_page[r] * NUM_KV_HEADS + h) * (K_ELEMS + 8);
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c)
                rows[r][c] = cur_page[r] >= 0 ? *reinterpret_cast<const uint2*>(row + c * 32 + 8 * tig)
                                              : make_uint2(0, 0);
            lo_scale[r] = cur_page[r] >= 0 ? *reinterpret_cast<const float2*>(row + K_ELEMS) : make_float2(0.f, 0.f);
        }
#else
        uint4 rows[2][CHUNKS];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const u16* row = static_cast<const u16*>(page_key_bounds)
                + ((long long)cur_page[r] * NUM_KV_HEADS + h) * K_ELEMS;
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c)
                rows[r][c] = cur_page[r] >= 0 ? *reinterpret_cast<const uint4*>(row + c * 32 + 8 * tig)
                                              : make_uint4(0, 0, 0, 0);
        }
#endif
        float* out = scores + ((long long)b * NUM_KV_HEADS + h) * max_pages;
        const int cur_begin = begin, cur_end = end;
        if (t + 1 < t_end) locate(t + 1, b, begin, end, r2t, page);     // next tile's pages, loads in flight

        float part[2][4] = {};                // two accumulators (halves j): two chains of dependent MMAs
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
#if BOUNDS_INT8
            const u32 r0[2] = {rows[0][c].x, rows[0][c].y}, r1[2] = {rows[1][c].x, rows[1][c].y};
#pragma unroll
            for (int j = 0; j < 2; ++j)
                mma_16816(part[j], codes_as_half2(r0[j], 0), codes_as_half2(r1[j], 0), codes_as_half2(r0[j], 1),
                          codes_as_half2(r1[j], 1), w[c][j][0], w[c][j][1]);
#else
            mma_16816(part[0], rows[0][c].x, rows[1][c].x, rows[0][c].y, rows[1][c].y, w[c][0][0], w[c][0][1]);
            mma_16816(part[1], rows[0][c].z, rows[1][c].z, rows[0][c].w, rows[1][c].w, w[c][1][0], w[c][1][1]);
#endif
        }
        float acc[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = part[0][i] + part[1][i];

        // acc: rows gid (acc[0..1]) and gid + 8 (acc[2..3]), columns (heads) 2 tig and 2 tig + 1
        float best[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float v[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
#if BOUNDS_INT8
                v[i] = fmaf(lo_scale[r].y, acc[2 * r + i] * unscale[i], lo_scale[r].x * qsum[i]);
#else
                v[i] = acc[2 * r + i];
#endif
            }
            const bool valid0 = 2 * tig < GROUP, valid1 = 2 * tig + 1 < GROUP;
#if GROUP_MEAN
            float x = (valid0 ? v[0] : 0.f) + (valid1 ? v[1] : 0.f);
            x += __shfl_xor_sync(0xffffffffu, x, 1);
            x += __shfl_xor_sync(0xffffffffu, x, 2);
            best[r] = x / GROUP;
#else
            float x = fmaxf(valid0 ? v[0] : NEG_INF, valid1 ? v[1] : NEG_INF);
            x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
            x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
            best[r] = x;
#endif
        }
        if (tig == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int j = cur_begin + warp * 16 + gid + 8 * r;
                if (j < cur_end) out[j] = best[r];
            }
        }
    }
}
