// Selected pages -> FlashInfer's per-head paged rows (see reference.page_rows).
//
// FlashInfer attends row r = b * HK + h over the pages page_indices[indptr[r] .. indptr[r+1]) of a view whose
// page i starts at kv row i of the [slots * HK, D] cache and steps HK rows per token (decode._PerHeadDecode), so
// logical page j of request b, KV head h is page index req_to_token[b, j*P] * HK + h: no token list, P times
// fewer indices than token rows, and no compaction (each row's offset is the sum of the counts before it).
// Only a row's last entry can be partial (pages arrive ascending and only a request's last page is partial);
// its token count goes to last_page_len.
// Grid (R): block r sums the counts of rows before it in a fixed order (rows are batch x KV heads, a few
// thousand at most, so this costs less than a second launch), then writes its entries.
// Defines: PAGE_SIZE.

#define THREADS 128

extern "C" __global__ void __launch_bounds__(THREADS) page_rows(
    const int* __restrict__ selected_pages,   // [B, HK, W] ascending logical pages
    const int* __restrict__ num_selected,     // [B, HK]
    const int* __restrict__ req_to_token,     // [max_reqs, r2t_stride]
    const int* __restrict__ req_pool_indices, // [B]
    const int* __restrict__ seq_lens,         // [B]
    int* __restrict__ indptr,                 // [R + 1]
    int* __restrict__ page_indices,           // [>= sum(num_selected)]
    int* __restrict__ last_page_len,          // [R]
    int* __restrict__ num_tokens,             // [R]
    int num_kv_heads, int width, int r2t_stride)
{
    wait_for_previous_kernel();          // PDL: before any memory access (common.cuh)
    __shared__ int red[THREADS / 32];
    const int r = blockIdx.x;
    const int b = r / num_kv_heads, h = r - b * num_kv_heads;
    const int offset = block_sum_before<THREADS / 32>(num_selected, r, red);

    write_page_row<PAGE_SIZE>(selected_pages + (long long)r * width, num_selected[r],
                              req_to_token + (long long)req_pool_indices[b] * r2t_stride, seq_lens[b], h,
                              num_kv_heads, r, gridDim.x, offset, indptr, page_indices, last_page_len, num_tokens);
}
