// Kernels that exercise the emulation itself, compiled only into it (NVRTC never sees them).

// Reverses each block's slice through shared memory; without the barrier, a thread reads a slot
// its mirror thread has not written yet in any order the emulator runs them in.
ENTRY_POINT(selftest_reverse, (const int* in, int* out, int synced)) {
    __shared__ int tile[1024];
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    tile[t] = in[base + t];
    if (synced) __syncthreads();
    out[base + t] = tile[blockDim.x - 1 - t];
}

// Half a warp waits at the barrier while the other half waits for it in a shuffle: a deadlock.
ENTRY_POINT(selftest_divergent, (float* out)) {
    if (threadIdx.x < 16)
        __syncthreads();
    else
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Every lane gets its warp's sum (the prelude's butterfly of shuffles).
ENTRY_POINT(selftest_warp_sum, (const float* in, float* out)) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = warp_sum(in[i]);
}

// Sums each of `rows` rows of a block's input the way the LoRA shrink reduces: each warp sums
// by shuffles, lane 0 writes its warp's partial to shared memory, thread 0 adds the partials.
// Without the barrier that ends each row, a warp that runs ahead writes its next row's partial
// before thread 0 has read this row's.
ENTRY_POINT(selftest_row_sums, (const float* in, float* out, int rows, int synced)) {
    __shared__ float partial[32];
    const int t = threadIdx.x, warp = t / 32, lane = t % 32, n = blockDim.x;
    for (int r = 0; r < rows; ++r) {
        const float s = warp_sum(in[(blockIdx.x * rows + r) * n + t]);
        if (lane == 0) partial[warp] = s;
        __syncthreads();
        if (t == 0) {
            float total = 0.f;
            for (int w = 0; w < n / 32; ++w) total += partial[w];
            out[blockIdx.x * rows + r] = total;
        }
        if (synced) __syncthreads();
    }
}
