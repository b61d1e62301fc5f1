// vAttention's merge: the deterministic attention and the importance-weighted sample attention, by their base-2
// LSEs, into one output (see reference.vattention_merge). Replaces a dozen small torch kernels per layer (masks,
// log2 of the weight, the merge) with one.
//
// One block per (query head, request), one thread per 8 channels (blockDim = HEAD_DIM / 8). Row (b, hq) belongs
// to KV head h = hq / GROUP: when that head drew no sample (s_counts == 0) its sample output is not read (it
// may be garbage) and the output is o_det; otherwise the sample's LSE gains log2(weight) and the two merge as
// flashinfer.merge_state does (float32, m = max LSE, w = 2^(lse - m), out = (o_a w_a + o_b w_b) / (w_a + w_b)).
// Products and sums are rounded separately (no FMA contraction), as the torch reference computes them.
// Defines: KV_BF16, HEAD_DIM, NUM_KV_HEADS, GROUP.

extern "C" __global__ void vattention_merge(
    const u16* __restrict__ o_det,      // [B, HQ, D]
    const float* __restrict__ lse_det,  // [B, HQ] base 2
    const u16* __restrict__ o_s,        // [B, HQ, D]
    const float* __restrict__ lse_s,    // [B, HQ] base 2, of the unweighted sample
    const int* __restrict__ s_counts,   // [B, HK]
    const float* __restrict__ weight,   // [B, HK] tokens each sampled token stands for
    u16* __restrict__ out)              // [B, HQ, D]
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    const int hq = blockIdx.x, b = blockIdx.y;
    const int HQ = NUM_KV_HEADS * GROUP;
    const int kv = b * NUM_KV_HEADS + hq / GROUP;
    const long long row = (long long)b * HQ + hq;
    const bool sampled = s_counts[kv] > 0;
    const float la = lse_det[row];
    const float lb = sampled ? __fadd_rn(lse_s[row], log2f(fmaxf(weight[kv], 1e-30f))) : NEG_INF;
    float m = fmaxf(la, lb);
    if (!isfinite(m)) m = 0.0f;
    const float wa = exp2f(__fsub_rn(la, m)), wb = exp2f(__fsub_rn(lb, m));
    const float denom = __fadd_rn(wa, wb);

    const int c = threadIdx.x * 8;
    const uint4 va = *reinterpret_cast<const uint4*>(o_det + row * HEAD_DIM + c);
    float a[8], s[8];
    unpack8(va, a);
    if (sampled) {
        unpack8(*reinterpret_cast<const uint4*>(o_s + row * HEAD_DIM + c), s);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = 0.0f;
    }
    __align__(16) u16 o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
        o[i] = float_to_kv(__fdiv_rn(__fadd_rn(__fmul_rn(a[i], wa), __fmul_rn(s[i], wb)), denom));
    *reinterpret_cast<uint4*>(out + row * HEAD_DIM + c) = *reinterpret_cast<const uint4*>(o);
}
