// Batched LoRA: SGMV (segments of rows sharing an adapter; prefill) and BGMV (one adapter per
// row; decode). Specification: kernels/src/lora.rs.
//
// Adapters are reached through a slot table of one (layer, projection): entry `slot` holds
// device pointers to that adapter's A ([rank, in], row-major) and Bᵀ ([rank, out], row-major,
// i.e. B transposed so that neighbouring threads read neighbouring outputs), its rank (0 when
// the adapter does not target this projection) and its scale. Loading an adapter writes its
// entries once; nothing is copied per step.
//
// shrink: v[t, r]             = Σ_i x[t, i] · A[r, i]            (f32 accumulation, f32 v)
// expand: y[t, off + o]      += scale · Σ_r v[t, r] · Bᵀ[r, o]    (f32 accumulation)

struct LoraSlot {
    u64 a;
    u64 b_t;
    int rank;
    float scale;
};

// Ranks computed per shrink block.
#define RANK_TILE 8
#define SHRINK_THREADS 256

// Rows [start, start+len) of x against ranks [r0, r0+RANK_TILE) of the slot's A.
template <typename D>
__device__ void shrink_rows(const void* x_, int in_dim, int start, int len, const LoraSlot& s, int r0, float* v,
                            int v_stride) {
    typedef typename D::T T;
    const int V = Vec<D>::N;
    const T* x = (const T*)x_;
    const T* a = (const T*)s.a;
    __shared__ float partial[RANK_TILE][SHRINK_THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tile = min(RANK_TILE, s.rank - r0);
    for (int t = start; t < start + len; ++t) {
        float acc[RANK_TILE];
#pragma unroll
        for (int j = 0; j < RANK_TILE; ++j) acc[j] = 0.f;
        const T* xr = x + (size_t)t * in_dim;
        for (int i = threadIdx.x * V; i < in_dim; i += blockDim.x * V) {
            float xv[16 / sizeof(T)];
            Vec<D>::load(xr + i, xv);
#pragma unroll
            for (int j = 0; j < RANK_TILE; ++j) {
                if (j < tile) {
                    float av[16 / sizeof(T)];
                    Vec<D>::load(a + (size_t)(r0 + j) * in_dim + i, av);
#pragma unroll
                    for (int k = 0; k < V; ++k) acc[j] += xv[k] * av[k];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < RANK_TILE; ++j) {
            float w = warp_sum(acc[j]);
            if (lane == 0) partial[j][warp] = w;
        }
        __syncthreads();
        if ((int)threadIdx.x < tile) {
            float sum = 0.f;
            for (int w = 0; w < (int)(blockDim.x / 32); ++w) sum += partial[threadIdx.x][w];
            v[(size_t)t * v_stride + r0 + threadIdx.x] = sum;
        }
        __syncthreads();
    }
}

// Rows [start, start+len): each thread owns V consecutive outputs o0 .. o0+V.
template <typename D>
__device__ void expand_rows(const float* v, int v_stride, int start, int len, const LoraSlot& s, void* y_, int y_stride,
                            int y_offset, int out_dim) {
    typedef typename D::T T;
    const int V = Vec<D>::N;
    const int o0 = (blockIdx.y * blockDim.x + threadIdx.x) * V;
    if (o0 >= out_dim) return;
    const T* bt = (const T*)s.b_t;
    T* y = (T*)y_;
    for (int t = start; t < start + len; ++t) {
        float acc[16 / sizeof(T)];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = 0.f;
        const float* vr = v + (size_t)t * v_stride;
        for (int r = 0; r < s.rank; ++r) {
            float bv[16 / sizeof(T)];
            Vec<D>::load(bt + (size_t)r * out_dim + o0, bv);
            const float vv = vr[r];
#pragma unroll
            for (int k = 0; k < V; ++k) acc[k] += vv * bv[k];
        }
        T* yr = y + (size_t)t * y_stride + y_offset + o0;
#pragma unroll
        for (int k = 0; k < V; ++k) yr[k] = D::store(D::load(yr[k]) + s.scale * acc[k]);
    }
}

// grid (segments, ceil(max_rank / RANK_TILE)), block SHRINK_THREADS.
template <typename D>
__device__ void sgmv_shrink(const void* x, int in_dim, const int* seg_start, const int* seg_len, const int* seg_slot,
                            const LoraSlot* table, float* v, int v_stride) {
    const LoraSlot s = table[seg_slot[blockIdx.x]];
    const int r0 = blockIdx.y * RANK_TILE;
    if (r0 >= s.rank) return;
    shrink_rows<D>(x, in_dim, seg_start[blockIdx.x], seg_len[blockIdx.x], s, r0, v, v_stride);
}

// grid (segments, ceil(out_dim / (threads · V))).
template <typename D>
__device__ void sgmv_expand(const float* v, int v_stride, const int* seg_start, const int* seg_len, const int* seg_slot,
                            const LoraSlot* table, void* y, int y_stride, int y_offset, int out_dim) {
    const LoraSlot s = table[seg_slot[blockIdx.x]];
    if (s.rank == 0) return;
    expand_rows<D>(v, v_stride, seg_start[blockIdx.x], seg_len[blockIdx.x], s, y, y_stride, y_offset, out_dim);
}

// grid (rows, ceil(max_rank / RANK_TILE)); row_slot[t] < 0 means no adapter.
template <typename D>
__device__ void bgmv_shrink(const void* x, int in_dim, const int* row_slot, const LoraSlot* table, float* v,
                            int v_stride) {
    const int slot = row_slot[blockIdx.x];
    if (slot < 0) return;
    const LoraSlot s = table[slot];
    const int r0 = blockIdx.y * RANK_TILE;
    if (r0 >= s.rank) return;
    shrink_rows<D>(x, in_dim, blockIdx.x, 1, s, r0, v, v_stride);
}

// grid (rows, ceil(out_dim / (threads · V))).
template <typename D>
__device__ void bgmv_expand(const float* v, int v_stride, const int* row_slot, const LoraSlot* table, void* y,
                            int y_stride, int y_offset, int out_dim) {
    const int slot = row_slot[blockIdx.x];
    if (slot < 0) return;
    const LoraSlot s = table[slot];
    if (s.rank == 0) return;
    expand_rows<D>(v, v_stride, blockIdx.x, 1, s, y, y_stride, y_offset, out_dim);
}

INSTANTIATE(sgmv_shrink,
            (const void* x, int in_dim, const int* seg_start, const int* seg_len, const int* seg_slot,
             const LoraSlot* table, float* v, int v_stride),
            (x, in_dim, seg_start, seg_len, seg_slot, table, v, v_stride))
INSTANTIATE(sgmv_expand,
            (const float* v, int v_stride, const int* seg_start, const int* seg_len, const int* seg_slot,
             const LoraSlot* table, void* y, int y_stride, int y_offset, int out_dim),
            (v, v_stride, seg_start, seg_len, seg_slot, table, y, y_stride, y_offset, out_dim))
INSTANTIATE(bgmv_shrink,
            (const void* x, int in_dim, const int* row_slot, const LoraSlot* table, float* v, int v_stride),
            (x, in_dim, row_slot, table, v, v_stride))
INSTANTIATE(bgmv_expand,
            (const float* v, int v_stride, const int* row_slot, const LoraSlot* table, void* y, int y_stride,
             int y_offset, int out_dim),
            (v, v_stride, row_slot, table, y, y_stride, y_offset, out_dim))
