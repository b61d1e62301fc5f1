// Expand selected logical pages into FlashInfer kv indices (slot * HK + h) of their tokens
// (see reference.pages_to_kv_indices).
//
// Pages arrive in ascending order, so only the last entry can be the request's partial page: entry e's tokens
// land at e*P .. e*P+P-1 of the output and the count is (num_selected-1)*P + tokens of the last entry.
// Grid: (HK, B, chunks): block z covers tokens z*256 .. z*256+255 of the row, one per thread, so reads of
// req_to_token and writes are coalesced and a small batch still spreads over many blocks (one block per row
// looped over its ~2K tokens, a chain of dependent loads, took ~10 us at batch 1).
// Defines: PAGE_SIZE.

extern "C" __global__ void pages_to_kv_indices(
    const int* __restrict__ selected_pages,   // [B, HK, K]
    const int* __restrict__ num_selected,     // [B, HK]
    const int* __restrict__ req_to_token,     // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices, // [B]
    const int* __restrict__ seq_lens,         // [B]
    int* __restrict__ kv_indices,             // [B, HK, capacity]
    int* __restrict__ num_kv,                 // [B, HK]
    int num_kv_heads, int top_k, int r2t_stride, int capacity)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    const int b = blockIdx.y, h = blockIdx.x;
    const int row_id = b * num_kv_heads + h;
    const int* sel = selected_pages + (long long)row_id * top_k;
    const int cnt = num_selected[row_id];
    const int L = seq_lens[b];
    const int* r2t = req_to_token + (long long)req_pool_indices[b] * r2t_stride;
    int* out = kv_indices + (long long)row_id * capacity;
    const int t = blockIdx.z * blockDim.x + threadIdx.x;
    if (t < cnt * PAGE_SIZE) {
        const int e = t / PAGE_SIZE;
        const int pos = sel[e] * PAGE_SIZE + (t - e * PAGE_SIZE);
        if (pos < L) out[t] = r2t[pos] * num_kv_heads + h;
    }
    if (blockIdx.z == 0 && threadIdx.x == 0) {
        int total = 0;
        if (cnt > 0) total = (cnt - 1) * PAGE_SIZE + min(PAGE_SIZE, L - sel[cnt - 1] * PAGE_SIZE);
        num_kv[row_id] = total;
    }
}
