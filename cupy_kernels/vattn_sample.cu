// vAttention adaptive sampling of the residual (tokens outside the deterministic pages), one block per
// (b, h); see reference.vattention_sample for the estimator and the sample-size bound.
//
// Residual tokens are numbered in position order over the unselected pages. Residual number r lies on the
// (r / P)-th unselected page; with the selected pages sorted, that page is j + #{i : sel[i] - i <= j}
// (sel[i] - i is non-decreasing), found by binary search in shared memory.
// The slots of the first SLOT_CACHE base draws are looked up once, all in parallel (RNG, binary search,
// req_to_token), into shared memory: both passes and the output then read them there, so each draw costs one
// dependent global load (its K/V row) instead of two.
// Base sample: warp w takes draws UNROLL*w .. UNROLL*w+UNROLL-1, then strides by WARPS*UNROLL; lanes split the
// head dimension (EPL = D/32 channels, one 4- or 8-byte load each for K and V), logits of the G query heads come
// from warp sums. Means and variances are two-pass (means first, then squared deviations), reduced across warps
// in a fixed order, so the sample size is deterministic.
// Defines: KV_BF16, HEAD_DIM, NUM_KV_HEADS, GROUP, PAGE_SIZE, SLOT_CACHE.

#define THREADS 512
#define UNROLL 4
#define WARPS (THREADS / 32)
#define EPL (HEAD_DIM / 32)
#define LN2 0.69314718055994530942f
#ifndef SLOT_CACHE
#define SLOT_CACHE 4096   // base draws whose slots are cached in shared memory (the wrapper passes and sizes it)
#endif

struct Residual {
    const int* sel; int cnt;
    __device__ __forceinline__ int position(int r) const {
        const int j = r / PAGE_SIZE;
        int lo = 0, hi = cnt;               // count of i with sel[i] - i <= j
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (sel[mid] - mid <= j) lo = mid + 1; else hi = mid;
        }
        return (j + lo) * PAGE_SIZE + (r - j * PAGE_SIZE);
    }
};

// Exp-scores e_g (g = 0..G-1, identical on all lanes) of one sampled token whose K channels this lane holds.
__device__ __forceinline__ void exp_scores(const float (&k)[EPL], const float (&qs)[GROUP][EPL],
                                           const float (&lse_ln)[GROUP], float (&e)[GROUP]) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) d = fmaf(qs[g][i], k[i], d);
        e[g] = expf(warp_sum(d) - lse_ln[g]);
    }
}

// EPL consecutive channels (EPL = 2 or 4: 4- or 8-byte aligned) as floats, in one load.
__device__ __forceinline__ void load_channels(const u16* p, float* f) {
#if EPL == 4
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    f[0] = kv_lo(w.x); f[1] = kv_hi(w.x); f[2] = kv_lo(w.y); f[3] = kv_hi(w.y);
#elif EPL == 2
    const u32 w = *reinterpret_cast<const u32*>(p);
    f[0] = kv_lo(w); f[1] = kv_hi(w);
#else
#pragma unroll
    for (int i = 0; i < EPL; ++i) f[i] = kv_to_float(p[i]);
#endif
}

// Slot of base draw i: from the shared cache, or looked up (draws past SLOT_CACHE).
__device__ __forceinline__ int draw_slot(int i, const int* s_slot, u32 key, int n_s, const Residual& res,
                                         const int* r2t) {
    return i < SLOT_CACHE ? s_slot[i] : r2t[res.position((int)rng_uniform(key, (u32)i, (u32)n_s))];
}

// Loads K and V channels of UNROLL base draws i0, i0+1, ... (all issued before any is used).
struct Draws {
    float k[UNROLL][EPL], v[UNROLL][EPL];
    bool valid[UNROLL];
};

__device__ __forceinline__ void load_draws(Draws& dr, int i0, int n_base, u32 key, int n_s, const Residual& res,
                                           const int* r2t, const int* s_slot, const u16* k_cache,
                                           const u16* v_cache, int h, int lane) {
    long long row[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        dr.valid[u] = i0 + u < n_base;
        row[u] = dr.valid[u] ? (long long)draw_slot(i0 + u, s_slot, key, n_s, res, r2t) : 0;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (!dr.valid[u]) continue;
        const long long off = (row[u] * NUM_KV_HEADS + h) * HEAD_DIM + lane * EPL;
        load_channels(k_cache + off, dr.k[u]);
        load_channels(v_cache + off, dr.v[u]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) vattention_sample(
    const u16* __restrict__ q,                 // [B, HK*G, D]
    const u16* __restrict__ k_cache,           // [slots, HK, D]
    const u16* __restrict__ v_cache,           // [slots, HK, D]
    const int* __restrict__ selected_pages,    // [B, HK, top_k], ascending
    const int* __restrict__ num_selected,      // [B, HK]
    const int* __restrict__ req_to_token,      // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices,  // [B]
    const int* __restrict__ seq_lens,          // [B]
    const long long* __restrict__ seeds,       // [B]
    const float* __restrict__ lse_det,         // [B, HK*G], base 2
    const u16* __restrict__ o_det,             // [B, HK*G, D]
    int* __restrict__ sample_kv,               // [B, HK, capacity]
    int* __restrict__ num_sampled,             // [B, HK]
    float* __restrict__ sample_weight,         // [B, HK]
    int* __restrict__ required_out,            // [B, HK]
    int top_k, int r2t_stride, int capacity, float sm_scale, double base_rate, double z, double eps_part)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    extern __shared__ int s_dyn[];                          // s_sel [top_k], then s_slot [min(capacity, SLOT_CACHE)]
    int* s_sel = s_dyn;
    int* s_slot = s_dyn + top_k;
    __shared__ float s_vec[WARPS / 2][GROUP][HEAD_DIM];     // per-warp-pair partial vectors
    __shared__ float s_sc[WARPS][GROUP][2];                 // per-warp partial scalars
    __shared__ float s_mean_e[GROUP], s_mean_ev[GROUP][HEAD_DIM];
    __shared__ double s_need[GROUP];

    const int b = blockIdx.y, h = blockIdx.x;
    const int row_id = b * NUM_KV_HEADS + h;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int cnt = num_selected[row_id];
    const int L = seq_lens[b];
    const int n_pages = (L + PAGE_SIZE - 1) / PAGE_SIZE;
    for (int i = tid; i < cnt; i += THREADS) s_sel[i] = selected_pages[(long long)row_id * top_k + i];
    __syncthreads();

    int sel_tokens = cnt * PAGE_SIZE;
    if (cnt > 0 && s_sel[cnt - 1] == n_pages - 1) sel_tokens -= n_pages * PAGE_SIZE - L;
    const int n_s = L - sel_tokens;
    int* out = sample_kv + (long long)row_id * capacity;
    const int* r2t = req_to_token + (long long)req_pool_indices[b] * r2t_stride;
    const Residual res{s_sel, cnt};

    if (n_s <= 0) {
        if (tid == 0) { num_sampled[row_id] = 0; sample_weight[row_id] = 0.f; required_out[row_id] = 0; }
        return;
    }
    const double want_base = base_rate >= 1.0 ? floor(base_rate) : ceil(base_rate * (double)n_s);
    const int n_base = (int)min((double)capacity, fmax(2.0, want_base));
    const u32 key = rng_key((u64)seeds[b], (u32)h);
    bool take_all = n_s <= n_base;
    int n_take = n_s, required = n_s;
    float weight = 1.f;

    if (!take_all) {
        for (int i = tid; i < min(n_base, SLOT_CACHE); i += THREADS)          // independent lookups, all in flight
            s_slot[i] = r2t[res.position((int)rng_uniform(key, (u32)i, (u32)n_s))];
        __syncthreads();
        float qs[GROUP][EPL], lse_ln[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const long long qh = (long long)b * NUM_KV_HEADS * GROUP + h * GROUP + g;
#pragma unroll
            for (int i = 0; i < EPL; ++i) qs[g][i] = sm_scale * kv_to_float(q[qh * HEAD_DIM + lane * EPL + i]);
            lse_ln[g] = lse_det[qh] * LN2;
        }
        // Pass A: sums of e and e*v.
        float sum_e[GROUP], sum_ev[GROUP][EPL];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) { sum_e[g] = 0.f; for (int i = 0; i < EPL; ++i) sum_ev[g][i] = 0.f; }
        for (int i0 = warp * UNROLL; i0 < n_base; i0 += WARPS * UNROLL) {
            Draws dr;
            load_draws(dr, i0, n_base, key, n_s, res, r2t, s_slot, k_cache, v_cache, h, lane);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (!dr.valid[u]) continue;
                float e[GROUP];
                exp_scores(dr.k[u], qs, lse_ln, e);
#pragma unroll
                for (int g = 0; g < GROUP; ++g) {
                    sum_e[g] += e[g];
#pragma unroll
                    for (int c = 0; c < EPL; ++c) sum_ev[g][c] = fmaf(e[g], dr.v[u][c], sum_ev[g][c]);
                }
            }
        }
        // Fixed-order reduction: the upper half of the warps stores, the lower half adds, then pairs are summed.
        const int pair = warp % (WARPS / 2);
        if (warp >= WARPS / 2) {
#pragma unroll
            for (int g = 0; g < GROUP; ++g)
#pragma unroll
                for (int c = 0; c < EPL; ++c) s_vec[pair][g][lane * EPL + c] = sum_ev[g][c];
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) if (lane == 0) s_sc[warp][g][0] = sum_e[g];
        __syncthreads();
        if (warp < WARPS / 2) {
#pragma unroll
            for (int g = 0; g < GROUP; ++g)
#pragma unroll
                for (int c = 0; c < EPL; ++c) s_vec[pair][g][lane * EPL + c] += sum_ev[g][c];
        }
        __syncthreads();
        const float inv_n = 1.f / (float)n_base;
        for (int t = tid; t < GROUP * HEAD_DIM; t += THREADS) {
            const int g = t / HEAD_DIM, d = t - g * HEAD_DIM;
            float s = 0.f;
            for (int w = 0; w < WARPS / 2; ++w) s += s_vec[w][g][d];
            s_mean_ev[g][d] = s * inv_n;
        }
        if (tid < GROUP) {
            float s = 0.f;
            for (int w = 0; w < WARPS; ++w) s += s_sc[w][tid][0];
            s_mean_e[tid] = s * inv_n;
        }
        __syncthreads();
        // Pass B: squared deviations of e and of e*v (summed over channels).
        float dev_e[GROUP], dev_ev[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) { dev_e[g] = 0.f; dev_ev[g] = 0.f; }
        for (int i0 = warp * UNROLL; i0 < n_base; i0 += WARPS * UNROLL) {
            Draws dr;
            load_draws(dr, i0, n_base, key, n_s, res, r2t, s_slot, k_cache, v_cache, h, lane);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (!dr.valid[u]) continue;
                float e[GROUP];
                exp_scores(dr.k[u], qs, lse_ln, e);
#pragma unroll
                for (int g = 0; g < GROUP; ++g) {
                    const float de = e[g] - s_mean_e[g];
                    dev_e[g] = fmaf(de, de, dev_e[g]);
#pragma unroll
                    for (int c = 0; c < EPL; ++c) {
                        const float dv = fmaf(e[g], dr.v[u][c], -s_mean_ev[g][lane * EPL + c]);
                        dev_ev[g] = fmaf(dv, dv, dev_ev[g]);
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const float t = warp_sum(dev_ev[g]);
            if (lane == 0) { s_sc[warp][g][0] = dev_e[g]; s_sc[warp][g][1] = t; }
        }
        __syncthreads();
        // Sample size per query head (warp g), in double.
        if (warp < GROUP) {
            const int g = warp;
            double ss_e = 0.0, ss_ev = 0.0;
            for (int w = 0; w < WARPS; ++w) { ss_e += s_sc[w][g][0]; ss_ev += s_sc[w][g][1]; }
            float nn = 0.f;
            const long long qh = (long long)b * NUM_KV_HEADS * GROUP + h * GROUP + g;
#pragma unroll
            for (int c = 0; c < EPL; ++c) {
                const int d = lane * EPL + c;
                const float nd = kv_to_float(o_det[qh * HEAD_DIM + d]) + (float)n_s * s_mean_ev[g][d];
                nn = fmaf(nd, nd, nn);
            }
            nn = warp_sum(nn);
            if (lane == 0) {
                const double var_e = ss_e / (n_base - 1), var_n = ss_ev / (n_base - 1);
                const double d_hat = 1.0 + (double)n_s * s_mean_e[g];
                const double n_hat = sqrt((double)nn);
                const double a = z * n_s * sqrt(var_e) / (eps_part * d_hat);
                const double c = z * n_s * sqrt(var_n) / (eps_part * n_hat);
                const double a2 = a * a, c2 = c * c;
                s_need[g] = (a2 != a2 || c2 != c2) ? 1e300 : fmax(a2, c2);  // NaN (0/0) counts as unbounded
            }
        }
        __syncthreads();
        double need = 0.0;
        for (int g = 0; g < GROUP; ++g) need = fmax(need, s_need[g]);
        required = (need < 2147483647.0) ? (int)ceil(need) : 2147483647;
        const int n = max(required, n_base);
        if (n >= n_s && n_s <= capacity) {
            take_all = true;
        } else {
            n_take = min(n, capacity);
            weight = (float)((double)n_s / (double)n_take);
        }
    }

    // The sample: draw i is base draw i while i < n_base (same key, same counter), so its slot is cached.
    const int cached = take_all ? 0 : min(n_base, SLOT_CACHE);
    for (int i = tid; i < n_take; i += THREADS) {
        int slot;
        if (i < cached) slot = s_slot[i];
        else slot = r2t[res.position(take_all ? i : (int)rng_uniform(key, (u32)i, (u32)n_s))];
        out[i] = slot * NUM_KV_HEADS + h;
    }
    if (tid == 0) { num_sampled[row_id] = n_take; sample_weight[row_id] = weight; required_out[row_id] = required; }
}
