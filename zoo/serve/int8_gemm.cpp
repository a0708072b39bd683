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
// adds pairs of products in 16 bits with vpmaddubsw, which saturates. Here products are
// taken in pairs of int16 (vpmaddwd: 32-bit sums, exact), by one of two loops:
//   * rows (fewer than kPanelsFrom tokens: decode): the weight read where it lies, 16
//     numbers at a time widened to int16: 0.10 ms for that one token;
//   * panels (from kPanelsFrom: prefill, and decode of many streams): the weight widened
//     once a call, 32 outputs at a time, every token's inputs broadcast against it:
//     1.4x the rows loop's speed from 64 tokens. From about 256 tokens a call oneDNN's
//     saturating instruction is level, and faster beyond (bench/int8_gemm.py).
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

// tokens rows of x (x_row apart) as int16, k apart: widened once a block, read by every tile
std::vector<int16_t> widened(const int8_t* x, int64_t x_row, int64_t tokens, int64_t k) {
    std::vector<int16_t> x16(tokens * k);
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = 0; i < k; ++i) x16[t * k + i] = x[t * x_row + i];
    return x16;
}

// one output from its exact sum: the two float32 products in oneDNN's and vLLM's order,
// then the bias (the panels loop's vector epilogue takes the same steps 8 at a time)
inline float scaled(int32_t sum, float w_scale, float token_scale, const float* bias) {
    float v = static_cast<float>(sum) * w_scale;
    v = v * token_scale;
    if (bias) v = v + *bias;
    return v;
}

void gemm(int64_t m, int64_t n, int64_t k, const int8_t* x, int64_t x_row,
          const float* x_scales, const int8_t* w, const float* w_scales, const float* bias,
          float* y, int64_t y_row, int threads) {
    for (int64_t t0 = 0; t0 < m; t0 += kBlockTokens) {
        const int64_t tokens = m - t0 < kBlockTokens ? m - t0 : kBlockTokens;
        const std::vector<int16_t> x16 = widened(x + t0 * x_row, x_row, tokens, k);
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
                        out[r] = scaled(sums[c][r], w_scales[r0 + r], token_scale,
                                        bias ? bias + r0 + r : nullptr);
                    }
                }
            }
        }
    }
}

// From kPanelsFrom tokens a call (prefill; decode of many streams), the weight is taken
// 32 outputs (a panel) at a time and widened once into int16 pairs laid out output by
// output; each token's pair of inputs is broadcast and multiplied against 4 vectors of 8
// outputs. The sums come out in the outputs' order (no horizontal sums) and nothing is
// widened in the inner loop. Two tokens at a time: 8 accumulators, 4 weight vectors and 2
// broadcasts in registers.
constexpr int kPanelColumns = 32;
constexpr int64_t kPanelBlockTokens = 256;  // tokens widened together (a panel packed once a block)
constexpr int64_t kChunkPairs = 128;  // pairs of inputs a chunk: 32 x 128 int16 pairs, 16 KB (L1)
constexpr int64_t kPanelsFrom = 16;  // tokens a call from which path 0 takes panels (measured)

// 8 vectors of 8 int32 each, transposed in place: r[j][i] becomes r[i][j]
inline void transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
        r[j + 4] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
    }
}

// panel[p * 32 + c] = the int16 pair (w[n0 + c][2p], w[n0 + c][2p + 1]) as one int32,
// zeros for c >= columns (the last panel of an n that is not a multiple of 32)
void pack(const int8_t* w, int64_t k, int64_t n0, int columns, int32_t* panel) {
    for (int v = 0; v < kPanelColumns / 8; ++v) {
        for (int64_t i = 0; i < k; i += 16) {  // 8 pairs of 8 outputs
            __m256i r[8];
            for (int c = 0; c < 8; ++c) {
                const int column = v * 8 + c;
                r[c] = column < columns
                           ? _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                 reinterpret_cast<const __m128i*>(w + (n0 + column) * k + i)))
                           : _mm256_setzero_si256();
            }
            transpose8(r);
            for (int j = 0; j < 8; ++j)
                _mm256_storeu_si256(
                    reinterpret_cast<__m256i*>(panel + (i / 2 + j) * kPanelColumns + v * 8), r[j]);
        }
    }
}

// sums[c] = acc's 8 * v + c (first), or += it
inline void keep(const __m256i acc[4], int32_t* sums, bool first) {
    for (int v = 0; v < 4; ++v) {
        __m256i* out = reinterpret_cast<__m256i*>(sums + v * 8);
        _mm256_store_si256(out, first ? acc[v] : _mm256_add_epi32(acc[v], _mm256_load_si256(out)));
    }
}

// sums[t][c] (+)= token t's inputs . the panel's output c over ``pairs`` pairs of inputs,
// for two tokens whose pairs lie x_row apart; the sums start at zero where ``first``.
// Written in assembly: GCC 12 moved each of the 8 accumulators through a second register
// every step (8 instructions more in 22); this loop is 5-8% faster at 1,024 tokens.
__attribute__((noinline)) void panel_pair(const int32_t* x_pairs, int64_t x_row,
                                          const int32_t* panel, int64_t pairs,
                                          int32_t (*sums)[kPanelColumns], bool first) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t p = 0; p < pairs; ++p) {
        __m256i w0, w1, w2, w3, x0, x1, product;
        asm("vmovdqa (%[w]), %[w0]\n\t"
            "vmovdqa 32(%[w]), %[w1]\n\t"
            "vmovdqa 64(%[w]), %[w2]\n\t"
            "vmovdqa 96(%[w]), %[w3]\n\t"
            "vpbroadcastd (%[xa]), %[x0]\n\t"
            "vpbroadcastd (%[xb]), %[x1]\n\t"
            "vpmaddwd %[w0], %[x0], %[t]\n\t"
            "vpaddd %[t], %[a0], %[a0]\n\t"
            "vpmaddwd %[w1], %[x0], %[t]\n\t"
            "vpaddd %[t], %[a1], %[a1]\n\t"
            "vpmaddwd %[w2], %[x0], %[t]\n\t"
            "vpaddd %[t], %[a2], %[a2]\n\t"
            "vpmaddwd %[w3], %[x0], %[t]\n\t"
            "vpaddd %[t], %[a3], %[a3]\n\t"
            "vpmaddwd %[w0], %[x1], %[t]\n\t"
            "vpaddd %[t], %[b0], %[b0]\n\t"
            "vpmaddwd %[w1], %[x1], %[t]\n\t"
            "vpaddd %[t], %[b1], %[b1]\n\t"
            "vpmaddwd %[w2], %[x1], %[t]\n\t"
            "vpaddd %[t], %[b2], %[b2]\n\t"
            "vpmaddwd %[w3], %[x1], %[t]\n\t"
            "vpaddd %[t], %[b3], %[b3]\n\t"
            : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3),
              [b0] "+x"(b0), [b1] "+x"(b1), [b2] "+x"(b2), [b3] "+x"(b3),
              [w0] "=&x"(w0), [w1] "=&x"(w1), [w2] "=&x"(w2), [w3] "=&x"(w3),
              [x0] "=&x"(x0), [x1] "=&x"(x1), [t] "=&x"(product)
            : [w] "r"(panel + p * kPanelColumns), [xa] "r"(x_pairs + p),
              [xb] "r"(x_pairs + x_row + p)
            : "memory");
    }
    const __m256i first_token[4] = {a0, a1, a2, a3}, second_token[4] = {b0, b1, b2, b3};
    keep(first_token, sums[0], first);
    keep(second_token, sums[1], first);
}

// the same for one token (an odd block's last)
void panel_one(const int32_t* x_pairs, const int32_t* panel, int64_t pairs, int32_t* sums,
               bool first) {
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
    for (int64_t p = 0; p < pairs; ++p) {
        const __m256i x0 = _mm256_set1_epi32(x_pairs[p]);
        const __m256i* wp = reinterpret_cast<const __m256i*>(panel + p * kPanelColumns);
        for (int v = 0; v < 4; ++v)
            acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(x0, _mm256_load_si256(wp + v)));
    }
    keep(acc, sums, first);
}

void gemm_panels(int64_t m, int64_t n, int64_t k, const int8_t* x, int64_t x_row,
                 const float* x_scales, const int8_t* w, const float* w_scales,
                 const float* bias, float* y, int64_t y_row, int threads) {
    const int64_t panels = (n + kPanelColumns - 1) / kPanelColumns;
    const int64_t pairs = k / 2;
    for (int64_t t0 = 0; t0 < m; t0 += kPanelBlockTokens) {
        const int64_t tokens = m - t0 < kPanelBlockTokens ? m - t0 : kPanelBlockTokens;
        const std::vector<int16_t> x16 = widened(x + t0 * x_row, x_row, tokens, k);
        const int32_t* x_pairs = reinterpret_cast<const int32_t*>(x16.data());
#pragma omp parallel num_threads(threads) if (threads > 1 && panels >= 2 * threads)
        {
            struct alignas(32) Sums { int32_t of[kPanelColumns]; };
            std::vector<Sums> panel_memory(pairs), rows(tokens);  // 32-byte aligned
            int32_t* panel = panel_memory.front().of;
            auto sums = reinterpret_cast<int32_t (*)[kPanelColumns]>(rows.data());
#pragma omp for schedule(static)
            for (int64_t b = 0; b < panels; ++b) {
                const int64_t n0 = b * kPanelColumns;
                const int columns =
                    n - n0 < kPanelColumns ? static_cast<int>(n - n0) : kPanelColumns;
                pack(w, k, n0, columns, panel);
                // a chunk of the panel stays in L1 while every token of the block passes it
                for (int64_t p0 = 0; p0 < pairs; p0 += kChunkPairs) {
                    const int64_t chunk = pairs - p0 < kChunkPairs ? pairs - p0 : kChunkPairs;
                    const int32_t* part = panel + p0 * kPanelColumns;
                    int64_t t = 0;
                    for (; t + 2 <= tokens; t += 2)
                        panel_pair(x_pairs + t * pairs + p0, pairs, part, chunk, sums + t, p0 == 0);
                    if (t < tokens)
                        panel_one(x_pairs + t * pairs + p0, part, chunk, sums[t], p0 == 0);
                }
                for (int64_t t = 0; t < tokens; ++t) {
                    float* out = y + (t0 + t) * y_row + n0;
                    const float token_scale = x_scales[t0 + t];
                    int j = 0;
                    if (columns == kPanelColumns) {
                        const __m256 scale = _mm256_set1_ps(token_scale);
                        for (; j < kPanelColumns; j += 8) {
                            __m256 v = _mm256_cvtepi32_ps(
                                _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[t] + j)));
                            v = _mm256_mul_ps(v, _mm256_loadu_ps(w_scales + n0 + j));
                            v = _mm256_mul_ps(v, scale);
                            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0 + j));
                            _mm256_storeu_ps(out + j, v);
                        }
                    }
                    for (; j < columns; ++j) {
                        out[j] = scaled(sums[t][j], w_scales[n0 + j], token_scale,
                                        bias ? bias + n0 + j : nullptr);
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
int zoo_int8_abi() { return 2; }

// Whether this build has the AVX2 GEMM (0: zoo_int8_gemm declines every call).
int zoo_int8_avx2() {
#ifdef ZOO_INT8_AVX2
    return 1;
#else
    return 0;
#endif
}

// See the top of this file. k must be a multiple of 16. path: 0 picks by m (rows below
// kPanelsFrom tokens, panels from it), 1 rows, 2 panels (for the benchmark and the
// tests). Returns 0; 1 for a k or path it does not take, 2 without AVX2 (y untouched).
int zoo_int8_gemm(int64_t m, int64_t n, int64_t k, const int8_t* x, int64_t x_row,
                  const float* x_scales, const int8_t* w, const float* w_scales,
                  const float* bias, float* y, int64_t y_row, int threads, int path) {
#ifdef ZOO_INT8_AVX2
    if (k % 16 != 0 || k <= 0 || path < 0 || path > 2) return 1;
    if (path == 2 || (path == 0 && m >= kPanelsFrom))
        gemm_panels(m, n, k, x, x_row, x_scales, w, w_scales, bias, y, y_row, threads);
    else
        gemm(m, n, k, x, x_row, x_scales, w, w_scales, bias, y, y_row, threads);
    return 0;
#else
    return 2;
#endif
}

}
