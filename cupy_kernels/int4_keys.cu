// int4 key quantization (Twilight's key copy) for the slots just written (see reference.quantize_keys_int4).
//
// One block per written slot, one warp per KV head; lane l holds channels l*EPL .. l*EPL+EPL-1 of the
// head (EPL = D/32). A group of GROUP_SIZE channels spans GROUP_LANES consecutive lanes, whose min and max
// come from xor-shuffles. The arithmetic is float32 with explicit rounding intrinsics so it matches the
// torch reference bit for bit: scale = (max-min)/15, code = rint((x-min)/scale) clamped to 0..15 (0 if scale = 0).
// Defines: KV_BF16, HEAD_DIM, NUM_KV_HEADS, GROUP_SIZE.

#define EPL (HEAD_DIM / 32)
#define GROUP_LANES (GROUP_SIZE / EPL)
#define NUM_GROUPS (HEAD_DIM / GROUP_SIZE)

extern "C" __global__ void quantize_keys_int4(
    const u16* __restrict__ k_cache,        // [slots, HK, D]
    const slot_t* __restrict__ written_slots,  // [n] int32 or int64 (SLOTS_I64)
    unsigned char* __restrict__ key_int4,   // [slots, HK, D/2]
    float2* __restrict__ key_scale_zero,    // [slots, HK, D/GROUP_SIZE] of (scale, zero)
    int n)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    const int lane = threadIdx.x & 31;
    const long long slot = written_slots[blockIdx.x];
    for (int h = threadIdx.x >> 5; h < NUM_KV_HEADS; h += blockDim.x >> 5) {
        const long long row = slot * NUM_KV_HEADS + h;
        const u16* src = k_cache + row * HEAD_DIM + lane * EPL;
        float x[EPL];
#pragma unroll
        for (int i = 0; i < EPL; ++i) x[i] = kv_to_float(src[i]);
        float mn = x[0], mx = x[0];
#pragma unroll
        for (int i = 1; i < EPL; ++i) { mn = fminf(mn, x[i]); mx = fmaxf(mx, x[i]); }
#pragma unroll
        for (int o = GROUP_LANES / 2; o > 0; o >>= 1) {
            mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        const float scale = __fdiv_rn(__fsub_rn(mx, mn), 15.0f);
        u32 packed = 0;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            // A true division: 1/scale overflows for subnormal scales (tiny bf16 ranges).
            float c = scale > 0.f ? rintf(__fdiv_rn(__fsub_rn(x[i], mn), scale)) : 0.f;
            c = fminf(fmaxf(c, 0.f), 15.f);
            packed |= ((u32)c) << (4 * i);
        }
        unsigned char* dst = key_int4 + row * (HEAD_DIM / 2) + lane * (EPL / 2);
#pragma unroll
        for (int i = 0; i < EPL / 2; ++i) dst[i] = (unsigned char)(packed >> (8 * i));
        if (lane % GROUP_LANES == 0)
            key_scale_zero[row * NUM_GROUPS + lane / GROUP_LANES] = make_float2(scale, mn);
    }
}
