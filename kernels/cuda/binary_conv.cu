// Binary 2-D convolution and max-pooling of packed NHWC activations on the GPU.
// Layout, bit convention and padding rule: lowbit/kernels/__init__.py.  x is (N, H, W, words),
// weights (O, KH, KW, words), out int32 (N, OH, OW, O).  Zero padding: an off-input tap contributes 0,
// so only taps inside the input are counted: out = sum over valid taps of (channels - 2 * popcount(x XOR w)).

// One thread per output element, the output channel fastest (coalesced stores; the activation words
// a warp reads are shared by its threads).
extern "C" __global__ void binary_conv2d(const unsigned long long* __restrict__ x,
                                         const unsigned long long* __restrict__ weights, int* __restrict__ out,
                                         long long batch, long long height, long long width, long long words,
                                         long long n_out, long long kernel_h, long long kernel_w,
                                         long long stride_h, long long stride_w, long long pad_h, long long pad_w,
                                         long long out_h, long long out_w, int channels) {
    const long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (index >= batch * out_h * out_w * n_out) return;
    const long long o = index % n_out;
    long long rest = index / n_out;
    const long long ox = rest % out_w;
    rest /= out_w;
    const long long oy = rest % out_h;
    const long long image = rest / out_h;
    int total = 0;
    for (long long ky = 0; ky < kernel_h; ++ky) {
        const long long iy = oy * stride_h - pad_h + ky;
        if (iy < 0 || iy >= height) continue;
        for (long long kx = 0; kx < kernel_w; ++kx) {
            const long long ix = ox * stride_w - pad_w + kx;
            if (ix < 0 || ix >= width) continue;
            const unsigned long long* x_words = x + ((image * height + iy) * width + ix) * words;
            const unsigned long long* w_words = weights + ((o * kernel_h + ky) * kernel_w + kx) * words;
            int mismatches = 0;
            for (long long w = 0; w < words; ++w) mismatches += __popcll(x_words[w] ^ w_words[w]);
            total += channels - 2 * mismatches;
        }
    }
    out[index] = total;
}

// One thread per output word: the max of +-1 values is the OR of their bits; padded positions are
// skipped (as if -inf).
extern "C" __global__ void maxpool_packed(const unsigned long long* __restrict__ x, unsigned long long* __restrict__ out,
                                          long long batch, long long height, long long width, long long words,
                                          long long kernel_h, long long kernel_w, long long stride_h,
                                          long long stride_w, long long pad_h, long long pad_w, long long out_h,
                                          long long out_w) {
    const long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (index >= batch * out_h * out_w * words) return;
    const long long w = index % words;
    long long rest = index / words;
    const long long ox = rest % out_w;
    rest /= out_w;
    const long long oy = rest % out_h;
    const long long image = rest / out_h;
    const long long y_first = oy * stride_h - pad_h;
    const long long x_first = ox * stride_w - pad_w;
    const long long y_start = y_first > 0 ? y_first : 0;
    const long long y_stop = y_first + kernel_h < height ? y_first + kernel_h : height;
    const long long x_start = x_first > 0 ? x_first : 0;
    const long long x_stop = x_first + kernel_w < width ? x_first + kernel_w : width;
    unsigned long long word = 0;
    for (long long iy = y_start; iy < y_stop; ++iy)
        for (long long ix = x_start; ix < x_stop; ++ix) word |= x[((image * height + iy) * width + ix) * words + w];
    out[index] = word;
}
