/* Training: ggml's autodiff and optimizer, one call each.
 *
 *   tnn_reset_for_training     a fresh compute graph that keeps gradients
 *   ...forward ops..., loss = tnn_cross_entropy_loss(logits, labels)
 *   tnn_build_backward(loss)   checks every op on the way from a parameter to the loss has a
 *                              backward in ggml (ggml aborts on one that has none), then
 *                              ggml_build_backward_expand
 *   tnn_graph_grad(t)          the gradient of a parameter
 *   tnn_graph_reset_grads      before each compute: gradients 0, the loss's seed 1 (the
 *                              gradients accumulate in place in a buffer of their own)
 *   tnn_opt_step_adamw(...)    an in-place AdamW update of a parameter, added to the graph
 *   tnn_realize(loss), upload inputs, tnn_compute
 *
 * Parameters are persistent F32 tensors marked with tnn_set_param; their AdamW moments are
 * persistent tensors too, so they live across graph rebuilds. */
#include "tinynn_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool want_f32(const char * fn, const char * arg, const struct ggml_tensor * t) {
    if (t->type != GGML_TYPE_F32) {
        tnn_set_error("%s: '%s' must be f32, got %s", fn, arg, ggml_type_name(t->type));
        return false;
    }
    return true;
}

static bool want_training_graph(const tnn_session * sess, const char * fn) {
    if (!sess->graph_grads) {
        tnn_set_error("%s: the current graph keeps no gradients; start it with tnn_reset_for_training", fn);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ the graph */

int tnn_reset_for_training(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_reset_for_training")) return -1;
    sess->next_graph_grads = true;
    return tnn_reset_for_rebuild(sess);
}

int tnn_graph_keeps_grads(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_graph_keeps_grads")) return -1;
    return sess->graph_grads ? 1 : 0;
}

/* ------------------------------------------------------------------ ops a training step needs */

/* an F32 elementwise/reduction op of one tensor: validate, call ggml */
static tnn_tensor * unary_f32(tnn_session * sess, tnn_tensor * a, const char * fn,
                              struct ggml_tensor * (*op)(struct ggml_context *, struct ggml_tensor *)) {
    PROLOGUE(fn);
    CHECK_T(a, "a");
    if (!want_f32(fn, "a", a)) return NULL;
    return op(sess->ctx_c, a);
}

tnn_tensor * tnn_sqr(tnn_session * sess, tnn_tensor * a) { return unary_f32(sess, a, "tnn_sqr", ggml_sqr); }
tnn_tensor * tnn_sqrt(tnn_session * sess, tnn_tensor * a) { return unary_f32(sess, a, "tnn_sqrt", ggml_sqrt); }
tnn_tensor * tnn_sum(tnn_session * sess, tnn_tensor * a) { return unary_f32(sess, a, "tnn_sum", ggml_sum); }

tnn_tensor * tnn_acc(tnn_session * sess, tnn_tensor * a, tnn_tensor * b, int64_t nb1, int64_t nb2, int64_t nb3,
                     int64_t offset) {
    const char * fn = "tnn_acc";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    CHECK_T(b, "b");
    if (!want_f32(fn, "a", a) || !want_f32(fn, "b", b)) return NULL;
    if (!ggml_is_contiguous(a) || !ggml_is_contiguous(b)) {
        tnn_set_error("%s: 'a' and 'b' must be contiguous", fn);
        return NULL;
    }
    if (b->ne[3] != 1) {
        tnn_set_error("%s: 'b' must have at most 3 dimensions", fn);
        return NULL;
    }
    /* ggml keeps the strides and offset as int32 op params */
    if (nb1 < 0 || nb2 < 0 || nb3 < 0 || offset < 0 || nb1 > INT32_MAX || nb2 > INT32_MAX || nb3 > INT32_MAX ||
        offset > INT32_MAX || offset % (int64_t) sizeof(float) != 0) {
        tnn_set_error("%s: strides and offset must be non-negative, below 2^31 and (offset) float-aligned", fn);
        return NULL;
    }
    if (!tnn_view_fits(fn, a, b->ne[0], b->ne[1], b->ne[2], b->ne[3], nb1, nb2, 0, offset)) return NULL;
    return ggml_acc(sess->ctx_c, a, b, (size_t) nb1, (size_t) nb2, (size_t) nb3, (size_t) offset);
}

tnn_tensor * tnn_cross_entropy_loss(tnn_session * sess, tnn_tensor * logits, tnn_tensor * labels) {
    const char * fn = "tnn_cross_entropy_loss";
    PROLOGUE(fn);
    CHECK_T(logits, "logits");
    CHECK_T(labels, "labels");
    if (!want_f32(fn, "logits", logits) || !want_f32(fn, "labels", labels)) return NULL;
    if (!ggml_are_same_shape(logits, labels) || !ggml_is_contiguous(logits) || !ggml_is_contiguous(labels)) {
        char sa[128], sb[128];
        tnn_shape_str(logits, sa, sizeof sa);
        tnn_shape_str(labels, sb, sizeof sb);
        tnn_set_error("%s: logits and labels must be contiguous and of one shape (got %s and %s)", fn, sa, sb);
        return NULL;
    }
    return ggml_cross_entropy_loss(sess->ctx_c, logits, labels);
}

tnn_tensor * tnn_opt_step_adamw(tnn_session * sess, tnn_tensor * a, tnn_tensor * grad, tnn_tensor * m,
                                tnn_tensor * v, tnn_tensor * params) {
    const char * fn = "tnn_opt_step_adamw";
    PROLOGUE(fn);
    CHECK_T(a, "a");
    CHECK_T(grad, "grad");
    CHECK_T(m, "m");
    CHECK_T(v, "v");
    CHECK_T(params, "params");
    if (!want_training_graph(sess, fn)) return NULL;
    if (!(a->flags & GGML_TENSOR_FLAG_PARAM)) {
        tnn_set_error("%s: 'a' is not a parameter (tnn_set_param)", fn);
        return NULL;
    }
    if (!want_f32(fn, "a", a) || !want_f32(fn, "grad", grad) || !want_f32(fn, "m", m) || !want_f32(fn, "v", v) ||
        !want_f32(fn, "params", params)) return NULL;
    if (!ggml_are_same_shape(a, grad) || !ggml_are_same_shape(a, m) || !ggml_are_same_shape(a, v)) {
        char sa[128];
        tnn_shape_str(a, sa, sizeof sa);
        tnn_set_error("%s: grad, m and v must have the shape of 'a' (%s)", fn, sa);
        return NULL;
    }
    /* the moments must outlive the graph: persistent tensors, not compute ones */
    if (!tnn_ptr_in_ctx(sess->ctx_w, m, true) || !tnn_ptr_in_ctx(sess->ctx_w, v, true) ||
        !tnn_ptr_in_ctx(sess->ctx_w, a, true)) {
        tnn_set_error("%s: 'a', 'm' and 'v' must be persistent tensors of this session", fn);
        return NULL;
    }
    if (ggml_nelements(params) != 7) {
        tnn_set_error("%s: params must hold 7 values {lr, beta1, beta2, eps, wd, 1/(1-beta1^t), 1/(1-beta2^t)}, "
                      "got %" PRId64, fn, ggml_nelements(params));
        return NULL;
    }
    return ggml_opt_step_adamw(sess->ctx_c, a, grad, m, v, params);
}

/* ------------------------------------------------------------------ backward */

/* a pointer set (open addressing) for the walk over the forward graph */
struct ptr_set {
    const void ** keys;
    size_t cap;
};

static bool ptr_set_init(struct ptr_set * s, size_t n) {
    s->cap = 16;
    while (s->cap < 2 * n + 16) s->cap *= 2;
    s->keys = (const void **) calloc(s->cap, sizeof(void *));
    return s->keys != NULL;
}

static size_t ptr_slot(const struct ptr_set * s, const void * p) {
    size_t h = ((uintptr_t) p >> 4) * 0x9E3779B97F4A7C15ull;
    size_t i = h & (s->cap - 1);
    while (s->keys[i] != NULL && s->keys[i] != p) i = (i + 1) & (s->cap - 1);
    return i;
}

static void ptr_set_add(struct ptr_set * s, const void * p) { s->keys[ptr_slot(s, p)] = p; }
static bool ptr_set_has(const struct ptr_set * s, const void * p) { return p && s->keys[ptr_slot(s, p)] == p; }

/* ggml_compute_backward's cases (ggml.c), the ones it implements */
static const char * unsupported_backward(const struct ggml_tensor * node) {
    switch (node->op) {
        case GGML_OP_NONE: case GGML_OP_DUP: case GGML_OP_ADD: case GGML_OP_ADD1: case GGML_OP_ACC:
        case GGML_OP_SUB: case GGML_OP_MUL: case GGML_OP_DIV: case GGML_OP_SQR: case GGML_OP_SQRT:
        case GGML_OP_LOG: case GGML_OP_SIN: case GGML_OP_COS: case GGML_OP_SUM: case GGML_OP_SUM_ROWS:
        case GGML_OP_MEAN: case GGML_OP_REPEAT: case GGML_OP_REPEAT_BACK: case GGML_OP_RMS_NORM:
        case GGML_OP_MUL_MAT: case GGML_OP_SCALE: case GGML_OP_SET: case GGML_OP_CPY: case GGML_OP_CONT:
        case GGML_OP_RESHAPE: case GGML_OP_VIEW: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE:
        case GGML_OP_GET_ROWS: case GGML_OP_DIAG_MASK_INF: case GGML_OP_DIAG_MASK_ZERO: case GGML_OP_SOFT_MAX:
        case GGML_OP_ROPE: case GGML_OP_IM2COL: case GGML_OP_POOL_2D: case GGML_OP_CROSS_ENTROPY_LOSS:
            return NULL;
        case GGML_OP_UNARY:
            switch (ggml_get_unary_op(node)) {
                case GGML_UNARY_OP_ABS: case GGML_UNARY_OP_SGN: case GGML_UNARY_OP_NEG: case GGML_UNARY_OP_STEP:
                case GGML_UNARY_OP_RELU: case GGML_UNARY_OP_SILU: case GGML_UNARY_OP_EXP:
                case GGML_UNARY_OP_EXPM1: case GGML_UNARY_OP_SOFTPLUS:
                    return NULL;
                default:
                    return ggml_unary_op_name(ggml_get_unary_op(node));
            }
        case GGML_OP_GLU:
            if (ggml_get_glu_op(node) == GGML_GLU_OP_SWIGLU && node->src[1] != NULL) return NULL;
            return ggml_get_glu_op(node) == GGML_GLU_OP_SWIGLU ? "SWIGLU (fused; only the split form has a backward)"
                                                              : ggml_glu_op_name(ggml_get_glu_op(node));
        default:
            return ggml_op_name(node->op);
    }
}

static int refuse(const char * fn, int i, const struct ggml_tensor * node, const char * what) {
    char sh[128];
    tnn_shape_str(node, sh, sizeof sh);
    tnn_set_error("%s: %s (node %d '%s', %s)", fn, what, i, node->name, sh);
    return -1;
}

/* Walk the forward graph as ggml_build_backward_expand does (which nodes depend on a parameter)
 * and refuse, naming the op, what ggml would abort on. */
static int check_backward(const char * fn, struct ggml_cgraph * gf, const struct ggml_tensor * loss) {
    const int n = ggml_graph_n_nodes(gf);
    struct ptr_set needs;
    if (!ptr_set_init(&needs, (size_t) n)) {
        tnn_set_error("%s: out of memory", fn);
        return -1;
    }
    int rc = 0;
    bool any_param = false;
    char msg[256];
    for (int i = 0; i < n && rc == 0; i++) {
        struct ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->type == GGML_TYPE_I32) continue;
        bool ignore1 = node->op == GGML_OP_CPY || node->op == GGML_OP_GET_ROWS || node->op == GGML_OP_ROPE;
        bool need = (node->flags & GGML_TENSOR_FLAG_PARAM) != 0;
        any_param = any_param || need;
        for (int j = 0; j < GGML_MAX_SRC; j++) {
            const struct ggml_tensor * s = node->src[j];
            if (s == NULL || (j == 1 && ignore1) || !ptr_set_has(&needs, s)) continue;
            need = true;
            if (s->type != GGML_TYPE_F32 && s->type != GGML_TYPE_F16) {
                snprintf(msg, sizeof msg, "op %s reads '%s' of type %s on the way to the loss; gradients flow only "
                         "through F32/F16 tensors", ggml_op_desc(node), s->name, ggml_type_name(s->type));
                rc = refuse(fn, i, node, msg);
                break;
            }
        }
        if (rc != 0 || !need) continue;
        ptr_set_add(&needs, node);
        const char * bad = unsupported_backward(node);
        if (bad != NULL) {
            snprintf(msg, sizeof msg, "op %s has no backward in ggml, and it lies between a parameter and the loss",
                     bad);
            rc = refuse(fn, i, node, msg);
        } else if (node->view_src != NULL && node->op != GGML_OP_CPY && node->op != GGML_OP_SET_ROWS &&
                   node->op != GGML_OP_VIEW && node->op != GGML_OP_RESHAPE && node->op != GGML_OP_PERMUTE &&
                   node->op != GGML_OP_TRANSPOSE) {
            snprintf(msg, sizeof msg, "in-place op %s has no backward in ggml", ggml_op_desc(node));
            rc = refuse(fn, i, node, msg);
        } else if (node->op == GGML_OP_SOFT_MAX && ptr_set_has(&needs, node->src[1])) {
            rc = refuse(fn, i, node, "a softmax mask that depends on a parameter has no backward in ggml");
        } else if (node->op == GGML_OP_ROPE && ptr_set_has(&needs, node->src[2])) {
            rc = refuse(fn, i, node, "rope frequency factors that depend on a parameter have no backward in ggml");
        } else if (node->op == GGML_OP_CROSS_ENTROPY_LOSS && ptr_set_has(&needs, node->src[1])) {
            rc = refuse(fn, i, node, "cross-entropy labels that depend on a parameter have no backward in ggml");
        } else if (node->op == GGML_OP_MUL_MAT && ptr_set_has(&needs, node->src[1]) &&
                   ggml_is_quantized(node->src[0]->type) &&
                   (node->src[0]->ne[2] != node->src[1]->ne[2] || node->src[0]->ne[3] != node->src[1]->ne[3])) {
            /* its backward is out_prod(src0, ...), whose quantized kernel does not broadcast */
            snprintf(msg, sizeof msg, "the backward of a broadcast matmul by a quantized (%s) tensor is not "
                     "implemented in ggml (keep it F32)", ggml_type_name(node->src[0]->type));
            rc = refuse(fn, i, node, msg);
        }
    }
    if (rc == 0 && (!any_param || !ptr_set_has(&needs, loss))) {
        tnn_set_error("%s: no parameter (tnn_set_param) reaches the loss", fn);
        rc = -1;
    }
    free(needs.keys);
    return rc;
}

int tnn_build_backward(tnn_session * sess, tnn_tensor * loss) {
    const char * fn = "tnn_build_backward";
    if (!tnn_check_session(sess, fn) || !tnn_check_tensor(sess, loss, fn, "loss")) return -1;
    if (sess->gf == NULL) {
        tnn_set_error("%s: no compute graph; call tnn_reset_for_training first", fn);
        return -1;
    }
    if (!want_training_graph(sess, fn)) return -1;
    if (sess->graph_allocated || sess->backward_built) {
        tnn_set_error("%s: the backward pass is built once, before tnn_realize", fn);
        return -1;
    }
    if (loss->type != GGML_TYPE_F32 || ggml_nelements(loss) != 1) {
        char sh[128];
        tnn_shape_str(loss, sh, sizeof sh);
        tnn_set_error("%s: the loss must be an F32 scalar, got %s", fn, sh);
        return -1;
    }
    if (!tnn_ptr_in_ctx(sess->ctx_c, loss, true) || loss->op == GGML_OP_NONE) {
        tnn_set_error("%s: the loss must be computed in this graph", fn);
        return -1;
    }
    ggml_set_loss(loss);
    ggml_build_forward_expand(sess->gf, loss);
    if (check_backward(fn, sess->gf, loss) != 0) return -1;
    /* Gradient accumulators (as ggml-opt keeps them, in a buffer of their own): one per parameter,
     * and the loss's, the seed of the backward pass. Kept in the graph's arena instead, every
     * parameter's gradient would stay live from its layer's backward to the optimizer step at the
     * end, and that many interleaved blocks overflow ggml-alloc's free list (it aborts). */
    const int n = ggml_graph_n_nodes(sess->gf);
    if (n <= 0) {
        tnn_set_error("%s: the graph is empty", fn);
        return -1;
    }
    int n_acc = 0;
    for (int i = 0; i < n; i++) {
        const struct ggml_tensor * node = ggml_graph_node(sess->gf, i);
        n_acc += (node->flags & (GGML_TENSOR_FLAG_PARAM | GGML_TENSOR_FLAG_LOSS)) ? 1 : 0;
    }
    tnn_train_free(sess);
    struct ggml_init_params ip = {(size_t) (n_acc + 1) * ggml_tensor_overhead(), NULL, true};
    struct ggml_tensor ** accs = (struct ggml_tensor **) calloc((size_t) n, sizeof(*accs));
    sess->ctx_grads = ggml_init(ip);
    if (accs == NULL || sess->ctx_grads == NULL) {
        free(accs);
        tnn_set_error("%s: out of memory", fn);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        struct ggml_tensor * node = ggml_graph_node(sess->gf, i);
        if (node->flags & (GGML_TENSOR_FLAG_PARAM | GGML_TENSOR_FLAG_LOSS)) {
            accs[i] = ggml_new_tensor(sess->ctx_grads, GGML_TYPE_F32, GGML_MAX_DIMS, node->ne);
            ggml_format_name(accs[i], "grad of %s", node->name);
            if (node->flags & GGML_TENSOR_FLAG_LOSS) sess->loss_seed = accs[i];
        }
    }
    sess->buf_grads = ggml_backend_alloc_ctx_tensors(sess->ctx_grads, sess->backend);
    if (sess->buf_grads == NULL) {
        free(accs);
        tnn_train_free(sess);
        tnn_set_error("%s: could not allocate the gradient buffer on %s", fn, ggml_backend_name(sess->backend));
        return -1;
    }
    ggml_build_backward_expand(sess->ctx_c, sess->gf, accs);
    free(accs);
    sess->backward_built = true;
    return tnn_graph_reset_grads(sess);
}

void tnn_train_free(tnn_session * sess) {
    if (sess->buf_grads) ggml_backend_buffer_free(sess->buf_grads);
    if (sess->ctx_grads) ggml_free(sess->ctx_grads);
    sess->buf_grads = NULL;
    sess->ctx_grads = NULL;
    sess->loss_seed = NULL;
}

/* ggml_graph_reset without its other half: it also zeroes the AdamW moments of every optimizer
 * step in the graph, and ours are the persistent ones that must carry over from step to step. */
int tnn_graph_reset_grads(tnn_session * sess) {
    const char * fn = "tnn_graph_reset_grads";
    if (!tnn_check_session(sess, fn)) return -1;
    if (sess->gf == NULL || !sess->backward_built || sess->buf_grads == NULL || sess->loss_seed == NULL) {
        tnn_set_error("%s: no backward pass in the current graph; call tnn_build_backward first", fn);
        return -1;
    }
    ggml_backend_buffer_clear(sess->buf_grads, 0);
    const float one = 1.0f;
    ggml_backend_tensor_set(sess->loss_seed, &one, 0, sizeof one);
    return 0;
}

tnn_tensor * tnn_graph_grad(tnn_session * sess, tnn_tensor * t) {
    const char * fn = "tnn_graph_grad";
    if (!tnn_check_session(sess, fn) || !tnn_check_tensor(sess, t, fn, "t")) return NULL;
    if (sess->gf == NULL || !sess->backward_built) {
        tnn_set_error("%s: no backward pass in the current graph; call tnn_build_backward first", fn);
        return NULL;
    }
    struct ggml_tensor * g = ggml_graph_get_grad(sess->gf, t);
    if (g == NULL) {
        tnn_set_error("%s: '%s' has no gradient (not a parameter on the way to the loss, nor the loss)", fn,
                      t->name);
        return NULL;
    }
    return g;
}
