// int4 candidate scores (Twilight): logits of candidate tokens from the int4 keys for the G query heads of a
// KV head, and the group-mean softmax over the candidates (see reference.int4_candidate_scores).
//
// The query is quantized to int8 per head (reference.quantize_query_int8), so
// q~ . k^ = q_scale * sum_groups(scale * sum(q_int * code) + zero * sum(q_int)): the inner sums are exact
// integer dot products done with dp4a, 4 channels per instruction, and the int4 codes are never dequantized.
//
// Two launches, both over (chunks of CHUNK candidates, HK, B) so that even batch 1 fills the GPU:
//  1. int4_candidate_logits: a candidate is handled by CAND_LANES = D/32 lanes, each with 16 bytes (32
//     channels, inside one quantization group) of codes; UNROLL candidates per lane group are loaded before
//     any is used, and the next iteration's candidate ids are fetched while this one computes. Lane (g % CAND_LANES) of the group writes logit g and keeps an online (max, sum) for g; the
//     block reduces those into one (max, sum) per query head, stored in `partials`.
//  2. int4_candidate_probs: every block merges the row's partials (a few per row) and turns its chunk of
//     logits into p(t) = 1/G sum_g exp(l_g(t) - m_g) / s_g.
// Defines: HEAD_DIM, NUM_KV_HEADS, GROUP (G), GROUP_SIZE, KV_BF16. `chunk` (candidates per block) is an argument.

#define THREADS 256
#define WARPS (THREADS / 32)
#define CAND_LANES (HEAD_DIM / 32)
#define CANDS (THREADS / CAND_LANES)
#define UNROLL 4
#define NUM_GROUPS (HEAD_DIM / GROUP_SIZE)

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == NEG_INF) return;
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

extern "C" __global__ void __launch_bounds__(THREADS) int4_candidate_logits(
    const u16* __restrict__ q,                    // [B, HK*G, D]
    const uint4* __restrict__ key_int4,           // [slots*HK, D/2] bytes, as 16-byte vectors
    const float2* __restrict__ key_scale_zero,    // [slots*HK, NUM_GROUPS]
    const int* __restrict__ candidates,           // [B, HK, C] kv indices
    const int* __restrict__ num_candidates,       // [B, HK]
    float* __restrict__ logits,                   // [B, HK, G, C]
    float2* __restrict__ partials,                // [B, HK, chunks, G] of (max, sum)
    int C, int chunk_size, float sm_scale)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ int s_qint[GROUP][HEAD_DIM];
    __shared__ float s_qscale[GROUP];
    __shared__ float s_m[WARPS][GROUP], s_s[WARPS][GROUP];

    const int b = blockIdx.z, h = blockIdx.y, chunk = blockIdx.x;
    const int row_id = b * NUM_KV_HEADS + h;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n = num_candidates[row_id];
    const int begin = chunk * chunk_size;
    const int end = min(n, begin + chunk_size);

    // int8 query, one warp per query head.
    for (int g = warp; g < GROUP; g += WARPS) {
        const u16* qg = q + ((long long)b * NUM_KV_HEADS * GROUP + h * GROUP + g) * HEAD_DIM;
        float x[HEAD_DIM / 32];
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 32; ++i) { x[i] = kv_to_float(qg[lane + 32 * i]); amax = fmaxf(amax, fabsf(x[i])); }
        amax = warp_max(amax);
        const float inv = amax > 0.f ? __fdiv_rn(127.0f, amax) : 0.f;
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 32; ++i) {
            float c = rintf(__fmul_rn(x[i], inv));
            s_qint[g][lane + 32 * i] = (int)fminf(fmaxf(c, -127.f), 127.f);
        }
        if (lane == 0) s_qscale[g] = __fdiv_rn(amax, 127.0f);
    }
    __syncthreads();

    // This lane's 32 channels [32*part, 32*part+32): 4 words of codes; byte j of word w holds channels
    // 8w+2j (low nibble) and 8w+2j+1 (high nibble). Query bytes are packed to match.
    const int part = tid % CAND_LANES;
    const int cand_in_iter = tid / CAND_LANES;
    int q_even[GROUP][4], q_odd[GROUP][4], q_sum[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        int sum = 0;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            u32 e = 0, o = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int d = 32 * part + 8 * w + 2 * j;
                const int qe = s_qint[g][d], qo = s_qint[g][d + 1];
                sum += qe + qo;
                e |= ((u32)(qe & 0xff)) << (8 * j);
                o |= ((u32)(qo & 0xff)) << (8 * j);
            }
            q_even[g][w] = (int)e;
            q_odd[g][w] = (int)o;
        }
        q_sum[g] = sum;
    }
    const int my_group = (32 * part) / GROUP_SIZE;
    float qscale[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) qscale[g] = sm_scale * s_qscale[g];

    float run_m[GROUP], run_s[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) { run_m[g] = NEG_INF; run_s[g] = 0.f; }

    float* lg_row = logits + (long long)row_id * GROUP * C;
    const int* cand = candidates + (long long)row_id * C;
    int kv_next[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int t = begin + u * CANDS + cand_in_iter;
        kv_next[u] = t < end ? cand[t] : -1;
    }
    for (int base = begin; base < end; base += CANDS * UNROLL) {
        uint4 codes[UNROLL];
        float2 sz[UNROLL];
        int kv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            kv[u] = kv_next[u];
            codes[u] = make_uint4(0, 0, 0, 0);
            sz[u] = make_float2(0.f, 0.f);
            if (kv[u] >= 0) {
                codes[u] = key_int4[(long long)kv[u] * CAND_LANES + part];
                sz[u] = key_scale_zero[(long long)kv[u] * NUM_GROUPS + my_group];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {      // prefetch the next iteration's candidate ids
            const int t = base + CANDS * UNROLL + u * CANDS + cand_in_iter;
            kv_next[u] = t < end ? cand[t] : -1;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = base + u * CANDS + cand_in_iter;
            const u32 cw[4] = {codes[u].x, codes[u].y, codes[u].z, codes[u].w};
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                int acc = 0;
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    acc = dp4a((int)(cw[w] & 0x0f0f0f0fu), q_even[g][w], acc);
                    acc = dp4a((int)((cw[w] >> 4) & 0x0f0f0f0fu), q_odd[g][w], acc);
                }
                float part_sum = fmaf(sz[u].x, (float)acc, sz[u].y * (float)q_sum[g]);
#pragma unroll
                for (int o = CAND_LANES / 2; o > 0; o >>= 1) part_sum += __shfl_xor_sync(0xffffffffu, part_sum, o);
                if (t < end && part == g % CAND_LANES) {
                    const float l = qscale[g] * part_sum;
                    lg_row[(long long)g * C + t] = l;
                    if (l > run_m[g]) { run_s[g] = run_s[g] * expf(run_m[g] - l) + 1.f; run_m[g] = l; }
                    else run_s[g] += expf(l - run_m[g]);
                }
            }
        }
    }

    // Block reduction of (max, sum) per query head into this chunk's partial.
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        float m = run_m[g], s = run_s[g];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            softmax_merge(m, s, m2, s2);
        }
        if (lane == 0) { s_m[warp][g] = m; s_s[warp][g] = s; }
    }
    __syncthreads();
    if (tid < GROUP) {
        float m = NEG_INF, s = 0.f;
        for (int w = 0; w < WARPS; ++w) softmax_merge(m, s, s_m[w][tid], s_s[w][tid]);
        partials[((long long)row_id * gridDim.x + chunk) * GROUP + tid] = make_float2(m, s);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) int4_candidate_probs(
    const float* __restrict__ logits,             // [B, HK, G, C]
    const float2* __restrict__ partials,          // [B, HK, chunks, G]
    const int* __restrict__ num_candidates,       // [B, HK]
    float* __restrict__ probs,                    // [B, HK, C]
    int C, int chunk_size)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ float s_m[GROUP], s_inv[GROUP];
    const int b = blockIdx.z, h = blockIdx.y, chunk = blockIdx.x;
    const int row_id = b * NUM_KV_HEADS + h;
    const int n = num_candidates[row_id];
    const int begin = chunk * chunk_size;
    if (begin >= n) return;
    if (threadIdx.x < GROUP) {
        const int g = threadIdx.x;
        const int used = (n + chunk_size - 1) / chunk_size;
        float m = NEG_INF, s = 0.f;
        for (int c = 0; c < used; ++c) {
            const float2 p = partials[((long long)row_id * gridDim.x + c) * GROUP + g];
            softmax_merge(m, s, p.x, p.y);
        }
        s_m[g] = m;
        s_inv[g] = s > 0.f ? 1.f / s : 0.f;
    }
    __syncthreads();
    const float* lg_row = logits + (long long)row_id * GROUP * C;
    float* pr_row = probs + (long long)row_id * C;
    const int end = min(n, begin + chunk_size);
    for (int t = begin + threadIdx.x; t < end; t += THREADS) {
        float p = 0.f;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) p += expf(lg_row[(long long)g * C + t] - s_m[g]) * s_inv[g];
        pr_row[t] = p * (1.0f / GROUP);
    }
}
