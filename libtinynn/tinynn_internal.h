/* Internals shared by the libtinynn sources: the session struct and the
 * validation helpers every entry point uses before it touches ggml. */
#ifndef TINYNN_INTERNAL_H
#define TINYNN_INTERNAL_H

#include "tinynn.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <stdbool.h>

#define TNN_MAX_MMAP_TENSORS_DEFAULT 65536
#define TNN_MAX_PERSISTENT_TENSORS 65536
#define TNN_MAX_GRAPH_NODES 131072

/* A tensor that points into the attached weight mapping. On host backends
 * it is bound in place; on device backends it is copied at finalize. */
struct tnn_mmap_binding {
    struct ggml_tensor * t;
    int64_t offset;
};

struct tnn_session {
    uint32_t magic;
    int kind;                       /* backend actually running: 0 CPU, 1 CUDA, 2 Metal */
    int n_threads;
    ggml_backend_t backend;
    struct ggml_threadpool * threadpool;   /* CPU: persistent workers, or NULL (ggml starts them per compute) */

    struct ggml_context * ctx_w;    /* persistent tensors: weights, KV cache, adapters */
    ggml_backend_buffer_t buf_w;
    bool finalized;

    struct ggml_context * ctx_mmap; /* tensors whose bytes live in the attached mapping */
    ggml_backend_buffer_t buf_mmap; /* host: wraps the mapping; device: a copy */
    char * mmap_base;
    int64_t mmap_size;
    struct tnn_mmap_binding * mmap_bindings;
    int64_t n_mmap_bindings;
    int64_t mmap_copy_bytes;

    /* matmul weights in ggml's CPU_REPACK layout, as llama.cpp stores them (copied from the
     * mapping at finalize); only when enabled with tnn_session_set_weight_repack */
    ggml_backend_buffer_type_t repack_buft;
    struct ggml_context * ctx_repack;
    ggml_backend_buffer_t buf_repack;
    struct tnn_mmap_binding * repack_bindings;
    int64_t n_repack_bindings;

    struct ggml_context * ctx_c;    /* compute graph tensors, rebuilt per step */
    struct ggml_cgraph * gf;
    ggml_gallocr_t galloc;
    bool graph_allocated;
    /* which nodes the last realized graph kept as outputs: ggml_gallocr reuses its previous plan for a
     * graph of the same nodes and sizes without looking at output flags, so a change re-plans */
    uint64_t outputs_signature;

    /* training (train.c): tnn_reset_for_training asks the next rebuild for a graph that keeps
     * gradients; tnn_build_backward has added the backward pass to the current one */
    bool next_graph_grads;
    bool graph_grads;
    bool backward_built;
    /* the backward pass's gradient accumulators (one per parameter, and the loss's seed), in a
     * buffer of their own so that they neither fragment nor outlive the graph's arena */
    struct ggml_context * ctx_grads;
    ggml_backend_buffer_t buf_grads;
    struct ggml_tensor * loss_seed;

    struct tnn_session * next_live; /* registry of live sessions, to reject stale handles */
};

/* training (train.c): frees the gradient accumulators */
void tnn_train_free(tnn_session * sess);

/* errors (error.c) */
void tnn_set_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));
void tnn_install_log_hook(void);

/* the first lines of every graph-op builder (ops.c, train.c): a live session with a graph being
 * built (else NULL), and each tensor argument this session's */
#define PROLOGUE(fn)                                                     \
    if (!tnn_check_session(sess, fn) || !tnn_check_graph_ready(sess, fn)) \
        return NULL
#define CHECK_T(t, name) \
    if (!tnn_check_tensor(sess, t, fn, name)) return NULL

/* validation helpers (validate.c) */
void tnn_live_session_add(tnn_session * sess);     /* the registry tnn_check_session consults */
void tnn_live_session_remove(tnn_session * sess);
const tnn_session * tnn_session_mapping_in(const void * base, int64_t size);  /* a live session mapping it */
bool tnn_check_session(const tnn_session * sess, const char * fn);
bool tnn_check_tensor(const tnn_session * sess, const struct ggml_tensor * t, const char * fn, const char * arg);
/* like tnn_check_tensor, but also accepts a repacked weight (only matmul / mul_mat_id take those) */
bool tnn_check_weight(const tnn_session * sess, const struct ggml_tensor * t, const char * fn, const char * arg);
bool tnn_check_type(int type, const char * fn);
bool tnn_check_graph_ready(const tnn_session * sess, const char * fn);
void tnn_shape_str(const struct ggml_tensor * t, char * buf, size_t n);
/* is p inside ctx's memory pool (below its used part, or anywhere in it)? */
bool tnn_ptr_in_ctx(const struct ggml_context * ctx, const void * p, bool below_used);
/* does t live in the session's repacked-weight context? */
bool tnn_is_repacked(const tnn_session * sess, const struct ggml_tensor * t);
/* room for a few more tensors in ctx? (else an error naming fn and what) */
bool tnn_ctx_has_room(struct ggml_context * ctx, const char * fn, const char * what);
/* acc += a * b, false on int64 overflow (user-supplied sizes must not wrap a bounds check) */
bool tnn_add_mul_ok(int64_t * acc, int64_t a, int64_t b);
/* does the view [ne0, ne1, ne2] (strides nb1, nb2, byte offset) lie inside a? */
bool tnn_view_fits(const char * fn, const struct ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                   int64_t ne3, int64_t nb1, int64_t nb2, int64_t nb3, int64_t offset);

#endif
