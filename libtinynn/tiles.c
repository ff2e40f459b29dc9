/* Weight x activation products for the weight types where ggml's CPU kernels on AVX2 leave speed
 * on the table: batched products that unpack each weight block once for four activation columns,
 * and single-column products (decode) that interleave rows and prefetch the weights.
 *
 * Why it exists: ggml_mul_mat of N > 1 columns (prefill, batched decoding, speculative
 * verification) runs, per weight type on AVX2:
 *   Q4_1         ggml_vec_dot_q4_1_q8_1 once per (row, column): no CPU_REPACK layout and no
 *                tinyBLAS type, so every weight block is unpacked and its scales converted N times;
 *   Q5_0, Q8_0   llamafile's tinyBLAS_Q0_AVX, in tiles of at most 4 rows x 2 columns (16 vector
 *                registers), so every Q5_0 block is unpacked N / 2 times.
 * Here a weight block is unpacked once and met by 4 columns, whose scales are converted once per
 * 64 rows. With N = 1 (single-stream decode) ggml runs the type's vec_dot a row at a time: one
 * chain of dependent FMAs per row, and no prefetch. Here two rows run at once and the weights a
 * few rows ahead are prefetched.
 *
 * Each result is bit for bit ggml's: per (row, column) the same float operations in the same
 * order as the kernel ggml runs for that type and N; only integer unpacking and exact scale
 * conversions are shared between columns. Integer dot products are exact (no intermediate
 * saturates for these value ranges), so AVX-VNNI builds of ggml agree too.
 *   Q4_1 (vec_dot):    acc = fma(d_w * d_x, float(dot), acc), summs = fma(m_w, s_x, summs) per block
 *                      (GCC and Clang fuse ggml's summs += m * s); result hsum(acc) + summs.
 *   Q5_0/Q8_0 (tinyBLAS for N >= 2, vec_dot for N = 1: the same operations):
 *                      acc = fma(d_w * d_x, float(dot of |w| and x * sign(w)), acc) per block;
 *                      result hsum(acc).
 * tnn_tiles_available(type) checks that claim at run time against ggml_mul_mat itself (a small
 * graph computed by ggml's CPU backend) and reports the kernel unavailable where it does not
 * hold; Python then keeps ggml_mul_mat.
 *
 * The activations are quantized (to Q8_1 for Q4_1, Q8_0 otherwise: ggml's vec_dot_type) by a
 * ggml_cpy node in the graph: the same from_float that ggml_mul_mat applies to them. */
#include "tinynn_internal.h"

#include "ggml-cpu.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TILES_X86 1
#include <immintrin.h>
#endif

/* ggml-common.h's block layouts (that header is private to ggml); sizes checked at run time */
typedef struct { uint16_t d, m; uint8_t qs[16]; } q4_1_block;             /* w = d * q + m, q in 0..15 */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } q5_0_block; /* w = d * (q - 16), q in 0..31 */
typedef struct { uint16_t d; int8_t qs[32]; } q8_0_block;                 /* w = d * q */
typedef struct { uint16_t d, s; int8_t qs[32]; } q8_1_block;              /* x = d * q; s = d * sum(q) */

enum { TILE_COLS = 4, ROW_BLOCK = 64, MAX_BLOCKS = 512 /* K <= 16384 */ };

static bool tiled_type(enum ggml_type t) {
    return t == GGML_TYPE_Q4_1 || t == GGML_TYPE_Q5_0 || t == GGML_TYPE_Q8_0;
}

#ifdef TILES_X86
#define TILES_TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

TILES_TARGET static INLINE float hsum_float_8(__m256 x) {   /* ggml's and tinyBLAS's order of additions */
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

/* a Q5_0 block's 32 weights as int8 in -16..15 (tinyBLAS's denibble | bittobyte) */
TILES_TARGET static INLINE __m256i unpack_q5_0(const q5_0_block * b) {
    const __m128i lo = _mm_loadu_si128((const __m128i *) b->qs);
    const __m256i q = _mm256_and_si256(_mm256_set1_epi8(15), _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo));
    uint32_t h;
    memcpy(&h, b->qh, sizeof h);
    const __m256i bit = _mm256_cmpeq_epi8(_mm256_set1_epi64x(-1),
        _mm256_or_si256(_mm256_set1_epi64x(0x7fbfdfeff7fbfdfe),
                        _mm256_shuffle_epi8(_mm256_set1_epi32((int) h),
                                            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                              0x0101010101010101, 0x0000000000000000))));
    return _mm256_or_si256(q, _mm256_andnot_si256(bit, _mm256_set1_epi8((char) 0xF0)));
}

/* A weight block as maddubs takes it. wu: the weights as unsigned bytes (its first operand); wq: the
 * signed weights, whose signs move onto the activations (Q5_0 / Q8_0; Q4_1's are unsigned already);
 * d: the block's scale, broadcast; m: Q4_1's minimum. w_type is a constant where this is inlined. */
typedef struct { __m256i wu, wq; __m256 d; float m; } weight_block;
TILES_TARGET static INLINE weight_block load_weight_block(enum ggml_type w_type, const void * w_row, int b) {
    weight_block k;
    k.m = 0.0f;
    if (w_type == GGML_TYPE_Q4_1) {
        const q4_1_block * w = (const q4_1_block *) w_row + b;
        k.d = _mm256_set1_ps(_cvtsh_ss(w->d));
        k.m = _cvtsh_ss(w->m);
        const __m128i lo = _mm_loadu_si128((const __m128i *) w->qs);
        k.wu = k.wq = _mm256_and_si256(_mm256_set1_epi8(0xF), _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo));
        return k;
    }
    if (w_type == GGML_TYPE_Q5_0) {
        const q5_0_block * w = (const q5_0_block *) w_row + b;
        k.d = _mm256_set1_ps(_cvtsh_ss(w->d));
        k.wq = unpack_q5_0(w);
    } else {
        const q8_0_block * w = (const q8_0_block *) w_row + b;
        k.d = _mm256_set1_ps(_cvtsh_ss(w->d));
        k.wq = _mm256_loadu_si256((const __m256i *) w->qs);
    }
    k.wu = _mm256_sign_epi8(k.wq, k.wq);
    return k;
}

/* block b of a quantized column's 32 values (Q8_1 for Q4_1 weights, Q8_0 otherwise) */
TILES_TARGET static INLINE __m256i column_block(enum ggml_type w_type, const void * y, int b) {
    return w_type == GGML_TYPE_Q4_1 ? _mm256_loadu_si256((const __m256i *) ((const q8_1_block *) y + b)->qs)
                                    : _mm256_loadu_si256((const __m256i *) ((const q8_0_block *) y + b)->qs);
}

/* float(dot of a weight block and a column block): exact integer sums (maddubs, then madd) */
TILES_TARGET static INLINE __m256 block_dot(enum ggml_type w_type, const weight_block * k, __m256i yq) {
    const __m256i xq = w_type == GGML_TYPE_Q4_1 ? yq : _mm256_sign_epi8(yq, k->wq);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(k->wu, xq)));
}

/* a quantized column's block scales as floats, xd[step * b] = d (and xs[step * b] = s for Q8_1) */
TILES_TARGET static INLINE void column_scales(enum ggml_type w_type, const void * y, int nb, float * xd, float * xs,
                                              int step) {
    const size_t x_block = w_type == GGML_TYPE_Q4_1 ? sizeof(q8_1_block) : sizeof(q8_0_block);
    for (int b = 0; b < nb; b++) {
        const uint16_t * blk = (const uint16_t *) ((const char *) y + b * x_block);
        xd[step * b] = _cvtsh_ss(blk[0]);
        xs[step * b] = w_type == GGML_TYPE_Q4_1 ? _cvtsh_ss(blk[1]) : 0.0f;
    }
}

/* One weight row against nc <= 4 columns. y[c]: the columns' quantized blocks; xd / xs: their d and
 * s as floats, [block][TILE_COLS]. w_type: the weight's type (a constant where this is inlined). */
TILES_TARGET static INLINE void row_x_cols(enum ggml_type w_type, int nc, int nb, const void * w_row,
                                            const void * const * y, const float * xd, const float * xs,
                                            float * out, size_t out_stride) {
    __m256 acc[TILE_COLS];
#pragma GCC unroll 4   /* unrolled, acc[] lives in registers */
    for (int c = 0; c < nc; c++) acc[c] = _mm256_setzero_ps();
    __m128 summs = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const weight_block k = load_weight_block(w_type, w_row, b);
        if (w_type == GGML_TYPE_Q4_1)
            summs = _mm_fmadd_ps(_mm_set1_ps(k.m), _mm_loadu_ps(xs + TILE_COLS * b), summs);
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) {
            const __m256 d = _mm256_mul_ps(k.d, _mm256_broadcast_ss(xd + TILE_COLS * b + c));   /* d_w * d_x */
            acc[c] = _mm256_fmadd_ps(d, block_dot(w_type, &k, column_block(w_type, y[c], b)), acc[c]);
        }
    }
    float s[4];
    _mm_storeu_ps(s, summs);
#pragma GCC unroll 4
    for (int c = 0; c < nc; c++)
        out[c * out_stride] = hsum_float_8(acc[c]) + (w_type == GGML_TYPE_Q4_1 ? s[c] : 0.0f);
}

/* One column. ggml's vec_dot at N = 1 takes a row at a time, a chain of dependent FMAs, and leaves
 * the weights to the hardware prefetcher. Here COL1_ROWS rows go at once, each with its own
 * accumulator and ggml's operations for that row, while the rows PREFETCH_AHEAD further on are
 * prefetched (README, "Speed": without the prefetch this is slower than ggml's). xd / xs: the
 * column's d and s as floats, per block. */
enum { COL1_ROWS = 2, PREFETCH_AHEAD = 4 };
TILES_TARGET static INLINE void rows_x_col1(enum ggml_type w_type, int nr, int nb, const char * w_rows,
                                             size_t w_stride, const void * y, const float * xd, const float * xs,
                                             float * out, int n_prefetch, size_t row_bytes) {
    for (int i = 0; i < n_prefetch; i++)
        for (size_t o = 0; o < row_bytes; o += 64)
            _mm_prefetch(w_rows + (PREFETCH_AHEAD + i) * w_stride + o, _MM_HINT_T0);
    __m256 acc[COL1_ROWS];
    float summs[COL1_ROWS];
#pragma GCC unroll 2
    for (int i = 0; i < nr; i++) { acc[i] = _mm256_setzero_ps(); summs[i] = 0.0f; }
    for (int b = 0; b < nb; b++) {
        const __m256 dx = _mm256_set1_ps(xd[b]);
        const __m256i yq = column_block(w_type, y, b);
#pragma GCC unroll 2
        for (int i = 0; i < nr; i++) {
            const weight_block k = load_weight_block(w_type, w_rows + i * w_stride, b);
            if (w_type == GGML_TYPE_Q4_1) summs[i] = __builtin_fmaf(k.m, xs[b], summs[i]);
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(k.d, dx), block_dot(w_type, &k, yq), acc[i]);   /* d_w * d_x */
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < nr; i++) out[i] = hsum_float_8(acc[i]) + (w_type == GGML_TYPE_Q4_1 ? summs[i] : 0.0f);
}

/* rows [r0, r1) of dst = w * xq for a single column xq */
TILES_TARGET static INLINE void rows_x_one_col(enum ggml_type w_type, struct ggml_tensor * dst,
                                               const struct ggml_tensor * w, const struct ggml_tensor * xq,
                                               int64_t r0, int64_t r1) {
    const int nb = (int) (w->ne[0] / 32);
    const size_t row_bytes = (size_t) nb * ggml_type_size(w_type), w_stride = w->nb[1];
    float xd[MAX_BLOCKS], xs[MAX_BLOCKS];
    column_scales(w_type, xq->data, nb, xd, xs, 1);
    float * out = (float *) dst->data;
    for (int64_t r = r0; r < r1; r += COL1_ROWS) {
        const char * rows = (const char *) w->data + r * w_stride;
        const int64_t ahead = r1 - (r + PREFETCH_AHEAD);   /* this thread's rows left past the prefetch point */
        const int n_prefetch = ahead <= 0 ? 0 : ahead < COL1_ROWS ? (int) ahead : COL1_ROWS;
        if (r1 - r >= COL1_ROWS) rows_x_col1(w_type, COL1_ROWS, nb, rows, w_stride, xq->data, xd, xs, out + r, n_prefetch, row_bytes);
        else rows_x_col1(w_type, 1, nb, rows, w_stride, xq->data, xd, xs, out + r, n_prefetch, row_bytes);
    }
}

/* rows [r0, r1) of dst = w * xq (xq: every column, quantized), for one weight type */
TILES_TARGET static INLINE void rows_x_cols(enum ggml_type w_type, struct ggml_tensor * dst,
                                            const struct ggml_tensor * w, const struct ggml_tensor * xq,
                                            int64_t r0, int64_t r1) {
    if (xq->ne[1] == 1) { rows_x_one_col(w_type, dst, w, xq, r0, r1); return; }
    const int nb = (int) (w->ne[0] / 32);
    const int64_t n_cols = xq->ne[1];
    const size_t dst_stride = dst->nb[1] / sizeof(float);
    float xd[TILE_COLS * MAX_BLOCKS], xs[TILE_COLS * MAX_BLOCKS];
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t rb_end = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;
        for (int64_t c0 = 0; c0 < n_cols; c0 += TILE_COLS) {
            const int nc = (int) (n_cols - c0 < TILE_COLS ? n_cols - c0 : TILE_COLS);
            const void * y[TILE_COLS];
            for (int c = 0; c < TILE_COLS; c++) {
                y[c] = (const char *) xq->data + (c0 + (c < nc ? c : 0)) * xq->nb[1];
                if (c < nc) {
                    column_scales(w_type, y[c], nb, xd + c, xs + c, TILE_COLS);
                } else {   /* lanes of no column: computed beside the others, never read */
                    for (int b = 0; b < nb; b++) xd[TILE_COLS * b + c] = xs[TILE_COLS * b + c] = 0.0f;
                }
            }
            float * out = (float *) dst->data + c0 * dst_stride;
            for (int64_t r = rb; r < rb_end; r++) {
                const void * row = (const char *) w->data + r * w->nb[1];
                switch (nc) {   /* constant nc: each case is its own unrolled loop */
                case 4: row_x_cols(w_type, 4, nb, row, y, xd, xs, out + r, dst_stride); break;
                case 3: row_x_cols(w_type, 3, nb, row, y, xd, xs, out + r, dst_stride); break;
                case 2: row_x_cols(w_type, 2, nb, row, y, xd, xs, out + r, dst_stride); break;
                default: row_x_cols(w_type, 1, nb, row, y, xd, xs, out + r, dst_stride); break;
                }
            }
        }
    }
}

TILES_TARGET static void rows_q4_1(struct ggml_tensor * d, const struct ggml_tensor * w, const struct ggml_tensor * x,
                                   int64_t r0, int64_t r1) { rows_x_cols(GGML_TYPE_Q4_1, d, w, x, r0, r1); }
TILES_TARGET static void rows_q5_0(struct ggml_tensor * d, const struct ggml_tensor * w, const struct ggml_tensor * x,
                                   int64_t r0, int64_t r1) { rows_x_cols(GGML_TYPE_Q5_0, d, w, x, r0, r1); }
TILES_TARGET static void rows_q8_0(struct ggml_tensor * d, const struct ggml_tensor * w, const struct ggml_tensor * x,
                                   int64_t r0, int64_t r1) { rows_x_cols(GGML_TYPE_Q8_0, d, w, x, r0, r1); }

static void rows_of(struct ggml_tensor * dst, const struct ggml_tensor * w, const struct ggml_tensor * xq,
                    int64_t r0, int64_t r1) {
    switch (w->type) {
    case GGML_TYPE_Q4_1: rows_q4_1(dst, w, xq, r0, r1); break;
    case GGML_TYPE_Q5_0: rows_q5_0(dst, w, xq, r0, r1); break;
    default:             rows_q8_0(dst, w, xq, r0, r1); break;
    }
}
#endif

/* ggml_custom_4d callback: dst [M, N] = src[0] (the weight [K, M]) x src[1] (the quantized
 * activations [K, N]); thread ith of nth takes a contiguous run of rows (measured faster here than
 * handing out chunks of rows through an atomic counter, as ggml_mul_mat does: each thread then
 * streams one run of weights) */
static void tiles_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
#ifdef TILES_X86
    const struct ggml_tensor * w = dst->src[0];
    const int64_t m = w->ne[1];
    const int64_t per = (m + nth - 1) / nth;
    const int64_t r0 = per * ith, r1 = r0 + per < m ? r0 + per : m;
    if (r0 < r1) rows_of(dst, w, dst->src[1], r0, r1);
#else
    (void) dst; (void) ith; (void) nth;
#endif
}

#ifdef TILES_X86
/* Our kernel against ggml_mul_mat, computed by ggml's CPU backend, on pseudo-random weights and
 * activations, 1..7 columns (vec_dot at 1, ggml's N >= 2 path from 2), 11 rows: any difference, and the kernel
 * is not used for that type. */
static bool self_test(enum ggml_type type) {
    const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(type);
    enum ggml_type x_type = type == GGML_TYPE_Q4_1 ? GGML_TYPE_Q8_1 : GGML_TYPE_Q8_0;
    if (tr->vec_dot_type != x_type) return false;
    enum { K = 32 * 7, ROWS = 11, MAX_COLS = 7 };
    struct ggml_init_params ip = {4 << 20, NULL, false};
    struct ggml_context * ctx = ggml_init(ip);
    if (ctx == NULL) return false;
    struct ggml_tensor * w = ggml_new_tensor_2d(ctx, type, K, ROWS);
    struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, MAX_COLS);
    struct ggml_tensor * xq = ggml_new_tensor_2d(ctx, x_type, K, MAX_COLS);
    struct ggml_tensor * ours = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ROWS, MAX_COLS);
    uint32_t st = 0x9e3779b9u;
#define NEXT() (st ^= st << 13, st ^= st >> 17, st ^= st << 5, st)
    float f[K * ROWS];
    for (int i = 0; i < K * ROWS; i++) f[i] = (float) ((int) (NEXT() % 2001) - 1000) / 137.0f;
    ggml_quantize_chunk(type, f, w->data, 0, ROWS, K, NULL);
    for (int i = 0; i < K * MAX_COLS; i++) ((float *) x->data)[i] = (float) ((int) (NEXT() % 2001) - 1000) / 53.0f;
#undef NEXT
    for (int c = 0; c < MAX_COLS; c++)
        ggml_get_type_traits_cpu(x_type)->from_float((const float *) x->data + c * K,
                                                     (char *) xq->data + c * xq->nb[1], K);
    bool same = true;
    for (int n = 1; n <= MAX_COLS && same; n++) {
        struct ggml_tensor * xn = ggml_view_2d(ctx, x, K, n, x->nb[1], 0);
        struct ggml_tensor * ref = ggml_mul_mat(ctx, w, xn);
        struct ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, ref);
        if (ggml_graph_compute_with_ctx(ctx, gf, 1) != GGML_STATUS_SUCCESS) { same = false; break; }
        struct ggml_tensor xqn = *xq, dst = *ours;
        xqn.ne[1] = n;
        dst.ne[1] = n;
        rows_of(&dst, w, &xqn, 0, ROWS);
        same = memcmp(ref->data, ours->data, sizeof(float) * ROWS * n) == 0;
    }
    ggml_free(ctx);
    return same;
}
#endif

int tnn_tiles_available(int type) {
#ifdef TILES_X86
    static int cached[3] = {-1, -1, -1};   /* Q4_1, Q5_0, Q8_0 */
    if (type < 0 || type >= GGML_TYPE_COUNT || !tiled_type((enum ggml_type) type)) return 0;
    int *c = &cached[type == GGML_TYPE_Q4_1 ? 0 : type == GGML_TYPE_Q5_0 ? 1 : 2];
    if (*c < 0) {
        __builtin_cpu_init();
        ggml_cpu_init();   /* ggml's kernels read F16 scales through a table this fills */
        *c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             ggml_cpu_has_avx2() && ggml_type_size(GGML_TYPE_Q4_1) == sizeof(q4_1_block) &&
             ggml_type_size(GGML_TYPE_Q5_0) == sizeof(q5_0_block) && ggml_type_size(GGML_TYPE_Q8_0) == sizeof(q8_0_block) &&
             ggml_type_size(GGML_TYPE_Q8_1) == sizeof(q8_1_block) && self_test((enum ggml_type) type);
    }
    return *c;
#else
    (void) type;
    return 0;
#endif
}

/* Whether w x can take a tiled kernel; with fn, a refusal says why through tnn_set_error (the
 * one place both tnn_mul_mat_tiles and the query tnn_tiles_apply decide it). */
static bool tiles_fit(const tnn_session * sess, const struct ggml_tensor * w, const struct ggml_tensor * x,
                      const char * fn) {
    if (!tiled_type(w->type) || x->type != GGML_TYPE_F32) {
        if (fn) tnn_set_error("%s: 'w' must be q4_1, q5_0 or q8_0 and 'x' f32, got %s and %s", fn,
                              ggml_type_name(w->type), ggml_type_name(x->type));
        return false;
    }
    if (!tnn_tiles_available(w->type)) {
        if (fn) tnn_set_error("%s: this CPU or ggml build has no bit-exact tiled %s kernel (use tnn_matmul)", fn,
                              ggml_type_name(w->type));
        return false;
    }
    if (sess->kind != 0) {
        if (fn) tnn_set_error("%s: the tiled kernels run on the CPU backend only (use tnn_matmul)", fn);
        return false;
    }
    if (w->ne[0] != x->ne[0] || w->ne[0] % 32 != 0 || w->ne[0] > 32 * MAX_BLOCKS || w->ne[2] != 1 || w->ne[3] != 1 ||
        x->ne[2] != 1 || x->ne[3] != 1 || w->nb[0] != ggml_type_size(w->type) || x->nb[0] != sizeof(float)) {
        if (fn) {
            char sw[128], sx[128];
            tnn_shape_str(w, sw, sizeof sw);
            tnn_shape_str(x, sx, sizeof sx);
            tnn_set_error("%s: w [K, M] and x [K, N] must be 2-D with contiguous rows, K a multiple of 32 and at most "
                          "%d (got %s and %s)", fn, 32 * MAX_BLOCKS, sw, sx);
        }
        return false;
    }
    if (w->extra != NULL || (w->view_src != NULL && w->view_src->extra != NULL)) {   /* ggml's repacked layout */
        if (fn) tnn_set_error("%s: 'w' is stored in ggml's CPU_REPACK layout, which this kernel does not read", fn);
        return false;
    }
    return true;
}

int tnn_tiles_apply(tnn_session * sess, tnn_tensor * w, tnn_tensor * x) {
    const char * fn = "tnn_tiles_apply";
    if (!tnn_check_session(sess, fn) || !tnn_check_weight(sess, w, fn, "w") || !tnn_check_tensor(sess, x, fn, "x"))
        return -1;
    return tiles_fit(sess, w, x, NULL) ? 1 : 0;
}

tnn_tensor * tnn_mul_mat_tiles(tnn_session * sess, tnn_tensor * w, tnn_tensor * x) {
    const char * fn = "tnn_mul_mat_tiles";
    PROLOGUE(fn);
    if (!tnn_check_weight(sess, w, fn, "w")) return NULL;
    CHECK_T(x, "x");
    if (!tiles_fit(sess, w, x, fn)) return NULL;
    enum ggml_type x_type = w->type == GGML_TYPE_Q4_1 ? GGML_TYPE_Q8_1 : GGML_TYPE_Q8_0;
    struct ggml_tensor * xq = ggml_cpy(sess->ctx_c, x, ggml_new_tensor_2d(sess->ctx_c, x_type, x->ne[0], x->ne[1]));
    struct ggml_tensor * args[2] = {w, xq};
    return ggml_custom_4d(sess->ctx_c, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args, 2, tiles_op, GGML_N_TASKS_MAX,
                          NULL);
}
