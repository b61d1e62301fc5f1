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
// Defines: KV_BF16, HEAD_DIM (D), NUM_KV_HEADS (HK), PAGE_SIZE (P).

#define ROW (NUM_KV_HEADS * HEAD_DIM)     // elements of one token row
#define ROW_VECS (ROW / 8)                // 16-byte vectors per row
#define CHUNK 8                           // tokens loaded together

__device__ __forceinline__ void update_page_of_entry(
    const u16* __restrict__ k_cache,       // [slots, HK, D]
    const slot_t* __restrict__ written_slots, // [n] int32 or int64 (SLOTS_I64)
    u16* __restrict__ page_key_bounds,     // [pages, HK, 2, D]
    int n, int entry)
{
    const int slot = (int)written_slots[entry];
    const int page = slot / PAGE_SIZE;
    if (entry + 1 < n && (int)written_slots[entry + 1] / PAGE_SIZE == page) return;  // not the leader
    const int last = slot - page * PAGE_SIZE;                                   // offsets 0..last are valid

    const uint4* rows = reinterpret_cast<const uint4*>(k_cache) + (long long)page * PAGE_SIZE * ROW_VECS;
    for (int c = threadIdx.x; c < ROW_VECS; c += blockDim.x) {
        float fmn[8], fmx[8];
        __align__(16) u16 mn[8];
        __align__(16) u16 mx[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { fmn[i] = POS_INF; fmx[i] = NEG_INF; mn[i] = 0; mx[i] = 0; }
        for (int o0 = 0; o0 <= last; o0 += CHUNK) {
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
        u16* out = page_key_bounds + (((long long)page * NUM_KV_HEADS + head) * 2) * HEAD_DIM + d;
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(mn);
        *reinterpret_cast<uint4*>(out + HEAD_DIM) = *reinterpret_cast<const uint4*>(mx);
    }
}

extern "C" __global__ void page_bounds_update(
    const u16* __restrict__ k_cache,       // [slots, HK, D]
    const slot_t* __restrict__ written_slots, // [n] int32 or int64 (SLOTS_I64)
    u16* __restrict__ page_key_bounds,     // [pages, HK, 2, D]
    int n)
{
    update_page_of_entry(k_cache, written_slots, page_key_bounds, n, blockIdx.x);
}

extern "C" __global__ void page_bounds_update_layers(
    const u64* __restrict__ k_caches,      // [layers]: address of each layer's [slots, HK, D] K pool
    const slot_t* __restrict__ written_slots, // [n]
    const u64* __restrict__ bounds,        // [layers]: address of each layer's [pages, HK, 2, D] bounds
    int n)
{
    update_page_of_entry(reinterpret_cast<const u16*>(k_caches[blockIdx.y]), written_slots,
                         reinterpret_cast<u16*>(bounds[blockIdx.y]), n, blockIdx.x);
}
