/* Graph ops: each validates what ggml would assert on, then makes one ggml
 * call in the session's compute context. Policy (which rope mode, which
 * scale) lives in Python; these only check and forward. */
#include "tinynn_internal.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>

static bool fail_shape(const char * fn, const char * why, const struct ggml_tensor * a, const struct ggml_tensor * b) {
    char sa[128] = "", sb[128] = "";
    if (a) tnn_shape_str(a, sa, sizeof sa);
    if (b) tnn_shape_str(b, sb, sizeof sb);
    tnn_set_error("%s: %s (got %s%s%s)", fn, why, sa, b ? " and " : "", sb);
    return false;
}

static bool want_type(const char * fn, const char * arg, const struct ggml_tensor * t, enum ggml_type ty) {
    if (t->type != ty) {
        tnn_set_error("%s: '%s' must be %s, got %s", fn, arg, ggml_type_name(ty), ggml_type_name(t->type));
        return false;
    }
    return true;
}

static bool rows_contiguous(const struct ggml_tensor * t) {
    return t->nb[0] == ggml_type_size(t->type);
}

/* The common precondition of single-input F32 ops: the type, and the layout the kernel needs. */
enum layout { ROWS_CONTIGUOUS, FULLY_CONTIGUOUS };

static bool want_f32(const char * fn, const struct ggml_tensor * a, enum layout need) {
    if (a->type != GGML_TYPE_F32) {
        tnn_set_error("%s: 'a' must be f32, got %s", fn, ggml_type_name(a->type));
        return false;
    }
    bool ok = need == FULLY_CONTIGUOUS ? ggml_is_contiguous(a) : rows_contiguous(a);
    if (!ok) {
        char sa[128];
        tnn_shape_str(a, sa, sizeof sa);
        tnn_set_error("%s: 'a' must %s (got %s)", fn,
                      need == FULLY_CONTIGUOUS ? "be contiguous" : "have contiguous rows", sa);
    }
    return ok;
}

/* F32, or a type ggml can turn into floats (F16, BF16, the quantized types with
 * a to_float). Excludes I8..I64, F64 and the activation-only Q8_1/Q8_K, for
 * which the CPU kernels (mul_mat, cpy) have no implementation and crash. */
static bool float_like(enum ggml_type t) {
    return t == GGML_TYPE_F32 || ggml_get_type_traits(t)->to_float != NULL;
}

static bool want_float_like(const char * fn, const char * arg, const struct ggml_tensor * t) {
    if (!float_like(t->type)) {
        tnn_set_error("%s: '%s' must be a float or dequantizable quantized type, got %s", fn, arg,
                      ggml_type_name(t->type));
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ lookups & matmuls */

tnn_tensor * tnn_get_rows(tnn_session * sess, tnn_tensor * table, tnn_tensor * ids) {
    const char * fn = "tnn_get_rows";
    PROLOGUE(fn);
    CHECK_T(table, "table");
    CHECK_T(ids, "ids");
    if (!want_type(fn, "ids", ids, GGML_TYPE_I32)) return NULL;
    if (table->ne[2] != ids->ne[1] || table->ne[3] != ids->ne[2] || ids->ne[3] != 1) {
        fail_shape(fn, "ids must be [n, table.ne2, table.ne3]", table, ids);
        return NULL;
    }
    if (!float_like(table->type) || !rows_contiguous(table)) { /* no CPU kernel for I8..F64, Q8_1, Q8_K */
        fail_shape(fn, "table must be a float or dequantizable quantized tensor with contiguous rows", table, NULL);
        return NULL;
    }
    return ggml_get_rows(sess->ctx_c, table, ids);
}

tnn_tensor * tnn_matmul(tnn_session * sess, tnn_tensor * w, tnn_tensor * x) {
    const char * fn = "tnn_matmul";
    PROLOGUE(fn);
    if (!tnn_check_weight(sess, w, fn, "w")) return NULL;
    CHECK_T(x, "x");
    if (!want_type(fn, "x", x, GGML_TYPE_F32)) return NULL;
    if (w->ne[0] != x->ne[0] || x->ne[2] % w->ne[2] != 0 || x->ne[3] % w->ne[3] != 0) {
        fail_shape(fn, "w.ne0 must equal x.ne0 and x.ne2/ne3 must be multiples of w's", w, x);
        return NULL;
    }
    if (ggml_is_transposed(w) || !rows_contiguous(w) || !rows_contiguous(x)) {
        fail_shape(fn, "w and x need contiguous rows (materialize transposes with tnn_cont)", w, x);
        return NULL;
    }
    if (!want_float_like(fn, "w", w)) return NULL;
    return ggml_mul_mat(sess->ctx_c, w, x);
}

/* llama.cpp rotates Q/K/V of quantized KV caches by a Walsh-Hadamard matrix; ggml's CPU backend
 * computes a mul_mat hinted this way with a fast transform, so we must hint it too to match. */
tnn_tensor * tnn_mul_mat_hadamard(tnn_session * sess, tnn_tensor * rot, tnn_tensor * x) {
    const char * fn = "tnn_mul_mat_hadamard";
    PROLOGUE(fn);
    CHECK_T(rot, "rot");
    CHECK_T(x, "x");
    if (!want_type(fn, "rot", rot, GGML_TYPE_F32) || !want_type(fn, "x", x, GGML_TYPE_F32)) return NULL;
    int64_t n = rot->ne[0];
    if (n < 1 || (n & (n - 1)) != 0 || rot->ne[1] != n || rot->ne[2] != 1 || rot->ne[3] != 1 || x->ne[0] != n ||
        !ggml_is_contiguous(rot) || !rows_contiguous(x)) {
        fail_shape(fn, "rot must be a square power-of-two F32 matrix and x.ne0 == its size", rot, x);
        return NULL;
    }
    struct ggml_tensor * r = ggml_mul_mat(sess->ctx_c, rot, x);
    ggml_mul_mat_set_hint(r, GGML_HINT_SRC0_IS_HADAMARD);
    return r;
}

tnn_tensor * tnn_mul_mat_id(tnn_session * sess, tnn_tensor * as, tnn_tensor * b, tnn_tensor * ids) {
    const char * fn = "tnn_mul_mat_id";
    PROLOGUE(fn);
    if (!tnn_check_weight(sess, as, fn, "as")) return NULL;
    CHECK_T(b, "b");
    CHECK_T(ids, "ids");
    if (!want_type(fn, "ids", ids, GGML_TYPE_I32) || !want_type(fn, "b", b, GGML_TYPE_F32)) return NULL;
    if (!want_float_like(fn, "as", as)) return NULL;
    if (ggml_is_transposed(as) || !rows_contiguous(as) || as->ne[3] != 1 || b->ne[3] != 1 || ids->ne[2] != 1 ||
        ids->ne[3] != 1) {
        fail_shape(fn, "as must be 3-D [k, m, n_experts] with contiguous rows, b 3-D, ids 2-D", as, b);
        return NULL;
    }
    if (as->ne[0] != b->ne[0] || ids->ne[1] != b->ne[2] || ids->ne[0] % b->ne[1] != 0) {
        fail_shape(fn, "need as.ne0 == b.ne0, ids.ne1 == b.ne2, ids.ne0 % b.ne1 == 0", as, b);
        return NULL;
    }
    return ggml_mul_mat_id(sess->ctx_c, as, b, ids);
}

/* ------------------------------------------------------------------ element-wise */

static tnn_tensor * binary(tnn_session * sess, tnn_tensor * a, tnn_tensor * b, const char * fn, int which) {
    PROLOGUE(fn);
    CHECK_T(a, "a");
    CHECK_T(b, "b");
    if (!want_type(fn, "a", a, GGML_TYPE_F32) || !want_type(fn, "b", b, GGML_TYPE_F32)) return NULL;
    if (!ggml_can_repeat(b, a)) {
        fail_shape(fn, "b must broadcast over a (each a.ne[i] a multiple of b.ne[i])", a, b);
        return NULL;
    }
    if (!rows_contiguous(a)) { /* the CPU kernel asserts it */
        fail_shape(fn, "a must have contiguous rows", a, NULL);
        return NULL;
    }
    switch (which) {
        case 0: return ggml_add(sess->ctx_c, a, b);
        case 1: return ggml_mul(sess->ctx_c, a, b);
        default: return ggml_div(sess->ctx_c, a, b);
    }
}

tnn_tensor * tnn_add(tnn_session * sess, tnn_tensor * a, tnn_tensor * b) { return binary(sess, a, b, "tnn_add", 0); }
tnn_tensor * tnn_mul(tnn_session * sess, tnn_tensor * a, tnn_tensor * b) { return binary(sess, a, b, "tnn_mul", 1); }
tnn_tensor * tnn_div(tnn_session * sess, tnn_tensor * a, tnn_tensor * b) { return binary(sess, a, b, "tnn_div", 2); }

tnn_tensor * tnn_scale(tnn_session * sess, tnn_tensor * a, float s) {
    const char * fn = "tnn_scale";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_type(fn, "a", a, GGML_TYPE_F32)) return NULL;
    if (!rows_contiguous(a) || a->nb[2] != a->nb[1] * a->ne[1] || a->nb[3] != a->nb[2] * a->ne[2]) {
        /* ggml_scale asserts ggml_is_padded_1d(a), which ggml does not export */
        fail_shape(fn, "a must have contiguous rows, stacked without gaps (use tnn_cont)", a, NULL);
        return NULL;
    }
    return ggml_scale(sess->ctx_c, a, s);
}

static tnn_tensor * unary(tnn_session * sess, tnn_tensor * a, const char * fn, int which) {
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_type(fn, "a", a, GGML_TYPE_F32)) return NULL;
    if (!ggml_is_contiguous_rows(a)) {
        fail_shape(fn, "a must have contiguous rows", a, NULL);
        return NULL;
    }
    switch (which) {
        case 0: return ggml_silu(sess->ctx_c, a);
        case 1: return ggml_gelu(sess->ctx_c, a);
        default: return ggml_tanh(sess->ctx_c, a);
    }
}

tnn_tensor * tnn_silu(tnn_session * sess, tnn_tensor * a) { return unary(sess, a, "tnn_silu", 0); }
tnn_tensor * tnn_gelu(tnn_session * sess, tnn_tensor * a) { return unary(sess, a, "tnn_gelu", 1); }

/* llama.cpp's gated FFN: silu(a) * b in one pass (the same float ops as tnn_silu then tnn_mul) */
tnn_tensor * tnn_swiglu_split(tnn_session * sess, tnn_tensor * a, tnn_tensor * b) {
    const char * fn = "tnn_swiglu_split";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    CHECK_T(b, "b");
    if (!want_type(fn, "a", a, GGML_TYPE_F32) || !want_type(fn, "b", b, GGML_TYPE_F32)) return NULL;
    if (!ggml_are_same_shape(a, b) || !ggml_is_contiguous_1(a) || !ggml_is_contiguous_1(b)) {
        fail_shape(fn, "a and b must have the same shape and contiguous rows", a, b);   /* ggml asserts both */
        return NULL;
    }
    return ggml_swiglu_split(sess->ctx_c, a, b);
}
tnn_tensor * tnn_tanh(tnn_session * sess, tnn_tensor * a) { return unary(sess, a, "tnn_tanh", 2); }

/* ------------------------------------------------------------------ normalisation & softmax */

tnn_tensor * tnn_softmax_ext(tnn_session * sess, tnn_tensor * a, tnn_tensor * mask, float scale, float max_bias) {
    const char * fn = "tnn_softmax_ext";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_f32(fn, a, FULLY_CONTIGUOUS)) return NULL;
    if (mask != NULL) {
        CHECK_T(mask, "mask");
        if ((mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) || !ggml_is_contiguous(mask) ||
            mask->ne[0] != a->ne[0] || mask->ne[1] < a->ne[1] || a->ne[2] % mask->ne[2] != 0 ||
            a->ne[3] % mask->ne[3] != 0) {
            fail_shape(fn, "mask must be contiguous F16/F32 with ne0 == a.ne0, ne1 >= a.ne1", a, mask);
            return NULL;
        }
    }
    if (max_bias != 0.0f && mask == NULL) {
        tnn_set_error("%s: max_bias (ALiBi) needs a mask", fn);
        return NULL;
    }
    return ggml_soft_max_ext(sess->ctx_c, a, mask, scale, max_bias);
}

tnn_tensor * tnn_softmax(tnn_session * sess, tnn_tensor * a) {
    const char * fn = "tnn_softmax";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_f32(fn, a, FULLY_CONTIGUOUS)) return NULL;
    return ggml_soft_max(sess->ctx_c, a);
}

tnn_tensor * tnn_rms_norm(tnn_session * sess, tnn_tensor * a, tnn_tensor * gamma, float eps) {
    const char * fn = "tnn_rms_norm";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_f32(fn, a, ROWS_CONTIGUOUS)) return NULL;
    if (!(eps >= 0.0f) || !isfinite(eps)) {
        tnn_set_error("%s: eps must be finite and >= 0, got %g", fn, (double) eps);
        return NULL;
    }
    struct ggml_tensor * y = ggml_rms_norm(sess->ctx_c, a, eps);
    if (gamma == NULL) return y;
    CHECK_T(gamma, "gamma");
    if (!want_type(fn, "gamma", gamma, GGML_TYPE_F32)) return NULL;
    if (!ggml_can_repeat(gamma, y)) {
        fail_shape(fn, "gamma must broadcast over a", a, gamma);
        return NULL;
    }
    return ggml_mul(sess->ctx_c, y, gamma);
}

/* ------------------------------------------------------------------ rope */

tnn_tensor * tnn_rope_ext(tnn_session * sess, tnn_tensor * a, tnn_tensor * pos, int n_dims, float freq_base,
                          float freq_scale, float ext_factor, float attn_factor, float beta_fast, float beta_slow,
                          tnn_tensor * freq_factors, int mode, int n_ctx_orig) {
    const char * fn = "tnn_rope_ext";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    CHECK_T(pos, "pos");
    if (mode != 0 && mode != 2) {
        tnn_set_error("%s: mode must be 0 (normal, llama) or 2 (NEOX: qwen2/qwen3/gemma), got %d", fn, mode);
        return NULL;
    }
    if (a->type != GGML_TYPE_F32 && a->type != GGML_TYPE_F16) {
        tnn_set_error("%s: 'a' must be F32 or F16, got %s", fn, ggml_type_name(a->type));
        return NULL;
    }
    if (!rows_contiguous(a)) { /* the CPU kernel asserts it */
        fail_shape(fn, "a must have contiguous rows", a, NULL);
        return NULL;
    }
    if (!want_type(fn, "pos", pos, GGML_TYPE_I32)) return NULL;
    if (!ggml_is_vector(pos) || a->ne[2] != pos->ne[0]) {
        fail_shape(fn, "pos must be a vector with one position per a.ne2 (token)", a, pos);
        return NULL;
    }
    if (n_dims <= 0 || n_dims % 2 != 0 || n_dims > a->ne[0]) {
        tnn_set_error("%s: n_dims must be even and in 1..a.ne0 (%" PRId64 "), got %d", fn, a->ne[0], n_dims);
        return NULL;
    }
    if (!(freq_base > 0.0f) || !(freq_scale > 0.0f)) {
        tnn_set_error("%s: freq_base and freq_scale must be positive (got %g, %g)", fn, (double) freq_base,
                      (double) freq_scale);
        return NULL;
    }
    if (n_ctx_orig < 0) {
        tnn_set_error("%s: n_ctx_orig must be >= 0", fn);
        return NULL;
    }
    if (freq_factors != NULL) {
        CHECK_T(freq_factors, "freq_factors");
        if (!want_type(fn, "freq_factors", freq_factors, GGML_TYPE_F32)) return NULL;
        if (freq_factors->ne[0] < n_dims / 2) {
            fail_shape(fn, "freq_factors needs at least n_dims/2 elements", freq_factors, NULL);
            return NULL;
        }
    }
    return ggml_rope_ext(sess->ctx_c, a, pos, freq_factors, n_dims, mode, n_ctx_orig, freq_base, freq_scale,
                         ext_factor, attn_factor, beta_fast, beta_slow);
}

/* ------------------------------------------------------------------ views & layout */

tnn_tensor * tnn_view_1d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t offset) {
    const char * fn = "tnn_view_1d";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (ne0 <= 0 || offset < 0) {
        tnn_set_error("%s: ne0 must be positive and offset >= 0 (got %" PRId64 ", %" PRId64 ")", fn, ne0, offset);
        return NULL;
    }
    if (!tnn_view_fits(fn, a, ne0, 1, 1, 1, 0, 0, 0, offset)) return NULL;
    return ggml_view_1d(sess->ctx_c, a, ne0, (size_t) offset);
}

tnn_tensor * tnn_view_2d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t nb1, int64_t offset) {
    const char * fn = "tnn_view_2d";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (ne0 <= 0 || ne1 <= 0 || nb1 <= 0 || offset < 0) {
        tnn_set_error("%s: ne0, ne1, nb1 must be positive and offset >= 0", fn);
        return NULL;
    }
    if (!tnn_view_fits(fn, a, ne0, ne1, 1, 1, nb1, 0, 0, offset)) return NULL;
    return ggml_view_2d(sess->ctx_c, a, ne0, ne1, (size_t) nb1, (size_t) offset);
}

tnn_tensor * tnn_view_3d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t nb1,
                         int64_t nb2, int64_t offset) {
    const char * fn = "tnn_view_3d";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (ne0 <= 0 || ne1 <= 0 || ne2 <= 0 || nb1 <= 0 || nb2 <= 0 || offset < 0) {
        tnn_set_error("%s: sizes and strides must be positive and offset >= 0", fn);
        return NULL;
    }
    if (!tnn_view_fits(fn, a, ne0, ne1, ne2, 1, nb1, nb2, 0, offset)) return NULL;
    return ggml_view_3d(sess->ctx_c, a, ne0, ne1, ne2, (size_t) nb1, (size_t) nb2, (size_t) offset);
}

tnn_tensor * tnn_view_4d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                         int64_t nb1, int64_t nb2, int64_t nb3, int64_t offset) {
    const char * fn = "tnn_view_4d";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (ne0 <= 0 || ne1 <= 0 || ne2 <= 0 || ne3 <= 0 || nb1 <= 0 || nb2 <= 0 || nb3 <= 0 || offset < 0) {
        tnn_set_error("%s: sizes and strides must be positive and offset >= 0", fn);
        return NULL;
    }
    if (!tnn_view_fits(fn, a, ne0, ne1, ne2, ne3, nb1, nb2, nb3, offset)) return NULL;
    return ggml_view_4d(sess->ctx_c, a, ne0, ne1, ne2, ne3, (size_t) nb1, (size_t) nb2, (size_t) nb3, (size_t) offset);
}

static tnn_tensor * reshape(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                            int nd, const char * fn) {
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (ne0 <= 0 || ne1 <= 0 || ne2 <= 0 || ne3 <= 0) {
        tnn_set_error("%s: dimensions must be positive", fn);
        return NULL;
    }
    if (!ggml_is_contiguous(a)) {
        fail_shape(fn, "a must be contiguous (use tnn_cont first)", a, NULL);
        return NULL;
    }
    int64_t n01 = 0, n012 = 0, n0123 = 0;
    if (!tnn_add_mul_ok(&n01, ne0, ne1) || !tnn_add_mul_ok(&n012, n01, ne2) || !tnn_add_mul_ok(&n0123, n012, ne3) ||
        ggml_nelements(a) != n0123) {
        char sa[128];
        tnn_shape_str(a, sa, sizeof sa);
        tnn_set_error("%s: cannot reshape %s (%" PRId64 " elements) to [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "]",
                      fn, sa, ggml_nelements(a), ne0, ne1, ne2, ne3);
        return NULL;
    }
    if (ne0 % ggml_blck_size(a->type) != 0) {
        fail_shape(fn, "new ne0 must be a whole number of blocks", a, NULL);
        return NULL;
    }
    if (nd == 2) return ggml_reshape_2d(sess->ctx_c, a, ne0, ne1);
    if (nd == 3) return ggml_reshape_3d(sess->ctx_c, a, ne0, ne1, ne2);
    return ggml_reshape_4d(sess->ctx_c, a, ne0, ne1, ne2, ne3);
}

tnn_tensor * tnn_reshape_2d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1) {
    return reshape(sess, a, ne0, ne1, 1, 1, 2, "tnn_reshape_2d");
}

tnn_tensor * tnn_reshape_3d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2) {
    return reshape(sess, a, ne0, ne1, ne2, 1, 3, "tnn_reshape_3d");
}

tnn_tensor * tnn_reshape_4d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3) {
    return reshape(sess, a, ne0, ne1, ne2, ne3, 4, "tnn_reshape_4d");
}

static bool want_float_layout(const char * fn, const struct ggml_tensor * a) {
    if (a->type != GGML_TYPE_F32 && a->type != GGML_TYPE_F16 && a->type != GGML_TYPE_BF16) {
        tnn_set_error("%s: only F32/F16/BF16 tensors can be re-laid out, got %s", fn, ggml_type_name(a->type));
        return false;
    }
    return true;
}

tnn_tensor * tnn_transpose(tnn_session * sess, tnn_tensor * a) {
    const char * fn = "tnn_transpose";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_float_layout(fn, a)) return NULL;
    return ggml_cont(sess->ctx_c, ggml_transpose(sess->ctx_c, a));
}

tnn_tensor * tnn_permute(tnn_session * sess, tnn_tensor * a, int ax0, int ax1, int ax2, int ax3) {
    const char * fn = "tnn_permute";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    int ax[4] = {ax0, ax1, ax2, ax3};
    int seen = 0;
    for (int i = 0; i < 4; i++) {
        if (ax[i] < 0 || ax[i] > 3 || (seen & (1 << ax[i]))) {
            tnn_set_error("%s: axes must be a permutation of 0..3, got (%d,%d,%d,%d)", fn, ax0, ax1, ax2, ax3);
            return NULL;
        }
        seen |= 1 << ax[i];
    }
    return ggml_permute(sess->ctx_c, a, ax0, ax1, ax2, ax3);
}

tnn_tensor * tnn_cont(tnn_session * sess, tnn_tensor * a) {
    const char * fn = "tnn_cont";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!ggml_is_contiguous(a) && !want_float_layout(fn, a)) return NULL;
    return ggml_cont(sess->ctx_c, a);
}

/* ------------------------------------------------------------------ activation hooks */

static tnn_hook_fn g_hook_dispatcher = NULL;

int tnn_set_hook_dispatcher(tnn_hook_fn fn) {
    g_hook_dispatcher = fn;
    return 0;
}

/* ggml custom op of one task: the dispatcher writes dst from src (a copy when there is none) */
static void hook_trampoline(struct ggml_tensor * dst, const struct ggml_tensor * a, int ith, int nth, void * user) {
    (void) nth;
    if (ith != 0) return;
    if (g_hook_dispatcher != NULL) {
        g_hook_dispatcher(user, (float *) dst->data, (const float *) a->data, ggml_nelements(a));
    } else {
        memcpy(dst->data, a->data, ggml_nbytes(a));
    }
}

tnn_tensor * tnn_map_hook(tnn_session * sess, tnn_tensor * a, void * user) {
    const char * fn = "tnn_map_hook";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (a->type != GGML_TYPE_F32 || !ggml_is_contiguous(a)) {
        tnn_set_error("%s: the hooked tensor must be contiguous F32 (tnn_cont it first), got %s", fn,
                      ggml_type_name(a->type));
        return NULL;
    }
    if (sess->kind != 0) {
        tnn_set_error("%s: Python hooks run on the CPU backend only (this session runs on %s)", fn,
                      ggml_backend_name(sess->backend));
        return NULL;
    }
    return ggml_map_custom1(sess->ctx_c, a, hook_trampoline, 1, user);
}

tnn_tensor * tnn_cast(tnn_session * sess, tnn_tensor * a, int type) {
    const char * fn = "tnn_cast";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!tnn_check_type(type, fn)) return NULL;
    if (!want_float_layout(fn, a) || (type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16)) {
        tnn_set_error("%s: casts run between F32, F16 and BF16 only (got %s -> %s)", fn, ggml_type_name(a->type),
                      ggml_type_name((enum ggml_type) type));
        return NULL;
    }
    return ggml_cast(sess->ctx_c, a, (enum ggml_type) type);
}

tnn_tensor * tnn_concat(tnn_session * sess, tnn_tensor * a, tnn_tensor * b, int dim) {
    const char * fn = "tnn_concat";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    CHECK_T(b, "b");
    if (dim < 0 || dim >= GGML_MAX_DIMS) {
        tnn_set_error("%s: dim must be 0..3, got %d", fn, dim);
        return NULL;
    }
    if (a->type != b->type || !want_float_layout(fn, a)) {
        fail_shape(fn, "a and b must share one float type", a, b);
        return NULL;
    }
    for (int d = 0; d < GGML_MAX_DIMS; d++) {
        if (d != dim && a->ne[d] != b->ne[d]) {
            fail_shape(fn, "a and b must match on every dim but the concat dim", a, b);
            return NULL;
        }
    }
    return ggml_concat(sess->ctx_c, a, b, dim);
}

tnn_tensor * tnn_set_rows(tnn_session * sess, tnn_tensor * dst, tnn_tensor * src, tnn_tensor * ids) {
    const char * fn = "tnn_set_rows";
    PROLOGUE(fn);
    CHECK_T(dst, "dst");
    CHECK_T(src, "src");
    CHECK_T(ids, "ids");
    if (!want_type(fn, "ids", ids, GGML_TYPE_I32)) return NULL;
    if (src->type != GGML_TYPE_F32 && src->type != GGML_TYPE_F16) {
        fail_shape(fn, "src must be F32 or F16", src, NULL);
        return NULL;
    }
    if (!want_float_like(fn, "dst", dst)) return NULL;
    if (dst->ne[0] != src->ne[0] || dst->ne[2] != src->ne[2] || dst->ne[3] != src->ne[3] ||
        src->ne[1] != ids->ne[0] || ids->ne[1] < 1 || src->ne[2] % ids->ne[1] != 0 || ids->ne[2] < 1 ||
        src->ne[3] % ids->ne[2] != 0 || ids->ne[3] != 1) {
        fail_shape(fn, "need dst [n, rows, a, b], src [n, k, a, b], ids [k, a' | a, b' | b]", dst, src);
        return NULL;
    }
    if (!rows_contiguous(dst) || !rows_contiguous(src)) {
        fail_shape(fn, "dst and src need contiguous rows", dst, src);
        return NULL;
    }
    return ggml_set_rows(sess->ctx_c, dst, src, ids);
}

tnn_tensor * tnn_cpy(tnn_session * sess, tnn_tensor * src, tnn_tensor * dst) {
    const char * fn = "tnn_cpy";
    PROLOGUE(fn);
    CHECK_T(src, "src");
    CHECK_T(dst, "dst");
    if (ggml_nelements(src) != ggml_nelements(dst)) {
        fail_shape(fn, "src and dst must have the same number of elements", src, dst);
        return NULL;
    }
    bool quant = ggml_is_quantized(src->type) || ggml_is_quantized(dst->type);
    if (quant && (!ggml_is_contiguous(src) || !ggml_is_contiguous(dst) || src->ne[0] != dst->ne[0])) {
        fail_shape(fn, "copies to or from a quantized type need contiguous src/dst with equal rows", src, dst);
        return NULL;
    }
    if (ggml_is_quantized(src->type) && ggml_is_quantized(dst->type) && src->type != dst->type) {
        fail_shape(fn, "cannot convert between two quantized types", src, dst);
        return NULL;
    }
    if (src->type == GGML_TYPE_I32 || dst->type == GGML_TYPE_I32) {
        if (src->type != dst->type) {
            fail_shape(fn, "I32 copies only to I32", src, dst);
            return NULL;
        }
    } else if (!want_float_like(fn, "src", src) || !want_float_like(fn, "dst", dst)) {
        return NULL; /* no CPU copy kernel for I8/I16/I64/F64/Q8_1/Q8_K */
    }
    return ggml_cpy(sess->ctx_c, src, dst);
}

/* ------------------------------------------------------------------ attention, MoE, reductions */

static bool fa_kv_type_ok(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1:
            return true;
        default:
            return false;
    }
}

tnn_tensor * tnn_flash_attn_ext(tnn_session * sess, tnn_tensor * q, tnn_tensor * k, tnn_tensor * v,
                                tnn_tensor * mask, float scale, float max_bias, float logit_softcap) {
    const char * fn = "tnn_flash_attn_ext";
    PROLOGUE(fn);
    CHECK_T(q, "q");
    CHECK_T(k, "k");
    CHECK_T(v, "v");
    if (!want_type(fn, "q", q, GGML_TYPE_F32)) return NULL;
    if (!fa_kv_type_ok(k->type) || !fa_kv_type_ok(v->type)) {
        fail_shape(fn, "k and v must be F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1", k, v);
        return NULL;
    }
    /* q [d, n_q, n_head, b], k [d, n_kv, n_head_kv, b], v [dv, n_kv, n_head_kv, b] */
    if (q->ne[0] != k->ne[0] || k->ne[1] != v->ne[1] || k->ne[2] != v->ne[2] || q->ne[2] % k->ne[2] != 0 ||
        q->ne[3] != k->ne[3] || q->ne[3] != v->ne[3]) {
        fail_shape(fn, "need q.ne0 == k.ne0, k/v same n_kv and heads, q heads a multiple of kv heads", q, k);
        return NULL;
    }
    if (!rows_contiguous(q) || !rows_contiguous(k) || !rows_contiguous(v)) {
        fail_shape(fn, "q, k, v need contiguous rows", q, k);
        return NULL;
    }
    if (mask != NULL) {
        CHECK_T(mask, "mask");
        if (mask->type != GGML_TYPE_F16 || !ggml_is_contiguous(mask) || mask->ne[0] != k->ne[1] ||
            mask->ne[1] < q->ne[1] || q->ne[2] % mask->ne[2] != 0 || q->ne[3] % mask->ne[3] != 0) {
            fail_shape(fn, "mask must be contiguous F16 [n_kv, >= n_q, ...]", mask, q);
            return NULL;
        }
    }
    if (max_bias != 0.0f && mask == NULL) {
        tnn_set_error("%s: max_bias (ALiBi) needs a mask", fn);
        return NULL;
    }
    if (logit_softcap < 0.0f || !isfinite(logit_softcap)) {
        tnn_set_error("%s: logit_softcap must be finite and >= 0", fn);
        return NULL;
    }
    struct ggml_tensor * r = ggml_flash_attn_ext(sess->ctx_c, q, k, v, mask, scale, max_bias, logit_softcap);
    /* F32 accumulation, as llama.cpp requests for every model */
    ggml_prec_set_acc(r, GGML_PREC_F32);
    return r;
}

static tnn_tensor * top_k(tnn_session * sess, tnn_tensor * a, int k, const char * fn, bool sorted) {
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_f32(fn, a, FULLY_CONTIGUOUS)) return NULL;
    if (k <= 0 || k > a->ne[0]) {
        tnn_set_error("%s: k must be in 1..a.ne0 (%" PRId64 "), got %d", fn, a->ne[0], k);
        return NULL;
    }
    return sorted ? ggml_argsort_top_k(sess->ctx_c, a, k) : ggml_top_k(sess->ctx_c, a, k);
}

tnn_tensor * tnn_top_k(tnn_session * sess, tnn_tensor * a, int k) {
    return top_k(sess, a, k, "tnn_top_k", false);
}

/* llama.cpp selects MoE experts with argsort_top_k (sorted, descending); the order decides the
 * order in which expert outputs are summed, so it matters for exact parity. */
tnn_tensor * tnn_argsort_top_k(tnn_session * sess, tnn_tensor * a, int k) {
    return top_k(sess, a, k, "tnn_argsort_top_k", true);
}

tnn_tensor * tnn_clamp(tnn_session * sess, tnn_tensor * a, float min, float max) {
    const char * fn = "tnn_clamp";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_type(fn, "a", a, GGML_TYPE_F32)) return NULL;
    if (!(min <= max)) {
        tnn_set_error("%s: need min <= max, got %g > %g", fn, (double) min, (double) max);
        return NULL;
    }
    return ggml_clamp(sess->ctx_c, a, min, max);
}

tnn_tensor * tnn_sum_rows(tnn_session * sess, tnn_tensor * a) {
    const char * fn = "tnn_sum_rows";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_f32(fn, a, ROWS_CONTIGUOUS)) return NULL;
    return ggml_sum_rows(sess->ctx_c, a);
}
