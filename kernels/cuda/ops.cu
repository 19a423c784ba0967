// Row-wise and element-wise operations of a decoder layer. Specification: kernels/src/ops.rs.

// out[t] = table[ids[t]]; grid (rows), block 256.
template <typename D>
__device__ void embedding(const int* ids, const void* table_, void* out_, int hidden) {
    typedef typename D::T T;
    const T* row = (const T*)table_ + (size_t)ids[blockIdx.x] * hidden;
    T* out = (T*)out_ + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = row[i];
}

// out = x / sqrt(mean(x²) + eps) · w; grid (rows), block 256 (a multiple of 32, at most 1024).
template <typename D>
__device__ void rms_norm(const void* x_, const void* w_, void* out_, int hidden, float eps) {
    typedef typename D::T T;
    const T* x = (const T*)x_ + (size_t)blockIdx.x * hidden;
    const T* w = (const T*)w_;
    T* out = (T*)out_ + (size_t)blockIdx.x * hidden;
    __shared__ float partial[32];
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = D::load(x[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = D::store(D::load(x[i]) * inv * D::load(w[i]));
}

// Rotate-half RoPE, in place, on n_heads heads starting at column col_offset of each row.
// grid (rows), block: any; threads stride over (head, pair).
template <typename D>
__device__ void rope(void* x_, int row_stride, int col_offset, int n_heads, int head_dim, const int* positions,
                     const float* inv_freq, float scaling) {
    typedef typename D::T T;
    T* row = (T*)x_ + (size_t)blockIdx.x * row_stride + col_offset;
    const int half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        s *= scaling;
        c *= scaling;
        T* head = row + h * head_dim;
        const float a = D::load(head[i]), b = D::load(head[i + half]);
        head[i] = D::store(a * c - b * s);
        head[i + half] = D::store(b * c + a * s);
    }
}

// out[t, i] = silu(gate_up[t, i]) · gate_up[t, inter + i]; grid (rows), block 256.
template <typename D>
__device__ void silu_mul(const void* gu_, void* out_, int inter) {
    typedef typename D::T T;
    const T* gu = (const T*)gu_ + (size_t)blockIdx.x * 2 * inter;
    T* out = (T*)out_ + (size_t)blockIdx.x * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        const float g = D::load(gu[i]);
        out[i] = D::store(g / (1.f + __expf(-g)) * D::load(gu[inter + i]));
    }
}

// x += y over n elements; grid-stride.
template <typename D>
__device__ void add_inplace(void* x_, const void* y_, long long n) {
    typedef typename D::T T;
    T* x = (T*)x_;
    const T* y = (const T*)y_;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = D::store(D::load(x[i]) + D::load(y[i]));
}

// y[t, i] += bias[i] for `rows` rows of `width` values; grid (rows), block 256.
template <typename D>
__device__ void add_bias(void* y_, const void* bias_, int width) {
    typedef typename D::T T;
    T* y = (T*)y_ + (size_t)blockIdx.x * width;
    const T* bias = (const T*)bias_;
    for (int i = threadIdx.x; i < width; i += blockDim.x) y[i] = D::store(D::load(y[i]) + D::load(bias[i]));
}

INSTANTIATE(add_bias, (void* y, const void* bias, int width), (y, bias, width))
INSTANTIATE(embedding, (const int* ids, const void* table, void* out, int hidden), (ids, table, out, hidden))
INSTANTIATE(rms_norm, (const void* x, const void* w, void* out, int hidden, float eps), (x, w, out, hidden, eps))
INSTANTIATE(rope,
            (void* x, int row_stride, int col_offset, int n_heads, int head_dim, const int* positions,
             const float* inv_freq, float scaling),
            (x, row_stride, col_offset, n_heads, head_dim, positions, inv_freq, scaling))
INSTANTIATE(silu_mul, (const void* gu, void* out, int inter), (gu, out, inter))
INSTANTIATE(add_inplace, (void* x, const void* y, long long n), (x, y, n))
