// zoo's int8 GEMM for the base's W8A8 linears on an x86 CPU without VNNI; built and loaded
// by zoo/serve/native.py, used by zoo/serve/cpu_int8.py.
//
// For every token t and output n:
//   y[t, n] = (float(sum_k x[t, k] * w[n, k]) * w_scales[n]) * x_scales[t]  (+ bias[n])
// x: int8 [m, k] (rows x_row apart), the activations vLLM's dynamic per-token quantization
// made; w: int8 [n, k], contiguous, one float32 scale an output row; y: float32 [m, n]
// (rows y_row apart). The sum is exact (int8 products summed in int32, as oneDNN's), and
// the two float32 products are taken in oneDNN's and vLLM's order: the same bits as
// vLLM's onednn_scaled_mm for the symmetric, dynamic case.
//
// Why: oneDNN's int8 matmul on such a CPU is its ``gemm:jit``, which reorders the whole
// weight on every call (at one token 576 x 3,072 took 2.7 ms against float32's 0.18) and
// adds pairs of products in 16 bits with vpmaddubsw, which saturates. Here the weight is
// read where it lies, 16 numbers at a time widened to int16 and multiplied in pairs
// (vpmaddwd: 32-bit sums, exact): 0.10 ms. From about 100 tokens a call oneDNN's is the
// faster (bench/int8_gemm.py).
#include <cstdint>
#include <cstring>
#include <vector>
// the epilogue's product and sum rounded one at a time, as vLLM's and PyTorch's (a fused
// multiply-add would round once)
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#define ZOO_INT8_AVX2 1
#endif

namespace {

#ifdef ZOO_INT8_AVX2
// a tile: 2 output rows by 4 tokens, 8 accumulators (the fastest of the shapes tried on
// an AVX2 EPYC: 3x4, 2x6, 4x2, 1x4, 3x2, 2x5, 1x6)
constexpr int kRows = 2;
constexpr int kTokens = 4;
constexpr int64_t kBlockTokens = 64;  // tokens whose widened rows stay in cache together

inline int32_t sum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// sums[t][r] = x16[t] . w[r] for T tokens (widened, x_row apart) and R rows of w (k apart)
template <int R, int T>
__attribute__((noinline)) void tile(const int16_t* x16, int64_t x_row, const int8_t* w, int64_t k,
                 int32_t sums[kTokens][kRows]) {
    __m256i acc[T][R];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_si256();
    for (int64_t i = 0; i < k; i += 16) {
        __m256i wide[R];
        for (int r = 0; r < R; ++r)
            wide[r] = _mm256_cvtepi8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k + i)));
        for (int t = 0; t < T; ++t) {
            const __m256i xv =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + t * x_row + i));
            for (int r = 0; r < R; ++r)
                acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(xv, wide[r]));
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) sums[t][r] = sum8(acc[t][r]);
}

template <int R>
inline void tile_of(int tokens, const int16_t* x16, int64_t x_row, const int8_t* w, int64_t k,
                    int32_t sums[kTokens][kRows]) {
    switch (tokens) {
        case 4: tile<R, 4>(x16, x_row, w, k, sums); break;
        case 3: tile<R, 3>(x16, x_row, w, k, sums); break;
        case 2: tile<R, 2>(x16, x_row, w, k, sums); break;
        default: tile<R, 1>(x16, x_row, w, k, sums); break;
    }
}

void gemm(int64_t m, int64_t n, int64_t k, const int8_t* x, int64_t x_row,
          const float* x_scales, const int8_t* w, const float* w_scales, const float* bias,
          float* y, int64_t y_row, int threads) {
    for (int64_t t0 = 0; t0 < m; t0 += kBlockTokens) {
        const int64_t tokens = m - t0 < kBlockTokens ? m - t0 : kBlockTokens;
        std::vector<int16_t> x16(tokens * k);  // the block's inputs, widened once
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t i = 0; i < k; ++i) x16[t * k + i] = x[(t0 + t) * x_row + i];
        const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks >= 4 * threads)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t r0 = b * kRows;
            const int rows = n - r0 < kRows ? static_cast<int>(n - r0) : kRows;
            for (int64_t t = 0; t < tokens; t += kTokens) {
                const int count = tokens - t < kTokens ? static_cast<int>(tokens - t) : kTokens;
                int32_t sums[kTokens][kRows];
                const int16_t* xt = x16.data() + t * k;
                const int8_t* wr = w + r0 * k;
                if (rows == 2) tile_of<2>(count, xt, k, wr, k, sums);
                else tile_of<1>(count, xt, k, wr, k, sums);
                for (int c = 0; c < count; ++c) {
                    float* out = y + (t0 + t + c) * y_row + r0;
                    const float token_scale = x_scales[t0 + t + c];
                    for (int r = 0; r < rows; ++r) {
                        float v = static_cast<float>(sums[c][r]) * w_scales[r0 + r];
                        v = v * token_scale;
                        if (bias) v = v + bias[r0 + r];
                        out[r] = v;
                    }
                }
            }
        }
    }
}
#endif

}  // namespace

extern "C" {

// The meaning of zoo_int8_gemm's arguments; native.py checks it.
int zoo_int8_abi() { return 1; }

// Whether this build has the AVX2 GEMM (0: zoo_int8_gemm declines every call).
int zoo_int8_avx2() {
#ifdef ZOO_INT8_AVX2
    return 1;
#else
    return 0;
#endif
}

// See the top of this file. k must be a multiple of 16. Returns 0; 1 for a k it does not
// take, 2 without AVX2 (y untouched either way).
int zoo_int8_gemm(int64_t m, int64_t n, int64_t k, const int8_t* x, int64_t x_row,
                  const float* x_scales, const int8_t* w, const float* w_scales,
                  const float* bias, float* y, int64_t y_row, int threads) {
#ifdef ZOO_INT8_AVX2
    if (k % 16 != 0 || k <= 0) return 1;
    gemm(m, n, k, x, x_row, x_scales, w, w_scales, bias, y, y_row, threads);
    return 0;
#else
    return 2;
#endif
}

}
