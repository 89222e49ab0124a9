// Packing real values into sign bits and back, on the GPU.
// Bit convention (see lowbit/kernels/__init__.py): bit 1 = +1 = (x >= 0), so sign(0) = sign(-0.0) = +1;
// element c of a row goes to word c / 64, bit c % 64 (least significant first); padding bits past k are 0.
// Compiled by CuPy's RawModule (NVRTC): no #include, only built-in device functions.

// One warp per output word: lane l reads elements 64*w + l and 64*w + 32 + l (coalesced), and two
// warp ballots assemble the low and high halves of the word.  blockDim.x must be a multiple of 32.
template <typename T>
__device__ void pack_signs_impl(const T* __restrict__ values, unsigned long long* __restrict__ packed,
                                long long rows, long long k, long long words, int* __restrict__ nan_flag) {
    const long long word_index = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (word_index >= rows * words) return;  // the same for every lane of the warp
    const long long row = word_index / words;
    const long long low_column = (word_index - row * words) * 64 + lane;
    const long long high_column = low_column + 32;
    bool low_bit = false, high_bit = false, not_a_number = false;
    if (low_column < k) {
        const T value = values[row * k + low_column];
        low_bit = value >= (T)0;
        not_a_number = value != value;
    }
    if (high_column < k) {
        const T value = values[row * k + high_column];
        high_bit = value >= (T)0;
        not_a_number = not_a_number || value != value;
    }
    const unsigned int low = __ballot_sync(0xffffffffu, low_bit);
    const unsigned int high = __ballot_sync(0xffffffffu, high_bit);
    if (not_a_number) atomicOr(nan_flag, 1);
    if (lane == 0) packed[word_index] = ((unsigned long long)high << 32) | (unsigned long long)low;
}

extern "C" __global__ void pack_signs_f32(const float* values, unsigned long long* packed, long long rows,
                                          long long k, long long words, int* nan_flag) {
    pack_signs_impl<float>(values, packed, rows, k, words, nan_flag);
}

extern "C" __global__ void pack_signs_f64(const double* values, unsigned long long* packed, long long rows,
                                          long long k, long long words, int* nan_flag) {
    pack_signs_impl<double>(values, packed, rows, k, words, nan_flag);
}

// One thread per output element: +1 where the bit is set, -1 where it is not.
template <typename T>
__device__ void unpack_signs_impl(const unsigned long long* __restrict__ packed, T* __restrict__ values,
                                  long long rows, long long k, long long words) {
    const long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (index >= rows * k) return;
    const long long row = index / k;
    const long long column = index - row * k;
    const unsigned long long word = packed[row * words + (column >> 6)];
    values[index] = ((word >> (column & 63)) & 1ull) ? (T)1 : (T)(-1);
}

#define LOWBIT_UNPACK(suffix, type)                                                                     \
    extern "C" __global__ void unpack_signs_##suffix(const unsigned long long* packed, type* values,     \
                                                     long long rows, long long k, long long words) {    \
        unpack_signs_impl<type>(packed, values, rows, k, words);                                        \
    }

LOWBIT_UNPACK(f32, float)
LOWBIT_UNPACK(f64, double)
LOWBIT_UNPACK(i8, signed char)
LOWBIT_UNPACK(i16, short)
LOWBIT_UNPACK(i32, int)
LOWBIT_UNPACK(i64, long long)
