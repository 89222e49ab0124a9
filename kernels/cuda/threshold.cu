// Fused BatchNorm-then-sign on the GPU: bit c of a row is direction[c] * acc[c] >= direction[c] * threshold[c]
// (thresholds from lowbit.kernels.bn_sign_threshold), written straight into packed words with the bit
// convention of lowbit/kernels/__init__.py (LSB first, padding bits 0).
// One warp per output word, two ballots per word as in pack.cu.  blockDim.x must be a multiple of 32.

extern "C" __global__ void threshold_pack(const int* __restrict__ acc, const long long* __restrict__ threshold,
                                          const signed char* __restrict__ direction,
                                          unsigned long long* __restrict__ packed, long long rows,
                                          long long channels, long long words) {
    const long long word_index = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (word_index >= rows * words) return;  // the same for every lane of the warp
    const long long row = word_index / words;
    const long long low = (word_index - row * words) * 64 + lane;
    const long long high = low + 32;
    bool low_bit = false, high_bit = false;
    if (low < channels)
        low_bit = ((long long)acc[row * channels + low] - threshold[low]) * (long long)direction[low] >= 0;
    if (high < channels)
        high_bit = ((long long)acc[row * channels + high] - threshold[high]) * (long long)direction[high] >= 0;
    const unsigned int low_word = __ballot_sync(0xffffffffu, low_bit);
    const unsigned int high_word = __ballot_sync(0xffffffffu, high_bit);
    if (lane == 0) packed[word_index] = ((unsigned long long)high_word << 32) | (unsigned long long)low_word;
}
