/* Matrix products for swarm's weight formats (swarm/model/formats.py), llama.cpp style.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T with W in GGUF blocks of 32 along K:
 *   q8_0: int8 codes [N, K],      fp16 scale d per block        w = d * q
 *   q4_0: uint8 codes [N, K / 2], fp16 scale d per block        w = d * (q - 8)
 *   q4_1: uint8 codes [N, K / 2], fp16 scale d and min m        w = d * q + m
 * (4-bit: byte j of a block holds weight j in its low nibble, weight j + 16 in its high one.)
 *
 * As in llama.cpp, x is first quantized to int8 blocks of 32 (one float scale dx per
 * block, round to nearest), so each block's dot product is an exact integer sum:
 *   q8_0: dw * dx * sum(qw * qx)
 *   q4_0: dw * dx * sum(qw * qx) - 8 * dw * dx * sum(qx)
 *   q4_1: dw * dx * sum(qw * qx) + mw * dx * sum(qx)
 * tests/model/test_kernels.py holds a torch reference of exactly this arithmetic.
 *
 * Decode (M = 1) reads every weight byte once, so the step is bound by memory
 * bandwidth. Rows are taken four at a time to share each x block's loads, and the four
 * are a quarter of the matrix apart (rows g, g + N/4, g + N/2, g + 3N/4), so W is read
 * as four long sequential streams: four adjacent rows of 1 KB would be four short
 * streams in each page, which the hardware prefetchers follow at half the bandwidth
 * (measured: 9.6 against 19 GB/s on one core of an AMD EPYC). Blocks go eight (AVX2) or
 * sixteen (AVX-512) at a time, their fp16 scales converted as vectors. Row groups are split over OpenMP threads. bf16
 * weights take the same path in float32 arithmetic (exact products of bf16 values,
 * float32 sums).
 *
 * Three builds of the same arithmetic, picked by what the compiler targets (-march=native):
 * AVX-512 VNNI (vpdpbusd integer sums, sixteen blocks a chunk, software prefetch; bf16 by
 * vdpbf16ps where AVX512_BF16 is there), AVX2 (maddubs/madd), and plain C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
/* The AVX-512 paths need F/BW/VL/VNNI (Ice Lake, Sapphire Rapids, Zen 4 on): the integer block sums. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define SWARM_AVX512 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32
#define ROWS 4 /* weight rows per inner loop, sharing x's loads */

int swarm_kernels_abi(void) { return 4; }

/* 512: AVX-512 VNNI (and bf16 dot products where __AVX512BF16__), 2: AVX2, 0: plain C. */
int swarm_kernels_simd(void) {
#ifdef SWARM_AVX512
    return 512;
#elif defined(__AVX2__)
    return 2;
#else
    return 0;
#endif
}

static inline float fp16_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ------------------------------------------------------------ activations */

/* One row of x as int8 blocks: codes q, scale d (amax / 127) and d * sum(q) per block. */
static __attribute__((unused)) void quantize_row(const float *x, int64_t K, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int v = (int)nearbyintf(xb[j] * inv);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = scale;
        s[b] = scale * (float)sum;
    }
}

/* ------------------------------------------------------------ block dots */

#ifdef __AVX2__
static inline __m256i nibbles(const uint8_t *p) { /* 16 bytes -> 32 codes in weight order */
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f));
    return _mm256_set_m128i(hi, lo);
}

static inline __m256 dot_u8s8(__m256i u, __m256i s) { /* 8 float lanes of partial sums */
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline __m256 dot_s8s8(__m256i w, __m256i x) {
    return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

static inline float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

static inline int dot_q4_scalar(const uint8_t *w, const int8_t *x) {
    int sum = 0;
    for (int j = 0; j < QK / 2; j++) sum += (w[j] & 0x0f) * x[j] + (w[j] >> 4) * x[j + QK / 2];
    return sum;
}

static inline int dot_q8_scalar(const int8_t *w, const int8_t *x) {
    int sum = 0;
    for (int j = 0; j < QK; j++) sum += w[j] * x[j];
    return sum;
}

#ifdef __AVX2__
/* Eight blocks of nr rows. Their scales are converted eight at a time and multiplied by x's
 * (dd = dw * dx); the q4 terms that do not depend on the codes (-8 dw * dx * sum(qx) for q4_0,
 * m * dx * sum(qx) for q4_1) go into the same accumulator as vectors. 4-bit codes are taken two
 * blocks (32 bytes) per load: the low nibbles of both blocks against their first 16 x codes, the
 * high ones against the last 16, and the two u8 x s8 pair sums are added in 16 bits
 * (|sum| <= 4 * 15 * 127 fits), so a pair of blocks costs one widening and one fma. */
static inline __attribute__((always_inline)) void dot_group8(int kind, int nr, int64_t b,
        const uint8_t *const rows[ROWS], const uint16_t *const srow[ROWS], const uint16_t *const mrow[ROWS],
        const int8_t *xq, const float *xd, const float *xs, __m256 acc[ROWS]) {
    const __m256 xd8 = _mm256_loadu_ps(xd + b), xs8 = _mm256_loadu_ps(xs + b);
    const __m256 xs8_q40 = _mm256_mul_ps(xs8, _mm256_set1_ps(-8.0f));
    __m256 dd[ROWS];
    float dd_mem[ROWS][8] __attribute__((aligned(32)));
    for (int r = 0; r < nr; r++) {
        const __m256 dw8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(srow[r] + b)));
        dd[r] = _mm256_mul_ps(dw8, xd8);
        if (kind == 0) _mm256_store_ps(dd_mem[r], dd[r]);
        if (kind == 1) acc[r] = _mm256_fmadd_ps(dw8, xs8_q40, acc[r]);
        if (kind == 2) acc[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mrow[r] + b))), xs8, acc[r]);
    }
    if (kind == 0) {
        for (int j = 0; j < 8; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (b + j) * QK));
            for (int r = 0; r < nr; r++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(rows[r] + (b + j) * QK));
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd_mem[r][j]), dot_s8s8(w, xv), acc[r]);
            }
        }
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int j = 0; j < 8; j += 2) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + (b + j) * QK));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + (b + j + 1) * QK));
        const __m256i xlo = _mm256_permute2x128_si256(x0, x1, 0x20); /* first 16 codes of each block */
        const __m256i xhi = _mm256_permute2x128_si256(x0, x1, 0x31); /* last 16 */
        /* lanes 0-3 take block j's scale, lanes 4-7 block j + 1's */
        const __m256i pair = _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1);
        for (int r = 0; r < nr; r++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(rows[r] + (b + j) * (QK / 2)));
            const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
            const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd[r], pair), s, acc[r]);
        }
    }
}
#endif

/* kind: 0 = q8_0, 1 = q4_0, 2 = q4_1. Rows [r0, r0 + nr) of W against one quantized x row.
 * Always inlined into dot_rows below with constant kind and nr, so each case compiles
 * to its own loop without branches. */
static inline __attribute__((always_inline)) void dot_rows_impl(int kind, int64_t K, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
                     int64_t r0, int64_t stride, int nr, const int8_t *xq, const float *xd, const float *xs, float *y) {
    const int64_t nb = K / QK, row_bytes = kind == 0 ? K : K / 2, bb = kind == 0 ? QK : QK / 2;
    float extra[ROWS] = {0};
    int64_t b = 0;
#ifdef __AVX2__
    __m256 acc[ROWS];
    const uint8_t *rows[ROWS];
    const uint16_t *srow[ROWS], *mrow[ROWS];
    for (int r = 0; r < nr; r++) {
        acc[r] = _mm256_setzero_ps();
        rows[r] = codes + (r0 + r * stride) * row_bytes;
        srow[r] = scales + (r0 + r * stride) * nb;
        mrow[r] = mins ? mins + (r0 + r * stride) * nb : NULL;
    }
    for (; b + 8 <= nb; b += 8) dot_group8(kind, nr, b, rows, srow, mrow, xq, xd, xs, acc);
    for (; b < nb; b++) { /* the last nb % 8 blocks, one at a time */
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        for (int r = 0; r < nr; r++) {
            const uint8_t *wb = rows[r] + b * bb;
            const float dw = fp16_to_float(srow[r][b]);
            __m256 p = kind == 0 ? dot_s8s8(_mm256_loadu_si256((const __m256i *)wb), xv) : dot_u8s8(nibbles(wb), xv);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[b]), p, acc[r]);
            if (kind == 1) extra[r] -= 8.0f * dw * xs[b];
            else if (kind == 2) extra[r] += fp16_to_float(mrow[r][b]) * xs[b];
        }
    }
    for (int r = 0; r < nr; r++) y[r] = hsum(acc[r]) + extra[r];
#else
    float acc[ROWS] = {0};
    for (; b < nb; b++) {
        for (int r = 0; r < nr; r++) {
            const int64_t row = r0 + r * stride;
            const uint8_t *wb = codes + row * row_bytes + b * bb;
            const float dw = fp16_to_float(scales[row * nb + b]);
            const int dot = kind == 0 ? dot_q8_scalar((const int8_t *)wb, xq + b * QK) : dot_q4_scalar(wb, xq + b * QK);
            acc[r] += dw * xd[b] * (float)dot;
            if (kind == 1) extra[r] -= 8.0f * dw * xs[b];
            else if (kind == 2) extra[r] += fp16_to_float(mins[row * nb + b]) * xs[b];
        }
    }
    for (int r = 0; r < nr; r++) y[r] = acc[r] + extra[r];
#endif
}

static __attribute__((unused)) void dot_rows(int kind, int64_t K, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
                     int64_t r0, int64_t stride, int nr, const int8_t *xq, const float *xd, const float *xs, float *y) {
#define CASE(k, n) dot_rows_impl(k, K, codes, scales, mins, r0, stride, n, xq, xd, xs, y)
    if (nr == ROWS) {
        if (kind == 0) CASE(0, ROWS); else if (kind == 1) CASE(1, ROWS); else CASE(2, ROWS);
    } else {
        if (kind == 0) CASE(0, nr); else if (kind == 1) CASE(1, nr); else CASE(2, nr);
    }
#undef CASE
}

#ifdef SWARM_AVX512
/* ------------------------------------------------------------ AVX-512 VNNI
 *
 * Sixteen blocks a chunk. Their fp16 scales are one 256-bit load, converted to 16 floats and
 * multiplied by x's (dd = dw * dx). The integer block sums are vpdpbusd (u8 x s8, four
 * products summed into each int32 lane), with the accumulator started at an x-side correction
 * so that the lanes of a block sum to exactly the integer dot product of the format:
 *  - 4-bit codes are unsigned already. One 512-bit load is four blocks: its low nibbles meet
 *    the first 16 x codes of each of the four blocks, its high nibbles the last 16, so x is
 *    laid out once per call as [first halves of 4 blocks | second halves] (prepare_x512) and
 *    lanes 4j..4j+3 hold block j. q4_0's -8 offset: lane 4j starts at -8 * sum(qx of block j).
 *  - q8_0 codes are signed: w ^ 0x80 is w + 128 as a u8 (llama.cpp's offset trick, with the
 *    offset on the weight side), so lane 8j starts at -128 * sum(qx of block j). One load is
 *    two blocks, lanes 8j..8j+7 block j.
 * Each group's lanes become floats and meet their block's dd (a lane permute of the 16 dd).
 * q4_1's m * dx * sum(qx) is one fma of 16 lanes a chunk. The last chunk of a row (K / 32
 * not a multiple of 16) loads only the blocks it has (masked loads); x's buffers are padded
 * with zero blocks to whole chunks. */
#define CHUNK 16
/* Each row's codes are prefetched this far ahead, a line per load: the hardware prefetchers
 * alone left 12% of the bandwidth unused on a Xeon (1 KB ahead was the best of 0.5-4 KB). */
#ifndef PREFETCH
#define PREFETCH 1024
#endif

/* One row of x for the AVX-512 kernels, nbp = K / 32 rounded up to whole chunks, the padding zero:
 * codes q (q4 kinds: in the [first halves | second halves] order of 4-block groups), scales d,
 * d * sum(q) per block, and the int32 accumulator starts c (8 a block). */
static void prepare_x512(int kind, const float *x, int64_t K, int64_t nbp, int8_t *q, float *d, float *s, int32_t *c) {
    const int64_t nb = K / QK;
    memset(q, 0, (size_t)(nbp * QK));
    memset(d, 0, sizeof(float) * (size_t)nbp);
    memset(s, 0, sizeof(float) * (size_t)nbp);
    memset(c, 0, sizeof(int32_t) * (size_t)(nbp * 8));
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + b * QK), v1 = _mm512_loadu_ps(x + b * QK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        /* vcvtps2dq rounds to nearest even, as nearbyintf does in the default mode */
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        const __m128i b0 = _mm512_cvtepi32_epi8(q0), b1 = _mm512_cvtepi32_epi8(q1);
        if (kind == 0) {
            _mm_storeu_si128((__m128i *)(q + b * QK), b0);
            _mm_storeu_si128((__m128i *)(q + b * QK + 16), b1);
            c[b * 8] = -128 * sum; /* lane 8j of the pair holding block b (8 lanes a block) */
        } else {
            const int64_t g = b / 4, j = b % 4;
            _mm_storeu_si128((__m128i *)(q + g * 128 + j * 16), b0);
            _mm_storeu_si128((__m128i *)(q + g * 128 + 64 + j * 16), b1);
            if (kind == 1) c[g * 16 + j * 4] = -8 * sum; /* lane 4j of the group's 16 */
        }
        d[b] = scale;
        s[b] = scale * (float)sum;
    }
}

/* Blocks [b, b + CHUNK) of nr weight rows against nx rows of x (only the first c blocks when
 * partial). A prefill takes x rows two at a time (MX): each weight load, its nibble unpacking and
 * its scales then serve both. x row m's buffers are xq + m * xstride (codes, nbp * 32 bytes)
 * and likewise for xd, xs (nbp floats) and xc (nbp * 8 ints). */
#define MX 2
static inline __attribute__((always_inline)) void chunk512(int kind, int nr, int nx, int partial, int c, int64_t b,
        const uint8_t *const rows[ROWS], const uint16_t *const srow[ROWS], const uint16_t *const mrow[ROWS],
        const int8_t *xq, const float *xd, const float *xs, const int32_t *xc, int64_t nbp, __m512 acc[ROWS][MX]) {
    __m512 xd16[MX], dd[ROWS][MX];
    for (int m = 0; m < nx; m++) xd16[m] = _mm512_loadu_ps(xd + m * nbp + b);
    const __mmask16 smask = partial ? (__mmask16)((1u << c) - 1) : (__mmask16)0xffff;
    for (int r = 0; r < nr; r++) {
        const __m256i sraw = partial ? _mm256_maskz_loadu_epi16(smask, srow[r] + b)
                                     : _mm256_loadu_si256((const __m256i *)(srow[r] + b));
        const __m512 dw = _mm512_cvtph_ps(sraw);
        for (int m = 0; m < nx; m++) dd[r][m] = _mm512_mul_ps(dw, xd16[m]);
        if (kind == 2) {
            const __m256i mraw = partial ? _mm256_maskz_loadu_epi16(smask, mrow[r] + b)
                                         : _mm256_loadu_si256((const __m256i *)(mrow[r] + b));
            const __m512 mw = _mm512_cvtph_ps(mraw);
            for (int m = 0; m < nx; m++) acc[r][m] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(xs + m * nbp + b), acc[r][m]);
        }
    }
    if (kind == 0) {
        const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        for (int p = 0; p < CHUNK / 2; p++) {
            if (partial && 2 * p >= c) break;
            const __mmask64 mask = partial && 2 * p + 1 >= c ? 0xffffffffull : ~0ull;
            __m512i xv[MX], cv[MX];
            for (int m = 0; m < nx; m++) {
                xv[m] = _mm512_loadu_si512(xq + m * nbp * QK + (b + 2 * p) * QK);
                cv[m] = _mm512_loadu_si512(xc + m * nbp * 8 + (b + 2 * p) * 8);
            }
            const __m512i idx = _mm512_add_epi32(half, _mm512_set1_epi32(2 * p));
            for (int r = 0; r < nr; r++) {
                const uint8_t *wp = rows[r] + (b + 2 * p) * QK;
                _mm_prefetch((const char *)wp + PREFETCH, _MM_HINT_T0);
                const __m512i w = partial ? _mm512_maskz_loadu_epi8(mask, wp) : _mm512_loadu_si512(wp);
                const __m512i wu = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
                for (int m = 0; m < nx; m++) {
                    const __m512i sum = _mm512_dpbusd_epi32(cv[m], wu, xv[m]);
                    acc[r][m] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, dd[r][m]), _mm512_cvtepi32_ps(sum), acc[r][m]);
                }
            }
        }
        return;
    }
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int g = 0; g < CHUNK / 4; g++) {
        if (partial && 4 * g >= c) break;
        const int have = partial ? c - 4 * g : 4;
        const __mmask64 mask = have >= 4 ? ~0ull : (1ull << (16 * have)) - 1;
        const int64_t gi = b / 4 + g;
        __m512i xlo[MX], xhi[MX], cv[MX];
        for (int m = 0; m < nx; m++) {
            xlo[m] = _mm512_loadu_si512(xq + m * nbp * QK + gi * 128);
            xhi[m] = _mm512_loadu_si512(xq + m * nbp * QK + gi * 128 + 64);
            cv[m] = kind == 1 ? _mm512_loadu_si512(xc + m * nbp * 8 + gi * 16) : _mm512_setzero_si512();
        }
        const __m512i idx = _mm512_add_epi32(quarter, _mm512_set1_epi32(4 * g));
        for (int r = 0; r < nr; r++) {
            const uint8_t *wp = rows[r] + (b + 4 * g) * (QK / 2);
            _mm_prefetch((const char *)wp + PREFETCH, _MM_HINT_T0);
            const __m512i raw = partial ? _mm512_maskz_loadu_epi8(mask, wp) : _mm512_loadu_si512(wp);
            const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            for (int m = 0; m < nx; m++) {
                const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(cv[m], lo, xlo[m]), hi, xhi[m]);
                acc[r][m] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, dd[r][m]), _mm512_cvtepi32_ps(sum), acc[r][m]);
            }
        }
    }
}

/* y[m * ystride + r] for nr weight rows (r0 + r * stride) and nx x rows. */
static inline __attribute__((always_inline)) void dot_rows512_impl(int kind, int64_t K, const uint8_t *codes,
        const uint16_t *scales, const uint16_t *mins, int64_t r0, int64_t stride, int nr, int nx,
        const int8_t *xq, const float *xd, const float *xs, const int32_t *xc, int64_t nbp, float *y, int64_t ystride) {
    const int64_t nb = K / QK, row_bytes = kind == 0 ? K : K / 2;
    __m512 acc[ROWS][MX];
    const uint8_t *rows[ROWS];
    const uint16_t *srow[ROWS], *mrow[ROWS];
    for (int r = 0; r < nr; r++) {
        for (int m = 0; m < nx; m++) acc[r][m] = _mm512_setzero_ps();
        rows[r] = codes + (r0 + r * stride) * row_bytes;
        srow[r] = scales + (r0 + r * stride) * nb;
        mrow[r] = mins ? mins + (r0 + r * stride) * nb : NULL;
    }
    int64_t b = 0;
    for (; b + CHUNK <= nb; b += CHUNK) chunk512(kind, nr, nx, 0, CHUNK, b, rows, srow, mrow, xq, xd, xs, xc, nbp, acc);
    if (b < nb) chunk512(kind, nr, nx, 1, (int)(nb - b), b, rows, srow, mrow, xq, xd, xs, xc, nbp, acc);
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < nx; m++) y[m * ystride + r] = _mm512_reduce_add_ps(acc[r][m]);
}

static void dot_rows512(int kind, int64_t K, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,
                        int64_t r0, int64_t stride, int nr, int nx, const int8_t *xq, const float *xd, const float *xs,
                        const int32_t *xc, int64_t nbp, float *y, int64_t ystride) {
#define CASE(k, n, x) dot_rows512_impl(k, K, codes, scales, mins, r0, stride, n, x, xq, xd, xs, xc, nbp, y, ystride)
    if (nr == ROWS && nx == 1) {
        if (kind == 0) CASE(0, ROWS, 1); else if (kind == 1) CASE(1, ROWS, 1); else CASE(2, ROWS, 1);
    } else if (nr == ROWS && nx == MX) {
        if (kind == 0) CASE(0, ROWS, MX); else if (kind == 1) CASE(1, ROWS, MX); else CASE(2, ROWS, MX);
    } else {
        if (kind == 0) CASE(0, nr, nx); else if (kind == 1) CASE(1, nr, nx); else CASE(2, nr, nx);
    }
#undef CASE
}
#endif

/* y [M, N] = x [M, K] @ W^T for a quantized W, each x row rounded to int8 blocks once. */
static int matmul_quant_rows(int kind, const float *x, int64_t M, int64_t K, const uint8_t *codes,
                             const uint16_t *scales, const uint16_t *mins, int64_t N, float *y, int threads) {
    const int64_t nb = K / QK;
#ifdef SWARM_AVX512
    const int64_t nbp = (nb + CHUNK - 1) / CHUNK * CHUNK; /* x padded to whole chunks */
    int32_t *xc = malloc(sizeof(int32_t) * (size_t)(M * nbp * 8));
#else
    const int64_t nbp = nb;
    int32_t *xc = NULL;
#endif
    int8_t *xq = malloc((size_t)(M * nbp * QK));
    float *xd = malloc(sizeof(float) * (size_t)(M * nbp)), *xs = malloc(sizeof(float) * (size_t)(M * nbp));
    if (!xq || !xd || !xs || (nbp != nb && !xc)) {
        free(xq), free(xd), free(xs), free(xc);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
#ifdef SWARM_AVX512
        prepare_x512(kind, x + m * K, K, nbp, xq + m * nbp * QK, xd + m * nbp, xs + m * nbp, xc + m * nbp * 8);
#else
        quantize_row(x + m * K, K, xq + m * K, xd + m * nb, xs + m * nb);
#endif
    }
    /* Group g takes rows g, g + Q, g + 2Q, g + 3Q (Q = N / ROWS): four long sequential streams
     * through W, which the hardware prefetchers follow at full bandwidth (four rows side by side
     * would be four short streams per page, read at half of it). The last N % ROWS rows follow. */
    const int64_t Q = N / ROWS, groups = Q + (N % ROWS != 0);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t r0 = g < Q ? g : ROWS * Q, stride = g < Q ? Q : 1;
        const int nr = g < Q ? ROWS : (int)(N - ROWS * Q);
#ifdef SWARM_AVX512
        float out[MX * ROWS];
        for (int64_t m = 0; m < M; m += MX) { /* x rows two at a time: each weight load serves both */
            const int nx = M - m >= MX ? MX : (int)(M - m);
            dot_rows512(kind, K, codes, scales, mins, r0, stride, nr, nx, xq + m * nbp * QK, xd + m * nbp,
                        xs + m * nbp, xc + m * nbp * 8, nbp, out, ROWS);
            for (int i = 0; i < nx; i++)
                for (int r = 0; r < nr; r++) y[(m + i) * N + r0 + r * stride] = out[i * ROWS + r];
        }
#else
        float out[ROWS];
        for (int64_t m = 0; m < M; m++) {
            dot_rows(kind, K, codes, scales, mins, r0, stride, nr, xq + m * K, xd + m * nb, xs + m * nb, out);
            for (int r = 0; r < nr; r++) y[m * N + r0 + r * stride] = out[r];
        }
#endif
    }
    free(xq), free(xd), free(xs), free(xc);
    return 0;
}

/* What rounding x to int8 blocks leaves out: r = x - d * round(x / d) per block of 32 (d = amax / 127,
 * the rounding of quantize_row and prepare_x512), each operation rounded on its own (no fma), as
 * swarm.model.kernels.quantize_activations computes it. */
__attribute__((optimize("fp-contract=off")))
static void rounding_residual(const float *x, int64_t K, float *r) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        for (int j = 0; j < QK; j++) {
            const float back = nearbyintf(xb[j] * inv) * scale;
            r[b * QK + j] = xb[j] - back;
        }
    }
}

/* y [M, N] = x [M, K] @ W^T for a quantized W. Returns 0, or -1 when scratch memory is short.
 * q8_0 (int8 weights): rounding x to int8 blocks costs more than the weights' own rounding (SmolLM2-135M:
 * +0.75% perplexity on top of the weights' +0.60%), so each x row goes in twice, as llama.cpp does not: x,
 * and its rounding's residual (rounding_residual) rounded to int8 blocks of its own; the two products are
 * summed. The pair is two x rows of one pass (MX), so each weight load serves both and the
 * product still reads W once. The 4-bit formats' own rounding dominates theirs: x goes in once. */
int swarm_matmul_quant(int kind, const float *x, int64_t M, int64_t K, const uint8_t *codes,
                       const uint16_t *scales, const uint16_t *mins, int64_t N, float *y, int threads) {
    if (kind != 0) return matmul_quant_rows(kind, x, M, K, codes, scales, mins, N, y, threads);
    float *xx = malloc(sizeof(float) * (size_t)(2 * M * K)), *yy = malloc(sizeof(float) * (size_t)(2 * M * N));
    int rc = -1;
    if (xx && yy) {
        for (int64_t m = 0; m < M; m++) {
            memcpy(xx + 2 * m * K, x + m * K, sizeof(float) * (size_t)K);
            rounding_residual(x + m * K, K, xx + (2 * m + 1) * K);
        }
        rc = matmul_quant_rows(kind, xx, 2 * M, K, codes, scales, mins, N, yy, threads);
        for (int64_t m = 0; m < M && rc == 0; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] = yy[2 * m * N + n] + yy[(2 * m + 1) * N + n];
    }
    free(xx), free(yy);
    return rc;
}

/* ------------------------------------------------------------ bfloat16 */

static inline uint16_t float_to_bf16(float f) { /* round to nearest even (finite values) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

#if defined(SWARM_AVX512) && defined(__AVX512BF16__)
/* vdpbf16ps: each float lane adds the exact products of two bf16 pairs (x and w both bf16).
 * A float32 x is first split into three bf16 parts whose sum is x exactly (hi = bf16(x), then
 * the rest twice), so the products stay exact products of x's value; a bfloat16 x is one part. */
#define SWARM_DPBF16 1


static void split_bf16(const float *x, int64_t K, uint16_t *parts) { /* parts [3, K] */
    for (int64_t k = 0; k < K; k++) {
        const uint16_t hi = float_to_bf16(x[k]);
        const float rest = x[k] - bf16_to_float(hi);
        const uint16_t mid = float_to_bf16(rest);
        parts[k] = hi, parts[K + k] = mid, parts[2 * K + k] = float_to_bf16(rest - bf16_to_float(mid));
    }
}

static inline __attribute__((always_inline)) void dot_rows_dpbf16_impl(int64_t K, const uint16_t *w, int64_t r0,
        int64_t stride, int nr, const uint16_t *x, int parts, float *y) {
    __m512 acc[ROWS], acc2[ROWS];
    const uint16_t *rows[ROWS];
    for (int r = 0; r < nr; r++) acc[r] = acc2[r] = _mm512_setzero_ps(), rows[r] = w + (r0 + r * stride) * K;
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1;
        const __m512bh x0 = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
        __m512bh x1 = x0, x2 = x0;
        if (parts == 3) x1 = (__m512bh)_mm512_maskz_loadu_epi16(m, x + K + k), x2 = (__m512bh)_mm512_maskz_loadu_epi16(m, x + 2 * K + k);
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(rows[r] + k) + PREFETCH, _MM_HINT_T0);
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, rows[r] + k);
            acc[r] = _mm512_dpbf16_ps(acc[r], wv, x0);
            if (parts == 3) acc2[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc2[r], wv, x1), wv, x2);
        }
    }
    for (int r = 0; r < nr; r++) y[r] = _mm512_reduce_add_ps(parts == 3 ? _mm512_add_ps(acc[r], acc2[r]) : acc[r]);
}

static void dot_rows_dpbf16(int64_t K, const uint16_t *w, int64_t r0, int64_t stride, int nr, const uint16_t *x,
                            int parts, float *y) {
    if (nr == ROWS && parts == 1) dot_rows_dpbf16_impl(K, w, r0, stride, ROWS, x, 1, y);
    else if (nr == ROWS) dot_rows_dpbf16_impl(K, w, r0, stride, ROWS, x, 3, y);
    else dot_rows_dpbf16_impl(K, w, r0, stride, nr, x, parts, y);
}
#endif

static __attribute__((unused)) void dot_rows_bf16(int64_t K, const uint16_t *w, int64_t r0, int64_t stride, int nr, const float *x, float *y) {
#ifdef __AVX2__
    if (K % 16 == 0) {
        __m256 acc[ROWS];
        for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < nr; r++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + (r0 + r * stride) * K + k));
                const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
                const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
                acc[r] = _mm256_fmadd_ps(w1, x1, _mm256_fmadd_ps(w0, x0, acc[r]));
            }
        }
        for (int r = 0; r < nr; r++) y[r] = hsum(acc[r]);
        return;
    }
#endif
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; k++) acc += bf16_to_float(w[(r0 + r * stride) * K + k]) * x[k];
        y[r] = acc;
    }
}

/* y [M, N] = x [M, K] @ W^T for bfloat16 W [N, K] and x float32 (x_bf16 = 0) or bfloat16 (x_bf16 = 1).
 * Returns 0, or -1 when scratch memory is short. */
int swarm_matmul_bf16(const void *x, int x_bf16, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y,
                      int threads) {
#ifdef SWARM_DPBF16
    const int parts = x_bf16 ? 1 : 3;
    uint16_t *xs = x_bf16 ? NULL : malloc(sizeof(uint16_t) * (size_t)(3 * M * K));
    if (!x_bf16 && !xs) return -1;
    for (int64_t m = 0; m < M && !x_bf16; m++) split_bf16((const float *)x + m * K, K, xs + 3 * m * K);
    const uint16_t *xp = x_bf16 ? (const uint16_t *)x : xs;
#else
    float *xf = NULL;
    if (x_bf16) {
        if (!(xf = malloc(sizeof(float) * (size_t)(M * K)))) return -1;
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(((const uint16_t *)x)[i]);
    }
    const float *xp = x_bf16 ? xf : (const float *)x;
#endif
    const int64_t Q = N / ROWS, groups = Q + (N % ROWS != 0); /* rows as in swarm_matmul_quant */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t r0 = g < Q ? g : ROWS * Q, stride = g < Q ? Q : 1;
        const int nr = g < Q ? ROWS : (int)(N - ROWS * Q);
        float out[ROWS];
        for (int64_t m = 0; m < M; m++) {
#ifdef SWARM_DPBF16
            dot_rows_dpbf16(K, w, r0, stride, nr, xp + parts * m * K, parts, out);
#else
            dot_rows_bf16(K, w, r0, stride, nr, xp + m * K, out);
#endif
            for (int r = 0; r < nr; r++) y[m * N + r0 + r * stride] = out[r];
        }
    }
#ifdef SWARM_DPBF16
    free(xs);
#else
    free(xf);
#endif
    return 0;
}

/* ------------------------------------------------------------ float32
 *
 * Decode products of float32 weights (y = x @ W^T for a few rows of x), the bytes a float32 step
 * reads: MKL's one-token sgemv reads the small matrices of a 135M model at about 11 GB/s on one
 * core, this loop at the machine's bandwidth. Rows are taken as above (four streams a quarter of
 * the matrix apart, prefetched ahead), each with two accumulators of 16 lanes (eight independent
 * fma chains hide the fma latency), summed at the end. The sums are float32 in another order than
 * the BLAS's, so the products agree with torch's to float32 rounding, not bit for bit. */
#ifndef PREFETCH_F32
#define PREFETCH_F32 2048
#endif

static inline __attribute__((always_inline)) void dot_rows_f32_impl(int64_t K, const float *w, int64_t r0,
        int64_t stride, int nr, const float *x, float *y) {
    const float *rows[ROWS];
    for (int r = 0; r < nr; r++) rows[r] = w + (r0 + r * stride) * K;
#ifdef SWARM_AVX512
    __m512 a0[ROWS], a1[ROWS];
    for (int r = 0; r < nr; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(rows[r] + k) + PREFETCH_F32, _MM_HINT_T0);
            _mm_prefetch((const char *)(rows[r] + k) + PREFETCH_F32 + 64, _MM_HINT_T0);
            a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[r] + k), x0, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[r] + k + 16), x1, a1[r]);
        }
    }
    for (; k < K; k += 16) { /* the last K % 32: masked loads */
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int r = 0; r < nr; r++) a0[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, rows[r] + k), xv, a0[r]);
    }
    for (int r = 0; r < nr; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#elif defined(__AVX2__)
    __m256 a0[ROWS], a1[ROWS];
    for (int r = 0; r < nr; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int r = 0; r < nr; r++) {
            a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r] + k), x0, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r] + k + 8), x1, a1[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        float rest = 0.0f;
        for (int64_t j = k; j < K; j++) rest += rows[r][j] * x[j];
        y[r] = hsum(_mm256_add_ps(a0[r], a1[r])) + rest;
    }
#else
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < K; j++) acc += rows[r][j] * x[j];
        y[r] = acc;
    }
#endif
}

static void dot_rows_f32(int64_t K, const float *w, int64_t r0, int64_t stride, int nr, const float *x, float *y) {
    if (nr == ROWS) dot_rows_f32_impl(K, w, r0, stride, ROWS, x, y);
    else dot_rows_f32_impl(K, w, r0, stride, nr, x, y);
}

/* y [M, N] = x [M, K] @ W^T for float32 W [N, K] and x. Each row of x is summed alone, in the same
 * order whatever M is (a batch's rows equal the same rows decoded one by one). Returns 0. */
int swarm_matmul_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y, int threads) {
    const int64_t Q = N / ROWS, groups = Q + (N % ROWS != 0); /* rows as in swarm_matmul_quant */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t r0 = g < Q ? g : ROWS * Q, stride = g < Q ? Q : 1;
        const int nr = g < Q ? ROWS : (int)(N - ROWS * Q);
        float out[ROWS];
        for (int64_t m = 0; m < M; m++) {
            dot_rows_f32(K, w, r0, stride, nr, x + m * K, out);
            for (int r = 0; r < nr; r++) y[m * N + r0 + r * stride] = out[r];
        }
    }
    return 0;
}

/* ------------------------------------------------------------ one decode block
 *
 * A whole Llama-family decoder block for one token of one sequence: at 135M parameters the
 * products of a step take a third of it and the ~50 torch operator calls a block around them
 * (microseconds each) the rest, so a decode step calls this once per block instead. The
 * arithmetic is swarm/model/block.py's (RMSNorm, fused q/k/v, rotary with the sign folded
 * into sin, the KV cache write, softmax attention over the positions so far, o, RMSNorm,
 * fused gate/up, SiLU, down), in float32 and in another order than torch's, so not bit for
 * bit (float32 weights: within float32 rounding of the library's layer; their tokens are
 * checked against transformers' by tests/model/test_shard.py and benchmarks/bench_f32_identity.py).
 * Weights are quantized (kinds 0-2), bfloat16 (kind 3) or float32 (kind 4). Activations, norms,
 * biases, rotary tables and the cache are float32, or bfloat16 with act_bf16 (a bfloat16 shard): then the
 * block computes in float32 between a bf16 input and output, and rounds to bf16 what torch's
 * bf16 block holds in bf16 between operators that matter here: the products' inputs (the bf16
 * kernel takes bf16 x) and the keys and values it caches. */

static float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef SWARM_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    sum = hsum(acc);
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* element i of a float32 or (bf) bfloat16 array, and a store to one */
static inline float ld(const void *p, int64_t i, int bf) {
    return bf ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, int64_t i, float v, int bf) {
    if (bf) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

static void rms_norm_f32(const float *x, const void *w, int bf, int64_t n, float eps, float *out) {
    const float r = 1.0f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = ld(w, i, bf) * (x[i] * r);
}

/* y [M, N] = x [M, K] @ W^T (+ bias) for weight number i of the block's parts; xb: scratch for x in bf16.
 * Each row is computed as if alone (the kernels sum each row of x on its own). */
static int product(int i, const int *kinds, const void *const *parts, const int64_t *shapes, int bf, const float *x,
                   int64_t M, uint16_t *xb, float *y, int threads) {
    const int64_t n = shapes[2 * i], k = shapes[2 * i + 1];
    const void *const *p = parts + 4 * i; /* codes (or the bf16 matrix), scales, mins, bias */
    if (kinds[i] == 4) {
        swarm_matmul_f32(x, M, k, p[0], n, y, threads);
    } else if (kinds[i] == 3) {
        for (int64_t j = 0; j < M * k; j++) xb[j] = float_to_bf16(x[j]);
        if (swarm_matmul_bf16(xb, 1, M, k, p[0], n, y, threads) != 0) return -1;
    } else if (swarm_matmul_quant(kinds[i], x, M, k, p[0], p[1], p[2], n, y, threads) != 0) {
        return -1;
    }
    if (p[3])
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < n; j++) y[m * n + j] += ld(p[3], j, bf);
    return 0;
}

/* x [B, H] <- block(x): B new tokens, a row each (one of each of B sequences, or a sequence's few next
 * tokens as consecutive rows: a narrow step, see below). Weights 0..3: q/k/v fused
 * [(heads + 2 kv) dim, H], o [H, heads dim], gate/up fused [2 I, H], down [H, I], each as (codes or bf16
 * matrix, scales, mins or NULL, bias or NULL) in parts, kinds[i] (0-2 quantized, 3 bf16, 4 float32) and
 * (N, K) in shapes. cos, sin [B, dim]: each token's rotary tables (sin's first half negated). keys[b],
 * values[b]: row b's sequence's cache [kv, max_len, dim]; its token is written at pos[b] and attends to its
 * positions 0..pos[b] (so sequences of different lengths need no mask). Rows run in order, so the rows of one
 * sequence at consecutive positions see each other causally: each is written before the next attends. The products take the B rows
 * together (each weight load serves every row; each row summed as if alone, so a sequence's numbers do not
 * depend on the batch it is in). x, norms, biases, tables and cache are float32, or bfloat16 with act_bf16.
 * Returns 0, or -1 when scratch memory is short. */
int swarm_block_decode(void *x, int64_t B, int act_bf16, int64_t H, int heads, int kv, int dim, float eps,
                       float scale, const void *norm1, const void *norm2, const int *kinds, const void *const *parts,
                       const int64_t *shapes, const void *cos, const void *sin, void *const *keys,
                       void *const *values, int64_t max_len, const int64_t *pos, int threads) {
    const int bf = act_bf16;
    const int64_t inter = shapes[4] / 2, nq = (int64_t)heads * dim, nkv = (int64_t)kv * dim;
    const int64_t widest = inter > H ? inter : H, nqkv = nq + 2 * nkv;
    int64_t span = 0;
    for (int64_t b = 0; b < B; b++) span = pos[b] + 1 > span ? pos[b] + 1 : span;
    float *buf = malloc(sizeof(float) * (size_t)(B * (H + widest + nqkv + nq + 2 * inter) + span + 2 * dim)
                        + sizeof(uint16_t) * (size_t)(B * (widest > nq ? widest : nq)));
    if (!buf) return -1;
    float *xf = buf, *h = xf + B * H, *qkv = h + B * widest, *attn = qkv + B * nqkv, *gu = attn + B * nq;
    float *scores = gu + B * 2 * inter, *row = scores + span, *rolled = row + dim;
    uint16_t *xb = (uint16_t *)(rolled + dim);
    int rc = 0;
    const int half = dim / 2;
    for (int64_t i = 0; i < B * H; i++) xf[i] = ld(x, i, bf);
    for (int64_t b = 0; b < B; b++) rms_norm_f32(xf + b * H, norm1, bf, H, eps, h + b * H);
    if ((rc = product(0, kinds, parts, shapes, bf, h, B, xb, qkv, threads))) goto done;
    for (int64_t b = 0; b < B; b++) {
        float *qb = qkv + b * nqkv, *ob = attn + b * nq;
        const int64_t at_pos = pos[b];
        for (int64_t head = 0; head < heads + kv; head++) { /* rotate q and k in place: v * cos + roll(v) * sin */
            float *v = qb + head * dim;
            for (int j = 0; j < dim; j++) rolled[j] = v[(j + half) % dim];
            for (int j = 0; j < dim; j++) v[j] = v[j] * ld(cos, b * dim + j, bf) + rolled[j] * ld(sin, b * dim + j, bf);
        }
        void *kb = keys[b], *vb = values[b];
        for (int64_t g = 0; g < kv; g++)
            for (int j = 0; j < dim; j++) {
                st(kb, (g * max_len + at_pos) * dim + j, qb[nq + g * dim + j], bf);
                st(vb, (g * max_len + at_pos) * dim + j, qb[nq + nkv + g * dim + j], bf);
            }
        for (int head = 0; head < heads; head++) {
            const int64_t g = head / (heads / kv);
            const float *q = qb + (int64_t)head * dim;
            float top = -INFINITY, total = 0.0f, *out = ob + (int64_t)head * dim;
            for (int64_t t = 0; t <= at_pos; t++) {
                const int64_t at = (g * max_len + t) * dim;
                if (bf) for (int j = 0; j < dim; j++) row[j] = ld(kb, at + j, 1);
                scores[t] = scale * dot_f32(q, bf ? row : (const float *)kb + at, dim);
                top = fmaxf(top, scores[t]);
            }
            for (int j = 0; j < dim; j++) out[j] = 0.0f;
            for (int64_t t = 0; t <= at_pos; t++) {
                const float p = expf(scores[t] - top);
                const int64_t at = (g * max_len + t) * dim;
                total += p;
                for (int j = 0; j < dim; j++) out[j] += p * ld(vb, at + j, bf);
            }
            for (int j = 0; j < dim; j++) out[j] /= total;
        }
    }
    if ((rc = product(1, kinds, parts, shapes, bf, attn, B, xb, h, threads))) goto done;
    for (int64_t i = 0; i < B * H; i++) xf[i] += h[i];
    for (int64_t b = 0; b < B; b++) rms_norm_f32(xf + b * H, norm2, bf, H, eps, h + b * H);
    if ((rc = product(2, kinds, parts, shapes, bf, h, B, xb, gu, threads))) goto done;
    for (int64_t b = 0; b < B; b++) { /* silu(gate) * up */
        float *g = gu + b * 2 * inter;
        for (int64_t i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[inter + i];
    }
    /* down takes rows of I: the B rows' silu products sit 2 I apart, so pack them */
    for (int64_t b = 1; b < B; b++) memmove(gu + b * inter, gu + b * 2 * inter, sizeof(float) * (size_t)inter);
    if ((rc = product(3, kinds, parts, shapes, bf, gu, B, xb, h, threads))) goto done;
    for (int64_t i = 0; i < B * H; i++) st(x, i, xf[i] + h[i], bf);
done:
    free(buf);
    return rc;
}
