// Page metadata update (Quest): per physical page and KV head, the channel-wise min and max of K.
//
// One warp per entry of written_slots. Only the *last* entry of each run of entries on the same page (the
// page's "leader") works: it recomputes the page's bounds over offsets 0..o, o being its own offset. Pages
// are filled from offset 0 by one request and a run ends at the largest offset written, so this equals the
// reference's "min/max over offsets 0..max written offset": a write at offset 0 resets the page, and prefill
// touches every token once (one pass over K).
//
// Layout: k_cache [slots, HK*D] (row of one token), page_key_bounds [pages, HK, 2, D]. The warp streams the
// token rows of the page in 16-byte vectors; vector c covers elements c*8..c*8+7 of the row, i.e. head
// (c*8)/D, channels (c*8)%D onwards.
//
// Defines: KV_BF16, HEAD_DIM (D), NUM_KV_HEADS (HK), PAGE_SIZE (P).

#define ROW (NUM_KV_HEADS * HEAD_DIM)     // elements of one token row
#define ROW_VECS (ROW / 8)                // 16-byte vectors per row

extern "C" __global__ void page_bounds_update(
    const u16* __restrict__ k_cache,       // [slots, HK, D]
    const int* __restrict__ written_slots, // [n]
    u16* __restrict__ page_key_bounds,     // [pages, HK, 2, D]
    int n)
{
    const int warps_per_block = blockDim.x >> 5;
    const int entry = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (entry >= n) return;
    const int slot = written_slots[entry];
    const int page = slot / PAGE_SIZE;
    if (entry + 1 < n && written_slots[entry + 1] / PAGE_SIZE == page) return;  // not the leader
    const int last = slot - page * PAGE_SIZE;                                   // offsets 0..last are valid

    const uint4* rows = reinterpret_cast<const uint4*>(k_cache) + (long long)page * PAGE_SIZE * ROW_VECS;
    for (int c = lane; c < ROW_VECS; c += 32) {
        uint4 v = rows[c];
        __align__(16) u16 mn[8];
        __align__(16) u16 mx[8];
        float fmn[8], fmx[8];
        unpack8(v, fmn);
        const u16* raw = reinterpret_cast<const u16*>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) { mn[i] = raw[i]; mx[i] = raw[i]; fmx[i] = fmn[i]; }
        for (int o = 1; o <= last; ++o) {
            uint4 w = rows[(long long)o * ROW_VECS + c];
            float f[8];
            unpack8(w, f);
            const u16* rw = reinterpret_cast<const u16*>(&w);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if (f[i] < fmn[i]) { fmn[i] = f[i]; mn[i] = rw[i]; }
                if (f[i] > fmx[i]) { fmx[i] = f[i]; mx[i] = rw[i]; }
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
