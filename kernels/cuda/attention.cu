// Causal attention over the paged KV cache, for prefill rows and decode rows alike.
// Specification: kernels/src/attention.rs.
//
// One block per (query row, head). Each warp walks a strided subset of the visible positions
// with an online softmax (running max, running sum, running weighted V); the warps' partial
// results are merged at the end. Lanes split the head dimension.

#define ATTN_WARPS 4
#define MAX_HEAD_DIM 256

// Writes K and V of each new row into its cache slot. grid (rows), block 128.
template <typename D>
__device__ void write_kv(const void* src_, int src_stride, int k_offset, int v_offset, const int* slots, void* k_cache_,
                         void* v_cache_, int width) {
    typedef typename D::T T;
    const T* row = (const T*)src_ + (size_t)blockIdx.x * src_stride;
    const size_t dst = (size_t)slots[blockIdx.x] * width;
    T* kc = (T*)k_cache_;
    T* vc = (T*)v_cache_;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        kc[dst + i] = row[k_offset + i];
        vc[dst + i] = row[v_offset + i];
    }
}

// grid (rows, n_heads), block 32·ATTN_WARPS. row_pos[t]: position of row t; row_table[t]:
// offset of its sequence's block table in `block_tables`. window <= 0 means unlimited.
template <typename D>
__device__ void paged_attention(const void* q_, int q_stride, const void* k_cache_, const void* v_cache_, void* out_,
                                const int* row_pos, const int* row_table, const int* block_tables, int block_size,
                                int kv_heads, int head_dim, int n_heads, float scale, int window) {
    typedef typename D::T T;
    const int t = blockIdx.x, h = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int per_lane = (head_dim + 31) / 32;
    const int kvh = h / (n_heads / kv_heads);
    const int width = kv_heads * head_dim;
    const int pos = row_pos[t];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int* table = block_tables + row_table[t];
    const T* q = (const T*)q_ + (size_t)t * q_stride + h * head_dim;
    const T* kc = (const T*)k_cache_;
    const T* vc = (const T*)v_cache_;

    // Register arrays: every loop over them is unrolled to the fixed bound and guarded.
    float qv[MAX_HEAD_DIM / 32], acc[MAX_HEAD_DIM / 32];
#pragma unroll
    for (int k = 0; k < MAX_HEAD_DIM / 32; ++k) {
        const int d = lane + 32 * k;
        qv[k] = (k < per_lane && d < head_dim) ? D::load(q[d]) * scale : 0.f;
        acc[k] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int p = first + warp; p <= pos; p += ATTN_WARPS) {
        const size_t base = ((size_t)table[p / block_size] * block_size + p % block_size) * width + kvh * head_dim;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < MAX_HEAD_DIM / 32; ++k) {
            const int d = lane + 32 * k;
            if (k < per_lane && d < head_dim) s += qv[k] * D::load(kc[base + d]);
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = __expf(m - m_new), e = __expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int k = 0; k < MAX_HEAD_DIM / 32; ++k) {
            const int d = lane + 32 * k;
            acc[k] = acc[k] * corr + ((k < per_lane && d < head_dim) ? e * D::load(vc[base + d]) : 0.f);
        }
        m = m_new;
    }
    __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS];
    __shared__ float sm_acc[ATTN_WARPS][MAX_HEAD_DIM];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int k = 0; k < MAX_HEAD_DIM / 32; ++k) {
        const int d = lane + 32 * k;
        if (k < per_lane && d < head_dim) sm_acc[warp][d] = acc[k];
    }
    __syncthreads();
    float big = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; ++w) big = fmaxf(big, sm_m[w]);
    float denom = 0.f;
    for (int w = 0; w < ATTN_WARPS; ++w) denom += sm_m[w] == NEG_INF ? 0.f : sm_l[w] * __expf(sm_m[w] - big);
    T* out = (T*)out_ + (size_t)t * n_heads * head_dim + h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < ATTN_WARPS; ++w)
            if (sm_m[w] != NEG_INF) o += sm_acc[w][d] * __expf(sm_m[w] - big);
        out[d] = D::store(o / denom);
    }
}

INSTANTIATE(write_kv,
            (const void* src, int src_stride, int k_offset, int v_offset, const int* slots, void* k_cache,
             void* v_cache, int width),
            (src, src_stride, k_offset, v_offset, slots, k_cache, v_cache, width))
INSTANTIATE(paged_attention,
            (const void* q, int q_stride, const void* k_cache, const void* v_cache, void* out, const int* row_pos,
             const int* row_table, const int* block_tables, int block_size, int kv_heads, int head_dim, int n_heads,
             float scale, int window),
            (q, q_stride, k_cache, v_cache, out, row_pos, row_table, block_tables, block_size, kv_heads, head_dim,
             n_heads, scale, window))
