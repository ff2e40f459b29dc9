/* A Q4_1 x Q8_1 matmul that unpacks each weight block once for four activation columns.
 *
 * Why it exists: on AVX2, ggml has no batched kernel for Q4_1 (no CPU_REPACK layout, no
 * tinyBLAS type), so ggml_mul_mat runs ggml_vec_dot_q4_1_q8_1 once per (row, column): for N
 * columns it unpacks every weight block N times and converts its scales N times. Batched
 * decoding, speculative verification and prefill are N > 1 products, and that repeated work is
 * most of their time on SmolLM2 Q4_1.
 *
 * Each column's result is bit for bit ggml's: per column, the same float operations in the same
 * order as ggml_vec_dot_q4_1_q8_1's AVX2 loop (acc = fma(d_x * d_y, float(sum of products), acc);
 * summs = fma(m_x, s_y, summs); hsum(acc) + summs), which GCC and Clang compile with a fused
 * summs. Only the integer unpacking and the scale conversions are shared between columns.
 * tnn_q4_1_tiles_available() checks that claim at run time against ggml's own vec_dot on
 * pseudo-random blocks (the integer dot is exact, so AVX-VNNI builds agree too) and reports the
 * kernel unavailable where it does not hold; Python then keeps ggml_mul_mat.
 *
 * The activations are quantized to Q8_1 by a ggml_cpy node in the graph: the same from_float
 * ggml_mul_mat applies to them. */
#include "tinynn_internal.h"

#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TILES_X86 1
#include <immintrin.h>
#endif

/* ggml-common.h's block layouts (that header is private to ggml); sizes checked at run time */
typedef struct { uint16_t d, m; uint8_t qs[16]; } q4_1_block;   /* x = d * q + m, q in 0..15 */
typedef struct { uint16_t d, s; int8_t qs[32]; } q8_1_block;    /* y = d * q; s = d * sum(q) */

enum { TILE_COLS = 4, ROW_BLOCK = 64, MAX_BLOCKS = 512 /* K <= 16384 */ };

#ifdef TILES_X86
#define TILES_TARGET __attribute__((target("avx2,fma,f16c")))

TILES_TARGET static inline float hsum_float_8(__m256 x) {   /* ggml's order of additions */
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

/* One weight row against nc <= 4 columns. y[c] are the columns' blocks; yd/ys hold their d and s
 * as floats, [block][TILE_COLS]. */
TILES_TARGET static inline __attribute__((always_inline)) void
row_x_cols(int nc, int nb, const q4_1_block * x, const q8_1_block * const * y, const float * yd, const float * ys,
           float * out, size_t out_stride) {
    const __m256i low_mask = _mm256_set1_epi8(0xF);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[TILE_COLS];
#pragma GCC unroll 4   /* unrolled, acc[] lives in registers */
    for (int c = 0; c < nc; c++) acc[c] = _mm256_setzero_ps();
    __m128 summs = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m256 d0 = _mm256_set1_ps(_cvtsh_ss(x[b].d));
        summs = _mm_fmadd_ps(_mm_set1_ps(_cvtsh_ss(x[b].m)), _mm_loadu_ps(ys + TILE_COLS * b), summs);
        const __m128i tmp = _mm_loadu_si128((const __m128i *) x[b].qs);
        const __m256i qx = _mm256_and_si256(low_mask, _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp));
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) {
            const __m256 d0d1 = _mm256_mul_ps(d0, _mm256_broadcast_ss(yd + TILE_COLS * b + c));   /* d_x * d_y */
            const __m256i qy = _mm256_loadu_si256((const __m256i *) y[c][b].qs);
            const __m256 xy = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy)));
            acc[c] = _mm256_fmadd_ps(d0d1, xy, acc[c]);
        }
    }
    float s[4];
    _mm_storeu_ps(s, summs);
#pragma GCC unroll 4
    for (int c = 0; c < nc; c++) out[c * out_stride] = hsum_float_8(acc[c]) + s[c];
}

/* rows [r0, r1) of dst = w * xq, every column */
TILES_TARGET static void rows_x_all_cols(struct ggml_tensor * dst, const struct ggml_tensor * w,
                                         const struct ggml_tensor * xq, int64_t r0, int64_t r1) {
    const int nb = (int) (w->ne[0] / 32);
    const int64_t n_cols = xq->ne[1];
    const size_t dst_stride = dst->nb[1] / sizeof(float);
    float yd[TILE_COLS * MAX_BLOCKS], ys[TILE_COLS * MAX_BLOCKS];
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t rb_end = rb + ROW_BLOCK < r1 ? rb + ROW_BLOCK : r1;
        for (int64_t c0 = 0; c0 < n_cols; c0 += TILE_COLS) {
            const int nc = (int) (n_cols - c0 < TILE_COLS ? n_cols - c0 : TILE_COLS);
            const q8_1_block * y[TILE_COLS];
            for (int c = 0; c < nc; c++) {
                y[c] = (const q8_1_block *) ((const char *) xq->data + (c0 + c) * xq->nb[1]);
                for (int b = 0; b < nb; b++) {
                    yd[TILE_COLS * b + c] = _cvtsh_ss(y[c][b].d);
                    ys[TILE_COLS * b + c] = _cvtsh_ss(y[c][b].s);
                }
            }
            for (int c = nc; c < TILE_COLS; c++)
                for (int b = 0; b < nb; b++) yd[TILE_COLS * b + c] = ys[TILE_COLS * b + c] = 0.0f;
            float * out = (float *) dst->data + c0 * dst_stride;
            for (int64_t r = rb; r < rb_end; r++) {
                const q4_1_block * x = (const q4_1_block *) ((const char *) w->data + r * w->nb[1]);
                switch (nc) {   /* constant nc: each case is its own unrolled loop */
                case 4: row_x_cols(4, nb, x, y, yd, ys, out + r, dst_stride); break;
                case 3: row_x_cols(3, nb, x, y, yd, ys, out + r, dst_stride); break;
                case 2: row_x_cols(2, nb, x, y, yd, ys, out + r, dst_stride); break;
                default: row_x_cols(1, nb, x, y, yd, ys, out + r, dst_stride); break;
                }
            }
        }
    }
}
#endif

/* ggml_custom_4d callback: dst [M, N] = src[0] (Q4_1 [K, M]) x src[1] (Q8_1 [K, N]); thread ith
 * of nth takes a contiguous run of rows */
static void q4_1_tiles_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
#ifdef TILES_X86
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * xq = dst->src[1];
    const int64_t m = w->ne[1];
    const int64_t per = (m + nth - 1) / nth;
    const int64_t r0 = per * ith, r1 = r0 + per < m ? r0 + per : m;
    if (r0 < r1) rows_x_all_cols(dst, w, xq, r0, r1);
#else
    (void) dst; (void) ith; (void) nth;
#endif
}

#ifdef TILES_X86
/* Our kernel against ggml's vec_dot on pseudo-random blocks, 1..4 columns: any difference, and
 * the kernel is not used. */
static bool self_test(void) {
    const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(GGML_TYPE_Q4_1);
    if (tr->vec_dot == NULL || tr->vec_dot_type != GGML_TYPE_Q8_1) return false;
    enum { NB = 7, ROWS = 3, COLS = 5 };
    q4_1_block wx[ROWS][NB];
    q8_1_block yx[COLS][NB];
    uint32_t st = 0x9e3779b9u;
#define NEXT() (st ^= st << 13, st ^= st >> 17, st ^= st << 5, st)
    float f[32 * NB];
    for (int r = 0; r < ROWS; r++) {
        for (int i = 0; i < 32 * NB; i++) f[i] = (float) ((int) (NEXT() % 2001) - 1000) / 137.0f;
        ggml_quantize_chunk(GGML_TYPE_Q4_1, f, wx[r], 0, 1, 32 * NB, NULL);
    }
    for (int c = 0; c < COLS; c++) {
        for (int i = 0; i < 32 * NB; i++) f[i] = (float) ((int) (NEXT() % 2001) - 1000) / 53.0f;
        ggml_get_type_traits_cpu(GGML_TYPE_Q8_1)->from_float(f, yx[c], 32 * NB);
    }
#undef NEXT
    struct ggml_tensor w = {0}, xq = {0}, dst = {0};
    float out[COLS][ROWS];
    w.type = GGML_TYPE_Q4_1; w.ne[0] = 32 * NB; w.ne[1] = ROWS; w.nb[1] = sizeof wx[0]; w.data = wx;
    xq.type = GGML_TYPE_Q8_1; xq.ne[0] = 32 * NB; xq.ne[1] = COLS; xq.nb[1] = sizeof yx[0]; xq.data = yx;
    dst.ne[0] = ROWS; dst.ne[1] = COLS; dst.nb[1] = sizeof out[0]; dst.data = out;
    rows_x_all_cols(&dst, &w, &xq, 0, ROWS);
    for (int c = 0; c < COLS; c++)
        for (int r = 0; r < ROWS; r++) {
            float ref;
            tr->vec_dot(32 * NB, &ref, 0, wx[r], 0, yx[c], 0, 1);
            if (memcmp(&ref, &out[c][r], sizeof ref) != 0) return false;
        }
    return true;
}
#endif

int tnn_q4_1_tiles_available(void) {
#ifdef TILES_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        ggml_cpu_init();   /* ggml's vec_dot reads F16 scales through a table this fills */
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                 ggml_cpu_has_avx2() && ggml_type_size(GGML_TYPE_Q4_1) == sizeof(q4_1_block) &&
                 ggml_type_size(GGML_TYPE_Q8_1) == sizeof(q8_1_block) && self_test();
    }
    return cached;
#else
    return 0;
#endif
}

tnn_tensor * tnn_mul_mat_q4_1_tiles(tnn_session * sess, tnn_tensor * w, tnn_tensor * x) {
    const char * fn = "tnn_mul_mat_q4_1_tiles";
    PROLOGUE(fn);
    if (!tnn_check_weight(sess, w, fn, "w")) return NULL;
    CHECK_T(x, "x");
    if (!tnn_q4_1_tiles_available()) {
        tnn_set_error("%s: this CPU or ggml build has no bit-exact tiled Q4_1 kernel (use tnn_matmul)", fn);
        return NULL;
    }
    if (sess->kind != 0) {
        tnn_set_error("%s: the tiled Q4_1 kernel runs on the CPU backend only (use tnn_matmul)", fn);
        return NULL;
    }
    if (w->type != GGML_TYPE_Q4_1 || x->type != GGML_TYPE_F32) {
        tnn_set_error("%s: 'w' must be q4_1 and 'x' f32, got %s and %s", fn, ggml_type_name(w->type),
                      ggml_type_name(x->type));
        return NULL;
    }
    if (w->ne[0] != x->ne[0] || w->ne[0] % 32 != 0 || w->ne[0] > 32 * MAX_BLOCKS || w->ne[2] != 1 || w->ne[3] != 1 ||
        x->ne[2] != 1 || x->ne[3] != 1 || w->nb[0] != ggml_type_size(GGML_TYPE_Q4_1) ||
        x->nb[0] != sizeof(float)) {
        char sw[128], sx[128];
        tnn_shape_str(w, sw, sizeof sw);
        tnn_shape_str(x, sx, sizeof sx);
        tnn_set_error("%s: w [K, M] and x [K, N] must be 2-D with contiguous rows, K a multiple of 32 and at most %d "
                      "(got %s and %s)", fn, 32 * MAX_BLOCKS, sw, sx);
        return NULL;
    }
    if (w->extra != NULL || (w->view_src != NULL && w->view_src->extra != NULL)) {
        tnn_set_error("%s: 'w' is stored in ggml's CPU_REPACK layout, which this kernel does not read", fn);
        return NULL;
    }
    struct ggml_tensor * xq = ggml_cpy(sess->ctx_c, x, ggml_new_tensor_2d(sess->ctx_c, GGML_TYPE_Q8_1, x->ne[0], x->ne[1]));
    struct ggml_tensor * args[2] = {w, xq};
    return ggml_custom_4d(sess->ctx_c, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args, 2, q4_1_tiles_op,
                          GGML_N_TASKS_MAX, NULL);
}
