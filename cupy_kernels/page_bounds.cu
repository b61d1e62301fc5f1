// Page metadata update (Quest): per physical page and KV head, the channel-wise min and max of K.
//
// One block per entry of written_slots; only the *last* entry of each run of entries on the same page (the
// page's "leader") works: it recomputes the page's bounds over offsets 0..o, o being its own offset. Pages
// are filled from offset 0 by one request and a run ends at the largest offset written, so this equals the
// reference's "min/max over offsets 0..max written offset": a write at offset 0 resets the page, and prefill
// touches every token once (one pass over K).
//
// Layout: k_cache [slots, HK*D] (row of one token), page_key_bounds [pages, HK, 2, D]. Thread c owns 16-byte
// vector c of the row (elements c*8..c*8+7: head (c*8)/D, channels (c*8)%D on) and loads it for all the
// page's tokens at once (PAGE_SIZE independent loads in flight), so a decode step costs one memory round trip.
//
// page_bounds_update_layers does the same for many layers in one launch (grid.y = layer), from tables of the
// layers' K pools and bounds: a decode step refreshes every layer's bounds once, after its last layer.
//
// BOUNDS_INT8=1: the table is int8 rows [pages, HK, 2*D + 8] uint8 (see common.cuh and
// reference.quantize_bounds_int8): the exact min/max over offsets 0..o are computed as above, then lo / hi (the
// page-head's smallest min / largest max) by shuffles over the D/8 lanes of the head, the scale and the tightest
// outward codes per lane (8 min codes and 8 max codes: two 8-byte stores; the head's first lane stores
// (lo, scale)). Recomputed from the keys at every update, so no widening accumulates over a page's writes.
//
// Defines: KV_BF16, HEAD_DIM (D), NUM_KV_HEADS (HK), PAGE_SIZE (P), BOUNDS_INT8.

#ifndef BOUNDS_INT8
#define BOUNDS_INT8 0
#endif
#define ROW (NUM_KV_HEADS * HEAD_DIM)     // elements of one token row
#define ROW_VECS (ROW / 8)                // 16-byte vectors per row
#define HEAD_VECS (HEAD_DIM / 8)          // 16-byte vectors (lanes) per head
#define CHUNK 8                           // tokens loaded together

#if BOUNDS_INT8
typedef unsigned char bounds_t;
#define INT8_ROW (2 * HEAD_DIM + 8)       // bytes of one (page, head) row

// fl((hi - lo) / 255), raised ulp by ulp until the level of code 255 reaches hi (0 when lo == hi).
__device__ __forceinline__ float int8_scale(float lo, float hi) {
    float s = __fdiv_rn(__fsub_rn(hi, lo), 255.f);
    while (int8_level(255.f, lo, s) < hi) s = __int_as_float(__float_as_int(s) + 1);
    return s;
}

// The largest code whose level is <= v (a min) or, up, the smallest whose level is >= v (a max).
__device__ __forceinline__ u32 int8_code(float v, float lo, float s, bool up) {
    if (!(s > 0.f)) return 0u;
    const float t = __fdiv_rn(__fsub_rn(v, lo), s);
    float c = fminf(fmaxf(up ? ceilf(t) : floorf(t), 0.f), 255.f);
    if (up) {
        while (c < 255.f && int8_level(c, lo, s) < v) c += 1.f;
        while (c > 0.f && int8_level(c - 1.f, lo, s) >= v) c -= 1.f;
    } else {
        while (c > 0.f && int8_level(c, lo, s) > v) c -= 1.f;
        while (c < 255.f && int8_level(c + 1.f, lo, s) <= v) c += 1.f;
    }
    return (u32)c;
}
#else
typedef u16 bounds_t;
#endif

__device__ __forceinline__ void update_page_of_entry(
    const u16* __restrict__ k_cache,       // [slots, HK, D]
    const slot_t* __restrict__ written_slots, // [n] int32 or int64 (SLOTS_I64)
    bounds_t* __restrict__ page_key_bounds, // [pages, HK, 2, D] or int8 rows [pages, HK, 2D + 8]
    int n, int entry)
{
    const int slot = (int)written_slots[entry];
    const int page = slot / PAGE_SIZE;
    if (entry + 1 < n && (int)written_slots[entry + 1] / PAGE_SIZE == page) return;  // not the leader
    const int last = slot - page * PAGE_SIZE;                                   // offsets 0..last are valid

    const uint4* rows = reinterpret_cast<const uint4*>(k_cache) + (long long)page * PAGE_SIZE * ROW_VECS;
    // every lane of a warp runs every pass (int8: the head's lanes reduce lo/hi by shuffles); heads of D/8 lanes
    // never straddle a warp (blockDim is a multiple of 32, D/8 divides 32)
    for (int c0 = 0; c0 < ROW_VECS; c0 += blockDim.x) {
        const int c = c0 + threadIdx.x;
        const bool active = c < ROW_VECS;
        float fmn[8], fmx[8];
        __align__(16) u16 mn[8];
        __align__(16) u16 mx[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { fmn[i] = POS_INF; fmx[i] = NEG_INF; mn[i] = 0; mx[i] = 0; }
        for (int o0 = 0; active && o0 <= last; o0 += CHUNK) {
            uint4 w[CHUNK];
#pragma unroll
            for (int j = 0; j < CHUNK; ++j)
                if (o0 + j <= last) w[j] = rows[(long long)(o0 + j) * ROW_VECS + c];
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                if (o0 + j > last) break;
                float f[8];
                unpack8(w[j], f);
                const u16* rw = reinterpret_cast<const u16*>(&w[j]);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (f[i] < fmn[i] || (o0 + j == 0)) { fmn[i] = f[i]; mn[i] = rw[i]; }
                    if (f[i] > fmx[i] || (o0 + j == 0)) { fmx[i] = f[i]; mx[i] = rw[i]; }
                }
            }
        }
        const int e = c * 8;
        const int head = e / HEAD_DIM;
        const int d = e - head * HEAD_DIM;
#if BOUNDS_INT8
        float lo = fmn[0], hi = fmx[0];
#pragma unroll
        for (int i = 1; i < 8; ++i) { lo = fminf(lo, fmn[i]); hi = fmaxf(hi, fmx[i]); }
#pragma unroll
        for (int o = HEAD_VECS / 2; o > 0; o >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (!active) continue;
        const float scale = int8_scale(lo, hi);
        uint2 cmin = make_uint2(0, 0), cmax = make_uint2(0, 0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            cmin.x |= int8_code(fmn[i], lo, scale, false) << (8 * i);
            cmin.y |= int8_code(fmn[4 + i], lo, scale, false) << (8 * i);
            cmax.x |= int8_code(fmx[i], lo, scale, true) << (8 * i);
            cmax.y |= int8_code(fmx[4 + i], lo, scale, true) << (8 * i);
        }
        bounds_t* out = page_key_bounds + ((long long)page * NUM_KV_HEADS + head) * INT8_ROW;
        *reinterpret_cast<uint2*>(out + d) = cmin;
        *reinterpret_cast<uint2*>(out + HEAD_DIM + d) = cmax;
        if (d == 0) *reinterpret_cast<float2*>(out + 2 * HEAD_DIM) = make_float2(lo, scale);
#else
        if (!active) continue;
        bounds_t* out = page_key_bounds + (((long long)page * NUM_KV_HEADS + head) * 2) * HEAD_DIM + d;
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(mn);
        *reinterpret_cast<uint4*>(out + HEAD_DIM) = *reinterpret_cast<const uint4*>(mx);
#endif
    }
}

extern "C" __global__ void page_bounds_update(
    const u16* __restrict__ k_cache,       // [slots, HK, D]
    const slot_t* __restrict__ written_slots, // [n] int32 or int64 (SLOTS_I64)
    bounds_t* __restrict__ page_key_bounds, // [pages, HK, 2, D] or int8 rows [pages, HK, 2D + 8]
    int n)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    update_page_of_entry(k_cache, written_slots, page_key_bounds, n, blockIdx.x);
}

extern "C" __global__ void page_bounds_update_layers(
    const u64* __restrict__ k_caches,      // [layers]: address of each layer's [slots, HK, D] K pool
    const slot_t* __restrict__ written_slots, // [n]
    const u64* __restrict__ bounds,        // [layers]: address of each layer's bounds table
    int n)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    update_page_of_entry(reinterpret_cast<const u16*>(k_caches[blockIdx.y]), written_slots,
                         reinterpret_cast<bounds_t*>(bounds[blockIdx.y]), n, blockIdx.x);
}
