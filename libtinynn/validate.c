/* Validation shared by every entry point: live session handles, tensors that
 * belong to a session, known types, graph readiness, views that fit. Both
 * session.c and ops.c use these; neither depends on the other. */
#include "tinynn_internal.h"

#include <inttypes.h>
#include <stdio.h>

/* ------------------------------------------------------------------ live sessions */

static tnn_session * g_live_sessions = NULL;

void tnn_live_session_add(tnn_session * sess) {
    sess->next_live = g_live_sessions;
    g_live_sessions = sess;
}

void tnn_live_session_remove(tnn_session * sess) {
    for (tnn_session ** pp = &g_live_sessions; *pp; pp = &(*pp)->next_live) {
        if (*pp == sess) {
            *pp = sess->next_live;
            break;
        }
    }
}

/* the live session whose weight mapping lies in [base, base + size), or NULL (gguf.c: a mapping
 * a session still points into is not unmapped) */
const tnn_session * tnn_session_mapping_in(const void * base, int64_t size) {
    for (const tnn_session * s = g_live_sessions; s != NULL; s = s->next_live) {
        if (s->mmap_base != NULL && s->mmap_base >= (const char *) base && s->mmap_base < (const char *) base + size) {
            return s;
        }
    }
    return NULL;
}

bool tnn_check_session(const tnn_session * sess, const char * fn) {
    if (sess == NULL) {
        tnn_set_error("%s: session handle is NULL", fn);
        return false;
    }
    for (const tnn_session * s = g_live_sessions; s != NULL; s = s->next_live) {
        if (s == sess) {
            return true;
        }
    }
    tnn_set_error("%s: session handle %p is not a live session (freed or never created)", fn, (const void *) sess);
    return false;
}

/* ------------------------------------------------------------------ tensors */

bool tnn_ptr_in_ctx(const struct ggml_context * ctx, const void * p, bool below_used) {
    if (ctx == NULL) return false;
    const char * base = (const char *) ggml_get_mem_buffer(ctx);
    size_t size = below_used ? ggml_used_mem(ctx) : ggml_get_mem_size(ctx);
    return (const char *) p >= base && (const char *) p < base + size;
}

bool tnn_is_repacked(const tnn_session * sess, const struct ggml_tensor * t) {
    return sess != NULL && tnn_ptr_in_ctx(sess->ctx_repack, t, true);
}

bool tnn_check_tensor(const tnn_session * sess, const struct ggml_tensor * t, const char * fn, const char * arg) {
    if (!tnn_check_weight(sess, t, fn, arg)) return false;
    if (tnn_is_repacked(sess, t)) {
        tnn_set_error("%s: tensor argument '%s' is a weight repacked for ggml's CPU kernels; it can only be the "
                      "weight of tnn_matmul / tnn_mul_mat_id", fn, arg);
        return false;
    }
    return true;
}

bool tnn_check_weight(const tnn_session * sess, const struct ggml_tensor * t, const char * fn, const char * arg) {
    if (t == NULL) {
        tnn_set_error("%s: tensor argument '%s' is NULL", fn, arg);
        return false;
    }
    if (sess == NULL) {
        /* a session-less call (tnn_tensor_ne, tnn_set_name, ...): t must lie in some live session's
         * pools, else its session was freed and t points into freed memory */
        for (const tnn_session * s = g_live_sessions; s != NULL; s = s->next_live) {
            if (tnn_ptr_in_ctx(s->ctx_w, t, true) || tnn_ptr_in_ctx(s->ctx_mmap, t, true) ||
                tnn_ptr_in_ctx(s->ctx_c, t, true) || tnn_ptr_in_ctx(s->ctx_repack, t, true)) {
                return true;
            }
        }
        tnn_set_error("%s: tensor argument '%s' (%p) belongs to no live session (its session was freed, or it "
                      "is a stale compute tensor from before tnn_reset_for_rebuild)", fn, arg, (const void *) t);
        return false;
    }
    if (sess != NULL) {
        /* Tensor structs live inside their context's memory pool, so a handle
         * from another session, or a compute tensor from before the last
         * rebuild, is outside every pool of this session. */
        if (!tnn_ptr_in_ctx(sess->ctx_w, t, true) && !tnn_ptr_in_ctx(sess->ctx_mmap, t, true) &&
            !tnn_ptr_in_ctx(sess->ctx_c, t, true) && !tnn_ptr_in_ctx(sess->ctx_repack, t, true)) {
            tnn_set_error("%s: tensor argument '%s' (%p) does not belong to this session "
                          "(another session's, or a stale compute tensor from before tnn_reset_for_rebuild)",
                          fn, arg, (const void *) t);
            return false;
        }
    }
    return true;
}

bool tnn_check_type(int type, const char * fn) {
    if (type < 0 || type >= GGML_TYPE_COUNT) {
        tnn_set_error("%s: unknown ggml type %d (valid: 0..%d)", fn, type, GGML_TYPE_COUNT - 1);
        return false;
    }
    const struct ggml_type_traits * tr = ggml_get_type_traits((enum ggml_type) type);
    if (tr->blck_size == 0 || tr->type_size == 0) {
        tnn_set_error("%s: ggml type %d is a removed/placeholder type", fn, type);
        return false;
    }
    return true;
}

void tnn_shape_str(const struct ggml_tensor * t, char * buf, size_t n) {
    snprintf(buf, n, "%s[%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "]", ggml_type_name(t->type),
             t->ne[0], t->ne[1], t->ne[2], t->ne[3]);
}

/* ------------------------------------------------------------------ contexts & graphs */

bool tnn_ctx_has_room(struct ggml_context * ctx, const char * fn, const char * what) {
    if (ggml_used_mem(ctx) + 8 * ggml_tensor_overhead() > ggml_get_mem_size(ctx)) {
        tnn_set_error("%s: the %s context is full (%zu bytes of tensor metadata)", fn, what, ggml_get_mem_size(ctx));
        return false;
    }
    return true;
}

bool tnn_check_graph_ready(const tnn_session * sess, const char * fn) {
    if (sess->ctx_c == NULL || sess->gf == NULL) {
        tnn_set_error("%s: no compute graph; call tnn_reset_for_rebuild first", fn);
        return false;
    }
    if (!tnn_ctx_has_room(sess->ctx_c, fn, "compute")) {
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ sizes & views */

bool tnn_add_mul_ok(int64_t * acc, int64_t a, int64_t b) {
    int64_t p;
    return !__builtin_mul_overflow(a, b, &p) && !__builtin_add_overflow(*acc, p, acc);
}

/* The view's last byte, offset + sum (ne[i]-1)*nb[i] + row bytes, must lie in a; and
 * ggml_view_* also asserts offset + the view's *contiguous* size <= nbytes(a).
 * All sums are overflow-checked: wrapped user sizes must not slip through. */
bool tnn_view_fits(const char * fn, const struct ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                   int64_t ne3, int64_t nb1, int64_t nb2, int64_t nb3, int64_t offset) {
    char sa[128];
    if (ne0 % ggml_blck_size(a->type) != 0) {
        tnn_shape_str(a, sa, sizeof sa);
        tnn_set_error("%s: a view of a quantized tensor must span whole blocks (got %s)", fn, sa);
        return false;
    }
    int64_t unit = (int64_t) ggml_type_size(a->type);   /* bytes of one element, or of one block */
    if (offset % unit != 0 || (ne1 > 1 && nb1 % unit != 0) || (ne2 > 1 && nb2 % unit != 0) ||
        (ne3 > 1 && nb3 % unit != 0)) {
        tnn_shape_str(a, sa, sizeof sa);
        tnn_set_error("%s: view offset %" PRId64 " / strides nb1 %" PRId64 ", nb2 %" PRId64 ", nb3 %" PRId64 " of %s are "
                      "not multiples of its %" PRId64 "-byte %s (a misaligned view)", fn, offset, nb1, nb2, nb3, sa, unit,
                      ggml_blck_size(a->type) > 1 ? "block" : "element");
        return false;
    }
    int64_t row = 0, last = offset, dense = offset;
    bool ok = tnn_add_mul_ok(&row, (int64_t) ggml_type_size(a->type), ne0 / ggml_blck_size(a->type)) &&
              tnn_add_mul_ok(&last, ne1 - 1, nb1) && tnn_add_mul_ok(&last, ne2 - 1, nb2) &&
              tnn_add_mul_ok(&last, ne3 - 1, nb3) && tnn_add_mul_ok(&last, row, 1);
    int64_t rows = 0, rows3 = 0;
    ok = ok && tnn_add_mul_ok(&rows, ne1, ne2) && tnn_add_mul_ok(&rows3, rows, ne3) &&
         tnn_add_mul_ok(&dense, row, rows3);
    if (!ok || last > (int64_t) ggml_nbytes(a) || dense > (int64_t) ggml_nbytes(a)) {
        tnn_shape_str(a, sa, sizeof sa);
        tnn_set_error("%s: view [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "] at offset %" PRId64 " (nb1 %" PRId64
                      ", nb2 %" PRId64 ", nb3 %" PRId64 ") ends past the end of %s (%zu bytes)", fn, ne0, ne1, ne2, ne3,
                      offset, nb1, nb2, nb3, sa, ggml_nbytes(a));
        return false;
    }
    return true;
}
