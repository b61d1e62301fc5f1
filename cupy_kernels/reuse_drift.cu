// Drift test of kept selections, per (layer, request) (see reference.reuse_drift).
//
// Row b of a step whose plan reuses its slot's kept selection (reuse_from[b] > 0) keeps reusing it in this
// layer only while, for every KV head h, the cosine similarity between the group-mean query of h now and the
// one stored when the selection was made is at least min_cosine; otherwise the row selects again here. A row
// that selects (planned or drifted) stores its group-mean queries, rounded to the cache dtype, for the steps
// after. Rows that fit their budget (CUDA-graph padding rows among them) neither read nor write: their slot may
// be another request's. Every other row owns its slot, so blocks never share a stored query.
//
// Grid (B); block: 32 * HK threads, warp h = KV head h, lane l holds channels l, l + 32, ... (HEAD_DIM / 32).
// The block's reads of the stored queries end at the barrier before any write.
// Defines: KV_BF16, HEAD_DIM, GROUP.

#define PER_LANE (HEAD_DIM / 32)

extern "C" __global__ void reuse_drift(
    const u16* __restrict__ q,                     // [B, HK*G, D]
    const int* __restrict__ req_pool_indices,      // [B]
    const unsigned char* __restrict__ fits_budget, // [B] bool
    const int* __restrict__ reuse_from,            // [B] the step's plan: > 0 = reuse the kept selection
    u16* __restrict__ query_kept,                  // [max_reqs, HK, D] this layer's stored queries
    int* __restrict__ layer_reuse_from,            // [B] out: reuse_from, or 0 where this layer selects
    int num_kv_heads, float min_cosine)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    allow_next_kernel_to_launch();       // PDL: always followed by the page scores (ours; it waits first)
    __shared__ float head_cosine[32];
    const int b = blockIdx.x;
    const int h = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (fits_budget[b]) {
        if (threadIdx.x == 0) layer_reuse_from[b] = 0;
        return;
    }
    const int from = reuse_from[b];
    const u16* qh = q + ((long long)b * num_kv_heads + h) * GROUP * HEAD_DIM;
    u16* kept = query_kept + ((long long)req_pool_indices[b] * num_kv_heads + h) * HEAD_DIM;
    float mean[PER_LANE];
    float dot = 0.f, qq = 0.f, kk = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int d = lane + 32 * i;
        float s = 0.f;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) s += kv_to_float(qh[g * HEAD_DIM + d]);
        mean[i] = s / GROUP;
        const float k = kv_to_float(kept[d]);
        dot += mean[i] * k;
        qq += mean[i] * mean[i];
        kk += k * k;
    }
    dot = warp_sum(dot);
    qq = warp_sum(qq);
    kk = warp_sum(kk);
    if (lane == 0) head_cosine[h] = dot / sqrtf(fmaxf(qq * kk, 1e-30f));
    __syncthreads();
    bool reuse = from > 0;                    // a NaN similarity fails the test, as in the reference
    for (int i = 0; i < num_kv_heads; ++i) reuse &= head_cosine[i] >= min_cosine;
    if (threadIdx.x == 0) layer_reuse_from[b] = reuse ? from : 0;
    if (!reuse) {
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) kept[lane + 32 * i] = float_to_kv(mean[i]);
    }
}
