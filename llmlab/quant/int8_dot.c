/* Quantized weights times int8-quantized activations, with integer dot products: llama.cpp's way of
 * decoding on a CPU (Q4_1 x Q8_1), written for llmlab's own weight layout. See int8_dot.py.
 *
 * A decode step multiplies each weight matrix by ONE vector x. Reading the weights is the cost, so the
 * weights stay in 4 (or 8) bits and are never widened to floats in memory. The activations are
 * quantized too, to int8 in blocks of 32 with one scale d_x each (x ~ d_x * q_x), so that 32 products
 * become integer multiply-adds the CPU does 32 or 64 at a time (AVX2 vpmaddubsw; AVX-VNNI vpdpbusd):
 *
 *   int4:  y[n] = sum over blocks b of  s[n,g] * d_x[b] * sum_k q_w[n,k] q_x[k]   +   sum over groups g of  o[n,g] * X[g]
 *          (W = q_w * s + o per group g of the row; X[g] = sum of d_x q_x over the group)
 *   int8:  y[n] = s[n] * sum over blocks b of  d_x[b] * sum_k q_w[n,k] q_x[k]      (W = q_w * s per row)
 *
 * X uses the quantized x, not x: then int4's two terms together are exactly W . x_quantized, whose error
 * sum_k w_k e_k cancels over weights of both signs. With the exact sum of x the error would be
 * sum_k s q_k e_k, over codes q_k of 0..15 that are all positive, and it would not cancel (7% of wv's
 * output in SmolLM2 against 0.8%, measured). llama.cpp's Q8_1 keeps d * sum(q) for the same reason.
 *
 * Layouts (llmlab.quant.linear): int4 packed (N, K/2) bytes, byte j = q[2j] | q[2j+1] << 4; scales and
 * offsets (N, K/group) bf16. int8 weight (N, K) int8, scale (N,) bf16. x and y: (M, K) and (M, N), bf16
 * or fp32. A block's 16 bytes split into its even columns (low nibbles) and its odd ones (high nibbles),
 * so the quantized activations are stored in that same order, and no weight is ever shuffled:
 *   AVX2     one block per 256-bit register:        [even cols of b | odd cols of b]
 *   AVX-512  two blocks per 512-bit register:       [even b | even b+1 | odd b | odd b+1]
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define ROWS 4          /* weight rows per inner loop: they share each load of x and keep 4 sums in flight */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define WIDE 1          /* the AVX-512 path, for K a multiple of 64 */
#else
#define WIDE 0
#endif

enum layout { PLAIN, NIBBLES, NIBBLE_PAIRS };

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {          /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline void store_y(void *y, int bf16, long i, float v) {
    if (bf16) ((uint16_t *)y)[i] = float_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* 8 inputs from x, as floats */
static inline __m256 load8(const void *x, int bf16, long i) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + i);
    __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));   /* bf16 is fp32's top half */
}

static inline float horizontal_max(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* One block of 32 inputs -> 32 int8 in their order, its scale d and the sum of its codes */
static inline __m256i quantize_block(const void *x, int bf16, long i, float *d, int *q_sum) {
    __m256 v[4], amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int j = 0; j < 4; j++) {
        v[j] = load8(x, bf16, i + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    float m = horizontal_max(amax);
    __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i q[4], total = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));            /* round to nearest even */
        total = _mm256_add_epi32(total, q[j]);
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_hadd_epi32(t, t);
    *q_sum = _mm_cvtsi128_si32(_mm_hadd_epi32(t, t));
    *d = m / 127.0f;
    /* 4 x 8 int32 -> 32 int8: the packs work per 128-bit lane, the permute puts the 8 groups of 4 in order */
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* [x0 x1 ... x31] -> [x0 x2 ... x30 | x1 x3 ... x31]: even inputs, then odd ones */
static inline __m256i split_even_odd(__m256i v) {
    const __m256i within_lanes = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                  0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, within_lanes), 0xD8);     /* 64-bit parts 0, 2, 1, 3 */
}

/* One row of activations (K values) -> int8 q (K, in `layout` order), scales d (K/32), and X (K/group):
 * the sums of d * q over each group of the weights (int4's offset term). */
static void quantize_row(const void *x, int bf16, long K, enum layout layout, long group, int8_t *q, float *d,
                         float *X) {
    for (long g = 0; g < K / group; g++) X[g] = 0.0f;
    __m256i previous = _mm256_setzero_si256();
    for (long b = 0; b < K / BLOCK; b++) {
        int q_sum;
        __m256i block = quantize_block(x, bf16, b * BLOCK, &d[b], &q_sum);
        X[b * BLOCK / group] += d[b] * q_sum;
        if (layout == PLAIN) {
            _mm256_store_si256((__m256i *)(q + b * BLOCK), block);
        } else if (layout == NIBBLES) {
            _mm256_store_si256((__m256i *)(q + b * BLOCK), split_even_odd(block));
        } else if (b % 2 == 0) {
            previous = split_even_odd(block);
        } else {                    /* [even b-1 | even b | odd b-1 | odd b] */
            __m256i current = split_even_odd(block);
            _mm256_store_si256((__m256i *)(q + (b - 1) * BLOCK), _mm256_permute2x128_si256(previous, current, 0x20));
            _mm256_store_si256((__m256i *)(q + b * BLOCK), _mm256_permute2x128_si256(previous, current, 0x31));
        }
    }
}

/* The quantized activations of M rows, in one allocation (freed by the caller): q (M*K int8, 64-byte
 * aligned for the vector loads), d (M*K/32) and X (M*K/group floats). Per call, not static: ctypes
 * releases the GIL, so two Python threads may be in here at once. */
static int8_t *quantize_rows(const void *x, int bf16, long M, long K, enum layout layout, long group,
                             float **d, float **X) {
    long q_bytes = ((M * K + 63) / 64) * 64;
    int8_t *q = aligned_alloc(64, q_bytes + sizeof(float) * (M * K / BLOCK + M * K / group));
    if (!q) return NULL;
    *d = (float *)(q + q_bytes);
    *X = *d + M * K / BLOCK;
    for (long m = 0; m < M; m++)
        quantize_row((const char *)x + m * K * (bf16 ? 2 : 4), bf16, K, layout, group, q + m * K,
                     *d + m * K / BLOCK, *X + m * K / group);
    return q;
}

/* sum of the 32 products of one block, 4 per lane: unsigned weights (0..15, or |w| for int8) times signed x */
static inline __m256 block_dot(__m256i w, __m256i x) {
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);   /* one instruction */
#else
    __m256i pairs = _mm256_maddubs_epi16(w, x);                         /* 2 products per 16-bit lane */
    __m256i sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));      /* 4 per 32-bit lane */
#endif
    return _mm256_cvtepi32_ps(sums);
}

static inline float horizontal_sum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* The int4 products of `rows` weight rows with one row of quantized activations, without the offset
 * term, one block at a time (AVX2). */
static inline void int4_rows(const uint8_t *row, long K, const uint16_t *scales, long groups, long per_group,
                             const int8_t *qx, const float *dx, float *out, const int rows) {
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    __m256 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < K / BLOCK; b++) {
        const __m256i xq = _mm256_load_si256((const __m256i *)(qx + b * BLOCK));
        const __m256 d = _mm256_set1_ps(dx[b]);
        for (int r = 0; r < rows; r++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(row + r * (K / 2) + b * 16));
            __m128i even = _mm_and_si128(bytes, low_nibbles);
            __m128i odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
            __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(bf16_to_float(scales[r * groups + b / per_group])));
            acc[r] = _mm256_fmadd_ps(block_dot(_mm256_set_m128i(odd, even), xq), scale, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = horizontal_sum(acc[r]);
}

#if WIDE
/* The same, two blocks at a time in 512-bit registers. Lanes 0-3 and 8-11 hold block b's sums, lanes
 * 4-7 and 12-15 block b+1's: each gets its own scale through the mask 0xF0F0. */
static inline void int4_rows_wide(const uint8_t *row, long K, const uint16_t *scales, long groups,
                                  long per_group, const int8_t *qx, const float *dx, float *out, const int rows) {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    /* The next rows' bytes, fetched ahead: each row is only a few cache lines, too short a stream for
     * the hardware prefetcher to pick up, so without this every row group starts with a wait on memory. */
    const char *next = (const char *)(row + ROWS * (K / 2));
    for (long b = 0; b < K / BLOCK; b += 2) {
        _mm_prefetch(next + b * 64, _MM_HINT_T0);               /* ROWS * K/2 bytes over K/64 steps */
        _mm_prefetch(next + b * 64 + 64, _MM_HINT_T0);
        const __m512i xq = _mm512_load_si512((const void *)(qx + b * BLOCK));
        const __m512 d = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(dx[b]), _mm512_set1_ps(dx[b + 1]));
        for (int r = 0; r < rows; r++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(row + r * (K / 2) + b * 16));
            __m256i even = _mm256_and_si256(bytes, low_nibbles);
            __m256i odd = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
            __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
            __m512 s;
            if (per_group == 1) {       /* two bf16 scales side by side: one 32-bit load, split in lanes */
                uint32_t pair;
                memcpy(&pair, scales + r * groups + b, 4);
                __m512i both = _mm512_set1_epi32((int)pair);
                s = _mm512_castsi512_ps(_mm512_mask_blend_epi32(0xF0F0, _mm512_slli_epi32(both, 16),
                                                                _mm512_and_si512(both, high_half)));
            } else {                    /* both blocks in one group */
                s = _mm512_set1_ps(bf16_to_float(scales[r * groups + b / per_group]));
            }
            __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, d), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

/* sum over groups g of o[g] * X[g], o in bf16 */
static inline float offset_term(const uint16_t *o, const float *X, long groups) {
    __m256 acc = _mm256_setzero_ps();
    long g = 0;
    for (; g + 8 <= groups; g += 8) acc = _mm256_fmadd_ps(load8(o, 1, g), _mm256_loadu_ps(X + g), acc);
    float sum = horizontal_sum(acc);
    for (; g < groups; g++) sum += bf16_to_float(o[g]) * X[g];
    return sum;
}

int int4_matmul(const void *x, int x_bf16, long M, long K, long N, const uint8_t *packed,
                const uint16_t *scales, const uint16_t *offsets, long group, void *y, int y_bf16) {
    if (K % BLOCK || group % BLOCK || K % group) return -2;
    const int wide = WIDE && K % (2 * BLOCK) == 0;
    float *dx, *X;
    int8_t *qx = quantize_rows(x, x_bf16, M, K, wide ? NIBBLE_PAIRS : NIBBLES, group, &dx, &X);
    if (!qx) return -1;
    const long groups = K / group, per_group = group / BLOCK;
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n += ROWS) {
        const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
        const uint8_t *row = packed + n * (K / 2);
        const uint16_t *row_scales = scales + n * groups;
        for (long m = 0; m < M; m++) {
            float out[ROWS];
            const int8_t *q = qx + m * K;
            const float *d = dx + m * K / BLOCK;
#if WIDE
            if (wide && rows == ROWS) int4_rows_wide(row, K, row_scales, groups, per_group, q, d, out, ROWS);
            else if (wide) int4_rows_wide(row, K, row_scales, groups, per_group, q, d, out, rows);
            else
#endif
            if (rows == ROWS) int4_rows(row, K, row_scales, groups, per_group, q, d, out, ROWS);  /* unrolled */
            else int4_rows(row, K, row_scales, groups, per_group, q, d, out, rows);
            for (int r = 0; r < rows; r++)
                store_y(y, y_bf16, m * N + n + r, out[r] + offset_term(offsets + (n + r) * groups, X + m * groups, groups));
        }
    }
    free(qx);
    return 0;
}

int int8_matmul(const void *x, int x_bf16, long M, long K, long N, const int8_t *weight,
                const uint16_t *scale, void *y, int y_bf16) {
    if (K % BLOCK) return -2;
    float *dx, *X;
    int8_t *qx = quantize_rows(x, x_bf16, M, K, PLAIN, K, &dx, &X);
    if (!qx) return -1;
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        const int8_t *row = weight + n * K;
        for (long m = 0; m < M; m++) {
            const int8_t *q = qx + m * K;
            const float *d = dx + m * K / BLOCK;
            __m256 acc = _mm256_setzero_ps();
            for (long b = 0; b < K / BLOCK; b++) {
                _mm_prefetch((const char *)(row + K + b * BLOCK), _MM_HINT_T0);   /* the next row (see int4) */
                __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * BLOCK));
                __m256i xb = _mm256_load_si256((const __m256i *)(q + b * BLOCK));
                /* the instructions take one unsigned operand: |w| times x with w's sign moved onto x */
                acc = _mm256_fmadd_ps(block_dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xb, w)),
                                      _mm256_set1_ps(d[b]), acc);
            }
            store_y(y, y_bf16, m * N + n, bf16_to_float(scale[n]) * horizontal_sum(acc));
        }
    }
    free(qx);
    return 0;
}
