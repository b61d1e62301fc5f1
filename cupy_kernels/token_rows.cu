// Every token of every request -> FlashInfer's token rows (page size 1; see reference.token_rows): request b's
// row lists its slots req_to_token[req_pool_indices[b], 0 .. seq_lens[b]) from offset sum(seq_lens[:b]).
// The dense decode pass plans these each step before its graph replays; one launch over many blocks instead of
// the index arithmetic of a repeat_interleave, an arange and a gather (five kernels, ~75 us at 8 x 32K).
// Grid (B, chunks): block (b, c) copies positions [c * CHUNK, min(seq_lens[b], (c + 1) * CHUNK)) of request b,
// after summing the lengths before b (a few hundred requests at most: cheaper than a second launch). Nothing is
// written at or past `capacity` (the buffer's size), whatever the device lengths say.

#define THREADS 256
#define CHUNK 4096

extern "C" __global__ void __launch_bounds__(THREADS) token_rows(
    const int* __restrict__ req_to_token,     // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices, // [B]
    const int* __restrict__ seq_lens,         // [B]
    int* __restrict__ indices,                // [capacity]
    int r2t_stride, int capacity)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ int red[THREADS / 32];
    const int b = blockIdx.x;
    const int len = seq_lens[b];
    const int begin = blockIdx.y * CHUNK;
    if (begin >= len) return;                 // uniform over the block, before the barrier below
    const int offset = block_sum_before<THREADS / 32>(seq_lens, b, red);
    const int end = min(min(len, begin + CHUNK), capacity - offset);
    const int* row = req_to_token + (long long)req_pool_indices[b] * r2t_stride;
    int* out = indices + offset;
    for (int i = begin + threadIdx.x; i < end; i += THREADS) out[i] = row[i];
}
