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
