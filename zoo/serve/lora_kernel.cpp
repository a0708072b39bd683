// zoo's multi-LoRA kernel for the CPU (every step with adapters, decode and prefill), and
// what it reads of a slot vLLM has just written (its int8 rows, its rank: zoo_quantize_rows,
// zoo_row_ranks); built and loaded by zoo/serve/native.py.
//
// For every row t with slot s = slots[t] >= 0 and every part (a slice of a fused layer's
// output), at the adapter's own rank r = min(part.rank, part.ranks[s]):
//   y[t, start:start+width] += scale * (x[t] @ A[s, :r].T) @ B[s, :r]
// A [slots, rank, in] and B [slots, rank, width] are read where they lie (strided over
// slots and rows, contiguous along a row); both products accumulate in float32 and the
// delta is added to y and rounded once. x and y share one dtype, A and B another: both
// bfloat16, both float32, float32 activations on bfloat16 weights (half the bytes a
// step reads where the CPU has no bf16 arithmetic and computes in float32), or int8
// weights with a float32 scale a row under either (zoo's default: half bf16's bytes).
// Where the CPU has AMX tiles, a run of eight or more rows of one adapter (a prefill)
// under bfloat16 activations goes to them (``run_on_tiles``).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ZOO_AVX512_BF16 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ZOO_AMX 1
#endif
#endif

namespace {

constexpr int64_t kMaxRank = 64;

struct Part {
    int64_t slots;                                // slots in A, B and ranks
    const void* a; int64_t a_slot, a_row;         // A: [slots, rank, in]
    const void* b; int64_t b_slot, b_row, width;  // B: [slots, rank, width]
    int64_t rank;                                 // rows of A and B to read at most
    const int64_t* ranks;                         // each slot's own rank (or null)
    int64_t start;                                // first output column
    // int8 weights only: each row's scale, [slots, scale_slot] for A and for B (the
    // weight is the int8 number times its row's scale); null for floating-point weights
    const float* a_scales; const float* b_scales; int64_t scale_slot;
};

struct Bf16 { uint16_t bits; };

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return float(v); }
inline float to_float(Bf16 v) {
    const uint32_t bits = uint32_t(v.bits) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}
inline void store(float* at, float v) { *at = v; }
inline void store(Bf16* at, float v) {  // round to nearest even, as torch does
    if (std::isnan(v)) { at->bits = 0x7fc0; return; }
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    at->bits = uint16_t(bits >> 16);
}

// The first row of a slot's A or B (``stride``: elements from one slot to the next).
template <typename T>
inline const T* slot_rows(const void* stack, int64_t slot, int64_t stride) {
    return static_cast<const T*>(stack) + slot * stride;
}

// The scales of ``slot``'s rows of A or B (null: floating-point weights, scale 1).
inline const float* row_scales(const float* scales, const Part& part, int64_t slot) {
    return scales ? scales + slot * part.scale_slot : nullptr;
}

inline int64_t rank_of(const Part& part, int64_t slot) {
    const int64_t own = part.ranks ? part.ranks[slot] : part.rank;
    return own < part.rank ? own : part.rank;
}

// One slot's rows of a part: its rank, A's and B's first rows and their row scales.
template <typename W>
struct SlotRows {
    int64_t rank;
    const W* a;
    const W* b;
    const float* a_scales;
    const float* b_scales;
};

template <typename W>
inline SlotRows<W> rows_of(const Part& part, int64_t slot) {
    return {rank_of(part, slot), slot_rows<W>(part.a, slot, part.a_slot),
            slot_rows<W>(part.b, slot, part.b_slot), row_scales(part.a_scales, part, slot),
            row_scales(part.b_scales, part, slot)};
}

// The next row's adapter weights, asked for a cache line at a time while this row
// computes. Each row's adapter lies elsewhere, in runs of a few KB that cross 4 KB pages,
// where the hardware prefetchers barely start: in a decode step of 64 adapters the kernel
// waited on memory for most of its time. Asking for all of the next row's lines at once
// (about 500 for a q/v adapter) fills the core's queue of misses and stalls it; spread
// over this row's loads, a line asked for each line read, they arrive in time. They are
// asked into L2 (prefetcht1), not L1: an L1 prefetch holds one of the core's few L1 fill
// buffers until its line arrives, an L2 one a slot of the larger L2 queue, so more lines
// are on their way at once (a decode step of 64 adapters alone: 6.5 -> 5.7 ms on this
// Xeon, the stacks in 2 MB pages).
class Ahead {
 public:
    // The lines of ``slot``'s rows of A and B (of type W) in every part (nothing for slot < 0).
    template <typename W>
    void plan(int64_t slot, int64_t in, const Part* parts, int64_t n_parts) {
        if (slot < 0) return;
        for (int64_t p = 0; p < n_parts; ++p) {
            const Part& part = parts[p];
            const int64_t rank = rank_of(part, slot);
            if (rank == 0) continue;
            add(slot_rows<W>(part.a, slot, part.a_slot),
                ((rank - 1) * part.a_row + in) * sizeof(W));
            add(slot_rows<W>(part.b, slot, part.b_slot),
                ((rank - 1) * part.b_row + part.width) * sizeof(W));
            if (part.a_scales) {  // int8 rows: their scales, a line each, read after A
                add(row_scales(part.a_scales, part, slot), rank * int64_t(sizeof(float)));
                add(row_scales(part.b_scales, part, slot), rank * int64_t(sizeof(float)));
            }
        }
    }
    // Ask for the next ``lines`` lines.
    inline void issue(int64_t lines) {
        for (; lines > 0 && next_ < count_; --lines) {
            __builtin_prefetch(at_[next_], 0, 2);
            at_[next_] += kLine;
            if (at_[next_] >= end_[next_]) ++next_;
        }
    }
    void rest() { issue(INT64_MAX); }

 private:
    static constexpr int kRuns = 16;  // a fused layer's parts, up to 4 runs each; more: not asked
    static constexpr int64_t kLine = 64;
    void add(const void* start, int64_t bytes) {
        if (count_ == kRuns) return;
        at_[count_] = static_cast<const char*>(start);
        end_[count_] = at_[count_] + bytes;
        ++count_;
    }
    const char* at_[kRuns];
    const char* end_[kRuns];
    int count_ = 0, next_ = 0;
};

// Any dtypes, any CPU: plain loops the compiler vectorizes (X: x and y, W: A and B). Not
// inlined: inside run's OpenMP region GCC 12 left the shrink's reduction a scalar loop (5x
// slower in float32).
template <typename X, typename W>
__attribute__((noinline)) void token_portable(const X* x, X* y, int64_t slot, int64_t in,
                                              const Part* parts, int64_t n_parts, float scale,
                                              float* xf, Ahead& ahead) {
    constexpr int64_t kPerLine = 64 / int64_t(sizeof(W));
    for (int64_t k = 0; k < in; ++k) xf[k] = to_float(x[k]);
    for (int64_t p = 0; p < n_parts; ++p) {
        const Part& part = parts[p];
        const auto [rank, a, b, a_scales, b_scales] = rows_of<W>(part, slot);
        float h[kMaxRank];
        int64_t r = 0;
        for (; r + 4 <= rank; r += 4) {
            const W* row = a + r * part.a_row;
            const int64_t step = part.a_row;
            ahead.issue(4 * ((in + kPerLine - 1) / kPerLine));
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t k = 0; k < in; ++k) {
                const float xk = xf[k];
                s0 += xk * to_float(row[k]);
                s1 += xk * to_float(row[step + k]);
                s2 += xk * to_float(row[2 * step + k]);
                s3 += xk * to_float(row[3 * step + k]);
            }
            h[r] = s0 * scale;
            h[r + 1] = s1 * scale;
            h[r + 2] = s2 * scale;
            h[r + 3] = s3 * scale;
        }
        for (; r < rank; ++r) {
            const W* row = a + r * part.a_row;
            ahead.issue((in + kPerLine - 1) / kPerLine);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t k = 0; k < in; ++k) sum += xf[k] * to_float(row[k]);
            h[r] = sum * scale;
        }
        if (a_scales)  // int8 rows (with B's scales too)
            for (r = 0; r < rank; ++r) h[r] *= a_scales[r] * b_scales[r];
        constexpr int64_t kChunk = 256;
        X* out = y + part.start;
        for (int64_t j0 = 0; j0 < part.width && rank > 0; j0 += kChunk) {
            const int64_t n = part.width - j0 < kChunk ? part.width - j0 : kChunk;
            float delta[kChunk] = {};
            ahead.issue(rank * ((n + kPerLine - 1) / kPerLine));
            for (int64_t r = 0; r < rank; ++r) {
                const W* row = b + r * part.b_row + j0;
                const float hr = h[r];
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) delta[j] += hr * to_float(row[j]);
            }
            for (int64_t j = 0; j < n; ++j) store(out + j0 + j, to_float(out[j0 + j]) + delta[j]);
        }
    }
    ahead.rest();
}

#ifdef ZOO_AVX512_BF16
// bfloat16 with AVX-512 BF16: the shrink as dot products of bf16 pairs (vdpbf16ps), up to
// eight rows of A against one read of x; the expand 32 columns at a time, every row of B
// into two float32 registers (even and odd columns), then added to y and rounded
// (vcvtne2ps2bf16) once.
template <int N>
inline void shrink_rows(const uint16_t* x, const uint16_t* a, int64_t a_row, int64_t in,
                        float scale, float* h, Ahead& ahead) {
    __m512 acc[N];
    for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= in; k += 32) {
        ahead.issue(N);  // a line of the next row's weights for each line of A read
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
        for (int r = 0; r < N; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(a + r * a_row + k));
    }
    if (k < in) {
        const __mmask32 m = (__mmask32)((1ull << (in - k)) - 1);
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
        for (int r = 0; r < N; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], xv,
                                      (__m512bh)_mm512_maskz_loadu_epi16(m, a + r * a_row + k));
    }
    for (int r = 0; r < N; ++r) h[r] = _mm512_reduce_add_ps(acc[r]) * scale;
}

// 32 bfloat16 -> float32: the even-numbered ones (the low half of each 32-bit pair,
// shifted up) and the odd-numbered ones (the high half, the low one masked off): two
// simple integer operations for 32 numbers, where widening 16 took a shuffle and a shift
// (a decode step of 64 adapters in cache 2.8 -> 2.35 ms; the same bits).
inline __m512 evens(__m512i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16)); }
inline __m512 odds(__m512i bf16) {
    return _mm512_castsi512_ps(_mm512_and_si512(bf16, _mm512_set1_epi32(int(0xffff0000u))));
}

// Round evens and odds to bfloat16 (nearest even, as vcvtneps2bf16 does) and put each
// back in its place: column 2i from evens[i], 2i + 1 from odds[i].
inline __m512i interleave(__m512 even, __m512 odd) {
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // evens, then odds
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                           25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                           18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, halves);
}

void token_bf16(const uint16_t* x, uint16_t* y, int64_t slot, int64_t in, const Part* parts,
                int64_t n_parts, float scale, Ahead& ahead) {
    for (int64_t p = 0; p < n_parts; ++p) {
        const Part& part = parts[p];
        const auto [rank, a, b, a_scales, b_scales] = rows_of<uint16_t>(part, slot);
        float h[kMaxRank];
        int64_t r = 0;
        for (; r + 8 <= rank; r += 8) shrink_rows<8>(x, a + r * part.a_row, part.a_row, in, scale, h + r, ahead);
        for (; r + 4 <= rank; r += 4) shrink_rows<4>(x, a + r * part.a_row, part.a_row, in, scale, h + r, ahead);
        for (; r < rank; ++r) shrink_rows<1>(x, a + r * part.a_row, part.a_row, in, scale, h + r, ahead);
        if (a_scales)  // widened int8 rows
            for (r = 0; r < rank; ++r) h[r] *= a_scales[r] * b_scales[r];
        uint16_t* out = y + part.start;
        for (int64_t j = 0; j < part.width && rank > 0; j += 32) {
            const int64_t n = part.width - j < 32 ? part.width - j : 32;
            const __mmask32 m = (__mmask32)((n == 32 ? 0ull : 1ull << n) - 1);
            __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
            ahead.issue(rank);  // rank rows of 64 bytes
            for (int64_t q = 0; q < rank; ++q) {
                const __m512i row = _mm512_maskz_loadu_epi16(m, b + q * part.b_row + j);
                const __m512 hq = _mm512_set1_ps(h[q]);
                even = _mm512_fmadd_ps(hq, evens(row), even);
                odd = _mm512_fmadd_ps(hq, odds(row), odd);
            }
            const __m512i now = _mm512_maskz_loadu_epi16(m, out + j);
            _mm512_mask_storeu_epi16(out + j, m, interleave(_mm512_add_ps(evens(now), even),
                                                            _mm512_add_ps(odds(now), odd)));
        }
    }
    ahead.rest();
}

// int8 weights with bfloat16 activations (``token_bf16_i8``): x widened to float32 once a
// token; the shrink up to eight rows of A at a time, 16 int8 numbers widened to float32
// per multiply-add; the expand 64 columns at a time, B's row scales folded into h; y
// widened, added to and rounded once. Half the bytes of bfloat16 weights to read.
inline __m512 widen_i8(const int8_t* at, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, at)));
}

inline __mmask16 first(int64_t n) { return (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1); }

// 16 int8 numbers as float32, read whole (no mask: every row but a tail's).
inline __m512 widen16(const int8_t* at) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
}

// A line (64 inputs) of N rows at a time with plain loads, then the tail masked (a mask
// was worked out and applied for every 16 numbers, where only a tail needs one).
template <int N>
inline void shrink_rows_i8(const float* x, const int8_t* a, int64_t a_row, int64_t in,
                           float* h, Ahead& ahead) {
    __m512 acc[N];
    for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= in; k += 64) {
        ahead.issue(N);  // a line of the next row's weights per line read
        for (int64_t c = k; c < k + 64; c += 16) {
            const __m512 xv = _mm512_loadu_ps(x + c);
            for (int r = 0; r < N; ++r) acc[r] = _mm512_fmadd_ps(xv, widen16(a + r * a_row + c), acc[r]);
        }
    }
    if (k < in) ahead.issue(N);
    for (; k < in; k += 16) {
        const __mmask16 m = first(in - k);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int r = 0; r < N; ++r) acc[r] = _mm512_fmadd_ps(xv, widen_i8(a + r * a_row + k, m), acc[r]);
    }
    for (int r = 0; r < N; ++r) h[r] = _mm512_reduce_add_ps(acc[r]);
}

// y[0, width) += h . B (rank rows of int8 B), 64 columns at a time: four sums that do not
// wait on each other (one sum's rank multiply-adds in a row waited on each one's latency),
// each row's address and h's broadcast made once; the tail 16 at a time, masked.
inline void expand_i8(const float* h, int64_t rank, const int8_t* b, int64_t b_row,
                      int64_t width, uint16_t* y, Ahead& ahead) {
    const int8_t* rows[kMaxRank];
    __m512 hs[kMaxRank];
    for (int64_t q = 0; q < rank; ++q) {
        rows[q] = b + q * b_row;
        hs[q] = _mm512_set1_ps(h[q]);
    }
    int64_t j = 0;
    for (; j + 64 <= width; j += 64) {
        ahead.issue(rank);  // rank rows of 64 bytes
        __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                          _mm512_setzero_ps()};
        for (int64_t q = 0; q < rank; ++q)
            for (int c = 0; c < 4; ++c)
                sums[c] = _mm512_fmadd_ps(hs[q], widen16(rows[q] + j + 16 * c), sums[c]);
        for (int c = 0; c < 4; ++c) {
            auto* at = reinterpret_cast<__m256i*>(y + j + 16 * c);
            const __m512 now = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(at));
            _mm256_storeu_si256(at, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(now, sums[c])));
        }
    }
    if (j < width) ahead.issue(rank);
    for (; j < width; j += 16) {
        const __mmask16 m = first(width - j);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t q = 0; q < rank; ++q) sum = _mm512_fmadd_ps(hs[q], widen_i8(rows[q] + j, m), sum);
        const __m512 now = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, y + j));
        _mm256_mask_storeu_epi16(y + j, m, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(now, sum)));
    }
}

void token_bf16_i8(const uint16_t* x, uint16_t* y, int64_t slot, int64_t in, const Part* parts,
                   int64_t n_parts, float scale, float* xf, Ahead& ahead) {
    for (int64_t k = 0; k < in; k += 16) {
        const __mmask16 m = first(in - k);
        const __m256i bits = _mm256_maskz_loadu_epi16(m, x + k);
        _mm512_mask_storeu_ps(xf + k, m, _mm512_cvtpbh_ps((__m256bh)bits));
    }
    for (int64_t p = 0; p < n_parts; ++p) {
        const Part& part = parts[p];
        const auto [rank, a, b, a_scales, b_scales] = rows_of<int8_t>(part, slot);
        if (rank == 0) continue;  // y untouched
        float h[kMaxRank];
        int64_t r = 0;
        for (; r + 8 <= rank; r += 8) shrink_rows_i8<8>(xf, a + r * part.a_row, part.a_row, in, h + r, ahead);
        for (; r + 4 <= rank; r += 4) shrink_rows_i8<4>(xf, a + r * part.a_row, part.a_row, in, h + r, ahead);
        for (; r < rank; ++r) shrink_rows_i8<1>(xf, a + r * part.a_row, part.a_row, in, h + r, ahead);
        for (r = 0; r < rank; ++r) h[r] *= scale * a_scales[r] * b_scales[r];
        expand_i8(h, rank, b, part.b_row, part.width, y + part.start, ahead);
    }
    ahead.rest();
}

// int8 numbers as bfloat16: exact (they need 8 bits), 16 at a time.
inline void widen_row(const int8_t* from, uint16_t* to, int64_t n) {
    for (int64_t k = 0; k < n; k += 16) {
        const __mmask16 m = first(n - k);
        _mm256_mask_storeu_epi16(to + k, m, (__m256i)_mm512_cvtneps_pbh(widen_i8(from + k, m)));
    }
}

// One slot's int8 rows of every part widened to bfloat16, for the tokens of a run of one
// adapter that does not go to the tiles (shorter than kAmxRun, a rank over 32, or no AMX:
// see run_on_tiles): they then take token_bf16's dot products of bf16 pairs, twice the
// numbers an instruction of the int8 path's, where the arithmetic, not memory, bounds the
// step (a prefill of 45 tokens reads an adapter once and multiplies it 45 times). Made
// once a run, a few KB, kept in this thread's cache.
struct Widened {
    std::vector<uint16_t> rows;
    std::vector<Part> parts;
    int64_t slot = -1;

    const Part* of(int64_t want, const Part* from, int64_t n_parts, int64_t in) {
        if (want == slot) return parts.data();
        slot = want;
        int64_t total = 0;
        for (int64_t p = 0; p < n_parts; ++p) total += rank_of(from[p], want) * (in + from[p].width);
        rows.resize(total);
        parts.assign(from, from + n_parts);
        uint16_t* at = rows.data();
        for (int64_t p = 0; p < n_parts; ++p) {
            const Part& part = from[p];
            const auto [rank, a, b, a_scales, b_scales] = rows_of<int8_t>(part, want);
            Part& wide = parts[p];
            wide.slots = 1;
            wide.a = at; wide.a_slot = 0; wide.a_row = in;
            for (int64_t r = 0; r < rank; ++r) widen_row(a + r * part.a_row, at + r * in, in);
            at += rank * in;
            wide.b = at; wide.b_slot = 0; wide.b_row = part.width;
            for (int64_t r = 0; r < rank; ++r) widen_row(b + r * part.b_row, at + r * part.width, part.width);
            at += rank * part.width;
            wide.rank = rank; wide.ranks = nullptr;
            wide.a_scales = a_scales;
            wide.b_scales = b_scales;
            wide.scale_slot = 0;
        }
        return parts.data();
    }
};
#endif

#ifdef ZOO_AMX
// Runs of one adapter's rows (a prefill: 45 tokens of the bench's chat prompts) on AMX
// tiles, where the CPU has them (Sapphire Rapids and later Xeons). AVX-512's multiply-adds
// bound such a run: a token's q/v rank-8 shrink and expand are about 670 vector
// instructions a layer, 0.7-0.9 ns each on this Xeon's vCPU. A tile's dot product of bf16
// pairs (tdpbf16ps) does 16 tokens x 16 outputs x 32 inputs at once.
//   shrink: h [16 tokens, 16 rows of A] += x [16 tokens, 32] . A packed (16 pairs of
//           inputs, each of A's 16 rows' two numbers), 32 inputs a step;
//   h times the scale (and the int8 rows' scales), rounded to bf16 (vLLM's own CPU path
//   rounds h to the weights' dtype too);
//   expand: delta [16 tokens, 16 columns] = h [16 tokens, rank] . B packed (rank / 2
//           pairs of B's rows, each of 16 columns' two numbers), added to y, rounded once.
// Tile registers: 0 the shrink's sums, 1 x, 2 A packed; 3 the expand's sums, 4 h, 5 B
// packed (its rows and h's width set for the run's rank).
constexpr int64_t kAmxRun = 8;        // runs this long or longer go to the tiles
constexpr int64_t kAmxMaxRank = 32;   // one tile step of the expand

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Linux lends a process the tiles' state only when asked (arch_prctl, XTILEDATA); asked
// once. False: the AVX-512 path.
bool tiles_allowed() {
    static const bool allowed = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
    return allowed;
}

// One thread's tile configuration: set for ``pairs`` pairs of h's bf16 numbers (the run's
// rank, rounded up, halved), released at the end.
class Tiles {
 public:
    void set(int pairs) {
        if (pairs == pairs_) return;
        TileConfig config;
        for (int i = 0; i < 4; ++i) {
            config.rows[i] = 16;
            config.colsb[i] = 64;
        }
        config.rows[4] = 16;
        config.colsb[4] = uint16_t(4 * pairs);
        config.rows[5] = uint8_t(pairs);
        config.colsb[5] = 64;
        _tile_loadconfig(&config);
        pairs_ = pairs;
    }
    ~Tiles() {
        if (pairs_) _tile_release();
    }

 private:
    int pairs_ = 0;
};

// 32 numbers of a row of A (int8 or bf16) from ``at``, ``n`` of them there (the rest 0),
// as bf16: 16 pairs.
inline __m512i pairs_of(const int8_t* at, int64_t n) {
    const __mmask16 lo = first(n), hi = n > 16 ? first(n - 16) : 0;
    return (__m512i)_mm512_cvtne2ps_pbh(widen_i8(at + 16, hi), widen_i8(at, lo));
}
inline __m512i pairs_of(const Bf16* at, int64_t n) {
    return _mm512_maskz_loadu_epi16(n >= 32 ? ~__mmask32(0) : (__mmask32)((1ull << n) - 1), at);
}

// 16 numbers of a row of B from ``at``, ``n`` of them there (the rest 0), as float32.
inline __m512 wide_of(const int8_t* at, int64_t n) { return widen_i8(at, first(n)); }
inline __m512 wide_of(const Bf16* at, int64_t n) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(first(n), at));
}

// rows[i] word j -> rows[j] word i, for 16 rows of 16 32-bit words (each word a pair of
// bf16): unpack pairs of rows, then pairs of pairs, then the 128-bit lanes of four.
inline void transpose_words(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    __m512i c[4][4];  // c[rows 4R..4R+3][o]: each lane L holds those rows' word 4L + o
    for (int R = 0; R < 4; ++R) {
        c[R][0] = _mm512_unpacklo_epi64(t[4 * R], t[4 * R + 2]);
        c[R][1] = _mm512_unpackhi_epi64(t[4 * R], t[4 * R + 2]);
        c[R][2] = _mm512_unpacklo_epi64(t[4 * R + 1], t[4 * R + 3]);
        c[R][3] = _mm512_unpackhi_epi64(t[4 * R + 1], t[4 * R + 3]);
    }
    for (int o = 0; o < 4; ++o) {
        const __m512i y0 = _mm512_shuffle_i32x4(c[0][o], c[1][o], 0x44);
        const __m512i y1 = _mm512_shuffle_i32x4(c[0][o], c[1][o], 0xee);
        const __m512i y2 = _mm512_shuffle_i32x4(c[2][o], c[3][o], 0x44);
        const __m512i y3 = _mm512_shuffle_i32x4(c[2][o], c[3][o], 0xee);
        r[o] = _mm512_shuffle_i32x4(y0, y2, 0x88);
        r[4 + o] = _mm512_shuffle_i32x4(y0, y2, 0xdd);
        r[8 + o] = _mm512_shuffle_i32x4(y1, y3, 0x88);
        r[12 + o] = _mm512_shuffle_i32x4(y1, y3, 0xdd);
    }
}

// A tile's row: 16 words, each a pair of bf16.
struct alignas(64) Line {
    uint32_t words[16];
};

// One part of one slot's adapter, packed for the tiles.
struct PackedPart {
    int64_t rank, pairs, groups, steps;  // groups of 16 rows of A, steps of 32 inputs
    std::vector<Line> a;  // [group][step][16 pairs of inputs]: each of 16 rows' pair
    std::vector<Line> b;  // [16-column chunk][pairs of rows]: each of 16 columns' pair
    const float* a_scales;
    const float* b_scales;
    int64_t start, width;

    template <typename W>
    void pack(const Part& part, int64_t slot, int64_t in) {
        const auto [own, a_rows, b_rows, as, bs] = rows_of<W>(part, slot);
        rank = own;
        pairs = (rank + 1) / 2;
        groups = (rank + 15) / 16;
        steps = (in + 31) / 32;
        a_scales = as;
        b_scales = bs;
        start = part.start;
        width = part.width;
        a.resize(groups * steps * 16);
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t s = 0; s < steps; ++s) {
                __m512i rows[16];
                for (int64_t r = 0; r < 16; ++r)
                    rows[r] = g * 16 + r < rank
                                  ? pairs_of(a_rows + (g * 16 + r) * part.a_row + s * 32, in - s * 32)
                                  : _mm512_setzero_si512();
                transpose_words(rows);
                for (int64_t k = 0; k < 16; ++k) _mm512_store_si512(&a[(g * steps + s) * 16 + k], rows[k]);
            }
        const int64_t chunks = (width + 15) / 16;
        b.resize(chunks * pairs);
        for (int64_t c = 0; c < chunks; ++c)
            for (int64_t k = 0; k < pairs; ++k) {
                const int64_t n = width - c * 16;
                const __m512 even = wide_of(b_rows + 2 * k * part.b_row + c * 16, n);
                const __m512 odd = 2 * k + 1 < rank
                                       ? wide_of(b_rows + (2 * k + 1) * part.b_row + c * 16, n)
                                       : _mm512_setzero_ps();
                _mm512_store_si512(&b[c * pairs + k], interleave(even, odd));
            }
    }
};

// Whether every part of ``slot`` fits the tiles' path.
inline bool tiles_take(const Part* parts, int64_t n_parts, int64_t slot) {
    for (int64_t p = 0; p < n_parts; ++p)
        if (rank_of(parts[p], slot) > kAmxMaxRank) return false;
    return true;
}

// Rows [0, count) of one adapter's run (x and y at their first row), 16 at a time.
template <typename W>
void run_on_tiles(const uint16_t* x, int64_t x_row, uint16_t* y, int64_t y_row, int64_t count,
                  int64_t slot, int64_t in, const Part* parts, int64_t n_parts, float scale,
                  std::vector<PackedPart>& packed, Tiles& tiles) {
    packed.resize(n_parts);
    for (int64_t p = 0; p < n_parts; ++p) packed[p].pack<W>(parts[p], slot, in);
    const int64_t steps = (in + 31) / 32;
    const bool whole_steps = in % 32 == 0;
    alignas(64) uint16_t x_tail[16 * 32];  // a short tile's rows, or the inputs past the last 32
    alignas(64) float sums[16 * 16];
    alignas(64) uint16_t h[16 * 32];
    for (int64_t t0 = 0; t0 < count; t0 += 16) {
        const int64_t m = count - t0 < 16 ? count - t0 : 16;
        const uint16_t* xt = x + t0 * x_row;
        for (const PackedPart& part : packed) {
            if (part.rank == 0) continue;
            tiles.set(int(part.pairs));
            std::memset(h, 0, sizeof h);
            for (int64_t g = 0; g < part.groups; ++g) {
                _tile_zero(0);
                for (int64_t s = 0; s < steps; ++s) {
                    if (m == 16 && (whole_steps || s + 1 < steps)) {
                        _tile_loadd(1, xt + s * 32, x_row * 2);
                    } else {
                        const int64_t n = in - s * 32 < 32 ? in - s * 32 : 32;
                        std::memset(x_tail, 0, sizeof x_tail);
                        for (int64_t r = 0; r < m; ++r)
                            std::memcpy(x_tail + r * 32, xt + r * x_row + s * 32, n * 2);
                        _tile_loadd(1, x_tail, 64);
                    }
                    _tile_loadd(2, &part.a[(g * steps + s) * 16], 64);
                    _tile_dpbf16ps(0, 1, 2);
                }
                _tile_stored(0, sums, 64);
                const int64_t rows = part.rank - g * 16 < 16 ? part.rank - g * 16 : 16;
                for (int64_t t = 0; t < m; ++t)
                    for (int64_t r = 0; r < rows; ++r) {
                        const int64_t q = g * 16 + r;
                        float v = sums[t * 16 + r] * scale;
                        if (part.a_scales) v *= part.a_scales[q] * part.b_scales[q];
                        Bf16 rounded;
                        store(&rounded, v);
                        h[t * 32 + q] = rounded.bits;
                    }
            }
            _tile_loadd(4, h, 64);
            for (int64_t j = 0; j < part.width; j += 16) {
                _tile_zero(3);
                _tile_loadd(5, &part.b[(j / 16) * part.pairs], 64);
                _tile_dpbf16ps(3, 4, 5);
                _tile_stored(3, sums, 64);
                const __mmask16 mask = first(part.width - j);
                for (int64_t t = 0; t < m; ++t) {
                    uint16_t* out = y + (t0 + t) * y_row + part.start + j;
                    const __m512 now = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, out));
                    const __m512 sum = _mm512_add_ps(now, _mm512_load_ps(sums + t * 16));
                    _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(sum));
                }
            }
        }
    }
}
#endif

// Whether ``slot`` is the slot of row t or of one of the rows just before it: its
// weights are then likely in cache still, and asking for them again only costs (in
// float32, where a q/v adapter's rows are 60 KB, a step of 8 adapters in turn took twice
// as long).
inline bool recent(const int64_t* slots, int64_t t, int64_t slot) {
    constexpr int64_t kRecent = 8;
    for (int64_t u = t; u >= 0 && u > t - kRecent; --u)
        if (slots[u] == slot) return true;
    return false;
}

template <typename X, typename W>
void run(int64_t tokens, const int64_t* slots, const void* x, int64_t x_row, void* y,
         int64_t y_row, int64_t in, const Part* parts, int64_t n_parts, float scale,
         int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1 && tokens >= 2 * threads)
    {
        int64_t team = 1, me = 0;  // rows [first, end) are this thread's
#ifdef _OPENMP
        team = omp_get_num_threads();
        me = omp_get_thread_num();
#endif
        const int64_t first_row = tokens * me / team, end = tokens * (me + 1) / team;
        std::vector<float> xf(in);
#ifdef ZOO_AVX512_BF16
        Widened widened;
#endif
#ifdef ZOO_AMX
        std::vector<PackedPart> packed;
        Tiles tiles;
#endif
        for (int64_t t = first_row; t < end; ++t) {
            const int64_t slot = slots[t];
            if (slot < 0) continue;
#ifdef ZOO_AMX
            if constexpr (sizeof(X) == 2) {
                if (t == first_row || slots[t - 1] != slot) {  // a run of this slot begins
                    int64_t run_end = t + 1;
                    while (run_end < end && slots[run_end] == slot) ++run_end;
                    if (run_end - t >= kAmxRun && tiles_take(parts, n_parts, slot) &&
                        tiles_allowed()) {
                        run_on_tiles<W>(static_cast<const uint16_t*>(x) + t * x_row, x_row,
                                        static_cast<uint16_t*>(y) + t * y_row, y_row,
                                        run_end - t, slot, in, parts, n_parts, scale, packed,
                                        tiles);
                        t = run_end - 1;
                        continue;
                    }
                }
            }
#endif
            Ahead ahead;
            if (t + 1 < tokens && !recent(slots, t, slots[t + 1]))
                ahead.plan<W>(slots[t + 1], in, parts, n_parts);
            const X* xt = static_cast<const X*>(x) + t * x_row;
            X* yt = static_cast<X*>(y) + t * y_row;
#ifdef ZOO_AVX512_BF16
            if constexpr (sizeof(X) == 2 && sizeof(W) == 2) {
                token_bf16(reinterpret_cast<const uint16_t*>(xt), reinterpret_cast<uint16_t*>(yt),
                           slot, in, parts, n_parts, scale, ahead);
                continue;
            }
            if constexpr (sizeof(X) == 2 && sizeof(W) == 1) {
                const auto* x16 = reinterpret_cast<const uint16_t*>(xt);
                auto* y16 = reinterpret_cast<uint16_t*>(yt);
                if ((t > 0 && slots[t - 1] == slot) || (t + 1 < tokens && slots[t + 1] == slot))
                    token_bf16(x16, y16, 0, in, widened.of(slot, parts, n_parts, in), n_parts,
                               scale, ahead);
                else
                    token_bf16_i8(x16, y16, slot, in, parts, n_parts, scale, xf.data(), ahead);
                continue;
            }
#endif
            token_portable<X, W>(xt, yt, slot, in, parts, n_parts, scale, xf.data(), ahead);
        }
    }
}

// Per-row work on a 3-D strided view [d0, d1, n] (strides in elements) of bfloat16 or
// float32 weights: the row (i, j) starts at src + i * s0 + j * s1, its numbers s2 apart.
// Loops without early exits, so that they vectorize.
struct View {
    const void* src;
    int64_t d0, d1, n, s0, s1, s2;
};

// A slot's rows widened to float32, row j at wide + j * n; read in the order of the view's
// smaller stride (B's rows are columns of vLLM's stack: [out, rank] a slot).
template <typename W>
void widen_slot(const View& v, int64_t i, float* wide) {
    const W* slot = static_cast<const W*>(v.src) + i * v.s0;
    if (v.s1 < v.s2) {
        for (int64_t k = 0; k < v.n; ++k)
            for (int64_t j = 0; j < v.d1; ++j) wide[j * v.n + k] = to_float(slot[k * v.s2 + j * v.s1]);
    } else {
        for (int64_t j = 0; j < v.d1; ++j)
            for (int64_t k = 0; k < v.n; ++k) wide[j * v.n + k] = to_float(slot[j * v.s1 + k * v.s2]);
    }
}

// The slots to do: ``slots[0..count)``, or every one (slots null).
struct Slots {
    const int64_t* slots;
    int64_t count;
    int64_t operator[](int64_t at) const { return slots ? slots[at] : at; }
};

// ``slots[0..count)`` of a view of d0 slots (null: all of them); false for one past d0.
inline bool slots_of(const int64_t* slots, int64_t count, int64_t d0, Slots& todo) {
    todo = {slots, slots ? count : d0};
    for (int64_t at = 0; slots && at < count; ++at)
        if (slots[at] < 0 || slots[at] >= d0) return false;
    return true;
}

template <typename W>
int quantize_view(const View& v, Slots todo, int8_t* numbers, float* scales) {
    std::vector<float> rows(v.d1 * v.n > 0 ? v.d1 * v.n : 1);
    for (int64_t at = 0; at < todo.count; ++at) {
        const int64_t i = todo[at];
        widen_slot<W>(v, i, rows.data());
        for (int64_t j = 0; j < v.d1; ++j) {
            const float* wide = rows.data() + j * v.n;
            // the largest magnitude as the largest of the magnitudes' bits, an integer
            // maximum, which vectorizes (a float one does not, for NaN's and -0's sake);
            // the two orders agree on finite numbers, and exponent bits all ones are odd
            uint32_t top = 0;
            for (int64_t k = 0; k < v.n; ++k) {
                uint32_t bits;
                std::memcpy(&bits, wide + k, sizeof bits);
                bits &= 0x7fffffffu;
                top = bits > top ? bits : top;
            }
            if (top >= 0x7f800000u) return 4;  // a NaN or an infinity
            float largest;
            std::memcpy(&largest, &top, sizeof largest);
            const float scale = largest / 127.f;
            const float safe = scale > 0.f ? scale : 1.f;
            int8_t* out = numbers + (i * v.d1 + j) * v.n;
            for (int64_t k = 0; k < v.n; ++k) {
                float q = std::rint(wide[k] / safe);  // nearest even, as torch.round
                q = q > 127.f ? 127.f : q;
                q = q < -127.f ? -127.f : q;
                out[k] = int8_t(int(q));
            }
            scales[i * v.d1 + j] = scale;
        }
    }
    return 0;
}

template <typename W>
void ranks_of_view(const View& v, Slots todo, int64_t* ranks) {
    for (int64_t at = 0; at < todo.count; ++at) {
        const int64_t i = todo[at];
        ranks[i] = 0;
        for (int64_t j = 0; j < v.d1; ++j) {
            const W* row = static_cast<const W*>(v.src) + i * v.s0 + j * v.s1;
            int used = 0, nan = 0;
            for (int64_t k = 0; k < v.n; ++k) {
                const float number = to_float(row[k * v.s2]);
                used |= std::fabs(number) > 0.f;
                nan |= number != number;
            }
            if (used && !nan) ranks[i] = j + 1;
        }
    }
}

}  // namespace

extern "C" {

// The layout of Part and the meaning of the arguments below; native.py checks it (a dtype
// code added keeps it: an older library declines the code, returning 2).
int zoo_lora_abi() { return 3; }

// fast_lora.quantize_rows for the rows of a View (dtype 0: bfloat16, 1: float32), of the
// slots ``slots[0..count)`` (slots null: of all d0): row (i, j) as int8 numbers
// ``numbers[(i * d1 + j) * n + k]`` times one float32 scale ``scales[i * d1 + j]``, its
// largest magnitude / 127, each number its weight / scale rounded to nearest even, clamped
// to +-127 (scale 0, numbers 0: an all-zero row); the same operations in float32 as the
// PyTorch reference, so the same bits. Returns 0; 2 for a dtype; 3 for a slot past d0; 4,
// with the outputs partly written, for a NaN or an infinity (the caller then uses the
// reference).
int zoo_quantize_rows(int dtype, const void* src, int64_t d0, int64_t d1, int64_t n,
                      int64_t s0, int64_t s1, int64_t s2, const int64_t* slots,
                      int64_t count, int8_t* numbers, float* scales) {
    const View view{src, d0, d1, n, s0, s1, s2};
    Slots todo;
    if (!slots_of(slots, count, d0, todo)) return 3;
    if (dtype == 0) return quantize_view<Bf16>(view, todo, numbers, scales);
    if (dtype == 1) return quantize_view<float>(view, todo, numbers, scales);
    return 2;
}

// fast_lora._ranks_of for a View [slots, rows, n], of the slots ``slots[0..count)`` (null:
// all d0): per slot, one past its last row with a number of magnitude above zero and no
// NaN (0: none), into ``ranks[slot]``. Returns 0; 2 for a dtype; 3 for a slot past d0.
int zoo_row_ranks(int dtype, const void* src, int64_t d0, int64_t d1, int64_t n, int64_t s0,
                  int64_t s1, int64_t s2, const int64_t* slots, int64_t count, int64_t* ranks) {
    const View view{src, d0, d1, n, s0, s1, s2};
    Slots todo;
    if (!slots_of(slots, count, d0, todo)) return 3;
    if (dtype == 0)
        ranks_of_view<Bf16>(view, todo, ranks);
    else if (dtype == 1)
        ranks_of_view<float>(view, todo, ranks);
    else
        return 2;
    return 0;
}

int zoo_lora_avx512_bf16() {
#ifdef ZOO_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

// dtypes (activations, weights) 0: bfloat16, bfloat16; 1: float32, float32; 2: float32,
// bfloat16; 3: bfloat16, int8; 4: float32, int8 (with each part's row scales). Returns 0; with y untouched, 1 for a rank over kMaxRank,
// 2 for a dtype, 3 for a row's slot past a part's last.
int zoo_gather_lora(int dtype, int64_t tokens, const int64_t* slots, const void* x,
                    int64_t x_row, void* y, int64_t y_row, int64_t in, const Part* parts,
                    int64_t n_parts, float scale, int threads) {
    for (int64_t p = 0; p < n_parts; ++p) {
        if (parts[p].rank > kMaxRank) return 1;
        for (int64_t t = 0; t < tokens; ++t)
            if (slots[t] >= parts[p].slots) return 3;
    }
    if (dtype == 0)
        run<Bf16, Bf16>(tokens, slots, x, x_row, y, y_row, in, parts, n_parts, scale, threads);
    else if (dtype == 1)
        run<float, float>(tokens, slots, x, x_row, y, y_row, in, parts, n_parts, scale, threads);
    else if (dtype == 2)
        run<float, Bf16>(tokens, slots, x, x_row, y, y_row, in, parts, n_parts, scale, threads);
    else if (dtype == 3)
        run<Bf16, int8_t>(tokens, slots, x, x_row, y, y_row, in, parts, n_parts, scale, threads);
    else if (dtype == 4)
        run<float, int8_t>(tokens, slots, x, x_row, y, y_row, in, parts, n_parts, scale, threads);
    else
        return 2;
    return 0;
}

}
