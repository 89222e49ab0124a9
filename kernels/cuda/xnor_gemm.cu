// XNOR-popcount GEMM on the GPU: out[i, j] = k - 2 * popcount(a_i XOR b_j), int32.
// a is (M, words), b is (N, words), both row-major uint64 with padding bits past k equal to 0 (the bit
// convention of lowbit/kernels/__init__.py), so no padding correction is needed.
//
// Tiling: each block computes a 128 x 128 output tile with 256 threads; each thread owns an 8 x 8
// sub-tile whose rows and columns are strided by 16, so that a warp reads 16 consecutive B words
// from shared memory (no bank conflict) and broadcasts the A words.  The K dimension advances 8
// words (512 bits) at a time through shared memory.  Out-of-range rows and words load as 0 and are
// never stored.  Launch: grid (ceil(N / 128), ceil(M / 128)), block 256.

#define LOWBIT_TILE_M 128
#define LOWBIT_TILE_N 128
#ifndef LOWBIT_TILE_K  // words of K per shared-memory stage; -DLOWBIT_TILE_K=N overrides (bench_kernels.py --gpu-only)
#define LOWBIT_TILE_K 8
#endif
#define LOWBIT_THREADS 256
#define LOWBIT_SUB 8

extern "C" __global__ void __launch_bounds__(LOWBIT_THREADS)
xnor_gemm(const unsigned long long* __restrict__ a, const unsigned long long* __restrict__ b,
          int* __restrict__ out, long long m, long long n, long long words, int k) {
    // +1 word of padding per row staggers the banks of the transposed stores below.
    __shared__ unsigned long long a_tile[LOWBIT_TILE_K][LOWBIT_TILE_M + 1];
    __shared__ unsigned long long b_tile[LOWBIT_TILE_K][LOWBIT_TILE_N + 1];

    const int tid = threadIdx.x;
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const long long row0 = (long long)blockIdx.y * LOWBIT_TILE_M;
    const long long col0 = (long long)blockIdx.x * LOWBIT_TILE_N;

    int acc[LOWBIT_SUB][LOWBIT_SUB];
#pragma unroll
    for (int i = 0; i < LOWBIT_SUB; ++i)
#pragma unroll
        for (int j = 0; j < LOWBIT_SUB; ++j) acc[i][j] = 0;

    for (long long word0 = 0; word0 < words; word0 += LOWBIT_TILE_K) {
        // 128 rows x 8 words = 1024 words per operand: 4 per thread, 8 consecutive words per row.
#pragma unroll
        for (int load = 0; load < (LOWBIT_TILE_M * LOWBIT_TILE_K) / LOWBIT_THREADS; ++load) {
            const int index = tid + load * LOWBIT_THREADS;
            const int r = index / LOWBIT_TILE_K;
            const int kk = index % LOWBIT_TILE_K;
            const long long word = word0 + kk;
            const long long a_row = row0 + r;
            const long long b_row = col0 + r;
            a_tile[kk][r] = (a_row < m && word < words) ? a[a_row * words + word] : 0ull;
            b_tile[kk][r] = (b_row < n && word < words) ? b[b_row * words + word] : 0ull;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < LOWBIT_TILE_K; ++kk) {
            unsigned long long a_words[LOWBIT_SUB];
            unsigned long long b_words[LOWBIT_SUB];
#pragma unroll
            for (int i = 0; i < LOWBIT_SUB; ++i) a_words[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < LOWBIT_SUB; ++j) b_words[j] = b_tile[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < LOWBIT_SUB; ++i)
#pragma unroll
                for (int j = 0; j < LOWBIT_SUB; ++j) acc[i][j] += __popcll(a_words[i] ^ b_words[j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < LOWBIT_SUB; ++i) {
        const long long row = row0 + ty + 16 * i;
        if (row >= m) continue;
#pragma unroll
        for (int j = 0; j < LOWBIT_SUB; ++j) {
            const long long col = col0 + tx + 16 * j;
            if (col < n) out[row * n + col] = k - 2 * acc[i][j];
        }
    }
}
