/* Sessions, persistent buffers, the weight mapping, and the graph life cycle:
 * backend -> buffers -> graph -> compute, as in ggml's simple-backend example. */
#include "tinynn_internal.h"

#include "ggml-cpu.h"
#ifdef TNN_HAVE_CUDA
#include "ggml-cuda.h"
#endif
#ifdef TNN_HAVE_METAL
#include "ggml-metal.h"
#endif

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TNN_SESSION_MAGIC 0x544e4e53u /* "TNNS" */

/* ------------------------------------------------------------------ checks used only here */

static bool check_dims(const char * fn, int64_t a, int64_t b, int64_t c) {
    if (a <= 0 || b <= 0 || c <= 0) {
        tnn_set_error("%s: dimensions must be positive, got %" PRId64 ", %" PRId64 ", %" PRId64, fn, a, b, c);
        return false;
    }
    return true;
}

static bool check_row_blocks(const char * fn, int type, int64_t ne0) {
    int64_t bs = ggml_blck_size((enum ggml_type) type);
    if (ne0 % bs != 0) {
        tnn_set_error("%s: row length %" PRId64 " is not a multiple of the %s block size %" PRId64, fn, ne0,
                      ggml_type_name((enum ggml_type) type), bs);
        return false;
    }
    return true;
}

/* ggml asserts that a tensor's element count fits in int64 and sizes it in
 * size_t; reject shapes whose element or byte count would overflow. */
static bool check_size_fits(const char * fn, int type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3) {
    int64_t n = ne0, nb = (int64_t) ggml_type_size((enum ggml_type) type);
    bool ok = !__builtin_mul_overflow(nb, ne0 / ggml_blck_size((enum ggml_type) type), &nb);
    const int64_t rest[3] = {ne1, ne2, ne3};
    for (int i = 0; i < 3 && ok; i++) {
        ok = !__builtin_mul_overflow(n, rest[i], &n) && !__builtin_mul_overflow(nb, rest[i], &nb);
    }
    if (!ok) {
        tnn_set_error("%s: shape [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "] is too large (element or byte count "
                      "overflows int64)", fn, ne0, ne1, ne2, ne3);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ sessions */

int tnn_have_backend(int kind) {
    switch (kind) {
        case 0: return 1;
#ifdef TNN_HAVE_CUDA
        case 1: return 1;
#endif
#ifdef TNN_HAVE_METAL
        case 2: return 1;
#endif
        default: return 0;
    }
}

static struct ggml_context * new_meta_ctx(size_t n_tensors, size_t extra) {
    struct ggml_init_params p = {
        /*.mem_size   =*/ n_tensors * ggml_tensor_overhead() + extra,
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(p);
}

tnn_session * tnn_session_new(int kind) {
    tnn_install_log_hook();
    if (kind < 0 || kind > 2) {
        tnn_set_error("tnn_session_new: unknown backend kind %d (0=CPU, 1=CUDA, 2=Metal)", kind);
        return NULL;
    }
    tnn_session * s = (tnn_session *) calloc(1, sizeof(*s));
    if (!s) {
        tnn_set_error("tnn_session_new: out of memory");
        return NULL;
    }
    s->kind = 0;
#ifdef TNN_HAVE_CUDA
    if (kind == 1) {
        s->backend = ggml_backend_cuda_init(0);
        if (s->backend) s->kind = 1;
    }
#endif
#ifdef TNN_HAVE_METAL
    if (kind == 2) {
        s->backend = ggml_backend_metal_init();
        if (s->backend) s->kind = 2;
    }
#endif
    if (s->backend == NULL) {
        s->backend = ggml_backend_cpu_init(); /* fallback: the requested backend is not compiled in */
    }
    if (s->backend == NULL) {
        tnn_set_error("tnn_session_new: could not initialise any ggml backend");
        free(s);
        return NULL;
    }
    s->n_threads = 1;
    s->ctx_w = new_meta_ctx(TNN_MAX_PERSISTENT_TENSORS, 0);
    s->ctx_mmap = new_meta_ctx(TNN_MAX_MMAP_TENSORS_DEFAULT, 0);
    s->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(s->backend));
    if (!s->ctx_w || !s->ctx_mmap || !s->galloc) {
        tnn_set_error("tnn_session_new: out of memory for contexts");
        if (s->ctx_w) ggml_free(s->ctx_w);
        if (s->ctx_mmap) ggml_free(s->ctx_mmap);
        if (s->galloc) ggml_gallocr_free(s->galloc);
        ggml_backend_free(s->backend);
        free(s);
        return NULL;
    }
    s->magic = TNN_SESSION_MAGIC;
    tnn_live_session_add(s);
    return s;
}

int tnn_session_free(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_session_free")) return -1;
    tnn_live_session_remove(sess);
    tnn_train_free(sess);
    if (sess->ctx_c) ggml_free(sess->ctx_c);
    ggml_gallocr_free(sess->galloc);
    if (sess->buf_w) ggml_backend_buffer_free(sess->buf_w);
    if (sess->buf_mmap) ggml_backend_buffer_free(sess->buf_mmap);
    if (sess->buf_repack) ggml_backend_buffer_free(sess->buf_repack);
    if (sess->ctx_repack) ggml_free(sess->ctx_repack);
    free(sess->repack_bindings);
    ggml_free(sess->ctx_w);
    ggml_free(sess->ctx_mmap);
    free(sess->mmap_bindings);
    ggml_backend_free(sess->backend);
    if (sess->threadpool != NULL) ggml_threadpool_free(sess->threadpool);   /* after its last user */
    sess->magic = 0;
    free(sess);
    return 0;
}

const char * tnn_backend_name(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_backend_name")) return NULL;
    return ggml_backend_name(sess->backend);
}

int tnn_session_backend_kind(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_session_backend_kind")) return -1;
    return sess->kind;
}

int tnn_session_set_n_threads(tnn_session * sess, int n_threads) {
    if (!tnn_check_session(sess, "tnn_session_set_n_threads")) return -1;
    if (n_threads < 1 || n_threads > 512) {
        tnn_set_error("tnn_session_set_n_threads: n_threads must be in 1..512, got %d", n_threads);
        return -1;
    }
    sess->n_threads = n_threads;
    if (sess->kind == 0) {
        ggml_backend_cpu_set_n_threads(sess->backend, n_threads);
        if (sess->threadpool != NULL && tnn_session_set_threadpool(sess, 1) < 0) return -1;   /* resize it */
    }
    return 0;
}

int tnn_session_set_threadpool(tnn_session * sess, int enable) {
    const char * fn = "tnn_session_set_threadpool";
    if (!tnn_check_session(sess, fn)) return -1;
    if (sess->kind != 0) return 0;   /* only the CPU backend runs worker threads of its own */
    /* without a pool ggml starts and joins n_threads - 1 threads in every compute */
    ggml_backend_cpu_set_threadpool(sess->backend, NULL);
    if (sess->threadpool != NULL) {
        ggml_threadpool_free(sess->threadpool);
        sess->threadpool = NULL;
    }
    if (enable && sess->n_threads > 1) {
        struct ggml_threadpool_params p = ggml_threadpool_params_default(sess->n_threads);
        sess->threadpool = ggml_threadpool_new(&p);
        if (sess->threadpool == NULL) {
            tnn_set_error("%s: could not start %d threads", fn, sess->n_threads);
            return -1;
        }
        ggml_backend_cpu_set_threadpool(sess->backend, sess->threadpool);
    }
    return 0;
}

/* ------------------------------------------------------------------ persistent tensors */

static bool check_can_declare(tnn_session * sess, const char * fn) {
    if (!tnn_check_session(sess, fn)) return false;
    if (sess->finalized) {
        tnn_set_error("%s: persistent tensors must be declared before tnn_finalize_weights", fn);
        return false;
    }
    return tnn_ctx_has_room(sess->ctx_w, fn, "persistent");
}

static tnn_tensor * new_persistent(tnn_session * sess, const char * fn, int type, int n_dims, int64_t ne0,
                                   int64_t ne1, int64_t ne2) {
    if (!check_can_declare(sess, fn)) return NULL;
    if (!tnn_check_type(type, fn)) return NULL;
    if (!check_dims(fn, ne0, ne1, ne2)) return NULL;
    if (!check_row_blocks(fn, type, ne0) || !check_size_fits(fn, type, ne0, ne1, ne2, 1)) return NULL;
    struct ggml_tensor * t = NULL;
    switch (n_dims) {
        case 1: t = ggml_new_tensor_1d(sess->ctx_w, (enum ggml_type) type, ne0); break;
        case 2: t = ggml_new_tensor_2d(sess->ctx_w, (enum ggml_type) type, ne0, ne1); break;
        default: t = ggml_new_tensor_3d(sess->ctx_w, (enum ggml_type) type, ne0, ne1, ne2); break;
    }
    return t;
}

tnn_tensor * tnn_input_1d_f32_persistent(tnn_session * sess, int64_t n) {
    return new_persistent(sess, "tnn_input_1d_f32_persistent", GGML_TYPE_F32, 1, n, 1, 1);
}

tnn_tensor * tnn_input_2d_f32_persistent(tnn_session * sess, int64_t rows, int64_t cols) {
    return new_persistent(sess, "tnn_input_2d_f32_persistent", GGML_TYPE_F32, 2, cols, rows, 1);
}

tnn_tensor * tnn_input_2d_persistent_typed(tnn_session * sess, int64_t rows, int64_t cols, int type) {
    return new_persistent(sess, "tnn_input_2d_persistent_typed", type, 2, cols, rows, 1);
}

tnn_tensor * tnn_input_3d_persistent_typed(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type) {
    return new_persistent(sess, "tnn_input_3d_persistent_typed", type, 3, ne0, ne1, ne2);
}

tnn_tensor * tnn_rope_freq_factors_alloc(tnn_session * sess, int64_t d_head) {
    if (d_head <= 0 || d_head % 2 != 0) {
        tnn_set_error("tnn_rope_freq_factors_alloc: d_head must be positive and even, got %" PRId64, d_head);
        return NULL;
    }
    return new_persistent(sess, "tnn_rope_freq_factors_alloc", GGML_TYPE_F32, 1, d_head / 2, 1, 1);
}

/* Views (tnn_view_2d_persistent) take their parent's buffer and address, and the buffer's init_tensor
 * (in the repack buffer: ggml's kernel for the view). ggml_backend_alloc_ctx_tensors does this for the
 * contexts it allocates; this covers the rest, e.g. mapped weights bound in place on the host. */
static bool init_views(struct ggml_context * ctx) {
    if (ctx == NULL) return true;
    for (struct ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
        if (t->view_src == NULL || t->buffer != NULL) continue;
        if (t->view_src->buffer == NULL || t->view_src->data == NULL ||
            ggml_backend_view_init(t) != GGML_STATUS_SUCCESS) {
            tnn_set_error("tnn_finalize_weights: could not give the view '%s' its parent's memory", t->name);
            return false;
        }
    }
    return true;
}

int tnn_finalize_weights(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_finalize_weights")) return -1;
    if (sess->finalized) {
        tnn_set_error("tnn_finalize_weights: already finalized");
        return -1;
    }
    if (ggml_get_first_tensor(sess->ctx_w) != NULL) {
        sess->buf_w = ggml_backend_alloc_ctx_tensors(sess->ctx_w, sess->backend);
        if (sess->buf_w == NULL) {
            tnn_set_error("tnn_finalize_weights: could not allocate the persistent buffer on %s",
                          ggml_backend_name(sess->backend));
            return -1;
        }
        /* KV caches and adapters start at zero; every position is written before it is read. */
        ggml_backend_buffer_clear(sess->buf_w, 0);
    }
    if (sess->n_mmap_bindings > 0 && sess->buf_mmap == NULL) {
        /* Device backend: the mapping is not addressable by the device, so copy once. */
        sess->buf_mmap = ggml_backend_alloc_ctx_tensors(sess->ctx_mmap, sess->backend);
        if (sess->buf_mmap == NULL) {
            tnn_set_error("tnn_finalize_weights: could not allocate the weight buffer on %s",
                          ggml_backend_name(sess->backend));
            return -1;
        }
        ggml_backend_buffer_set_usage(sess->buf_mmap, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (int64_t i = 0; i < sess->n_mmap_bindings; i++) {
            struct ggml_tensor * t = sess->mmap_bindings[i].t;
            ggml_backend_tensor_set(t, sess->mmap_base + sess->mmap_bindings[i].offset, 0, ggml_nbytes(t));
            sess->mmap_copy_bytes += (int64_t) ggml_nbytes(t);
        }
    }
    if (sess->ctx_repack != NULL && ggml_get_first_tensor(sess->ctx_repack) != NULL) {
        sess->buf_repack = ggml_backend_alloc_ctx_tensors_from_buft(sess->ctx_repack, sess->repack_buft);
        if (sess->buf_repack == NULL) {
            tnn_set_error("tnn_finalize_weights: could not allocate the repacked weight buffer");
            return -1;
        }
        ggml_backend_buffer_set_usage(sess->buf_repack, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (int64_t i = 0; i < sess->n_repack_bindings; i++) {
            struct ggml_tensor * t = sess->repack_bindings[i].t;
            /* the CPU_REPACK buffer's set_tensor converts to the interleaved layout */
            ggml_backend_tensor_set(t, sess->mmap_base + sess->repack_bindings[i].offset, 0, ggml_nbytes(t));
            sess->mmap_copy_bytes += (int64_t) ggml_nbytes(t);
        }
    }
    if (!init_views(sess->ctx_w) || !init_views(sess->ctx_mmap) || !init_views(sess->ctx_repack)) return -1;
    sess->finalized = true;
    return 0;
}

int tnn_is_finalized(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_is_finalized")) return -1;
    return sess->finalized ? 1 : 0;
}

/* ------------------------------------------------------------------ the weight mapping */

static tnn_tensor * new_mmap_tensor(tnn_session * sess, const char * fn, int type, int n_dims, int64_t ne0,
                                    int64_t ne1, int64_t ne2, int64_t offset);

/* the tensor's bytes [offset, offset + size) must lie inside the attached mapping */
static bool check_map_range(const tnn_session * sess, const char * fn, int type, int64_t ne0, int64_t ne1,
                            int64_t ne2, int64_t offset) {
    int64_t nbytes = (int64_t) ggml_row_size((enum ggml_type) type, ne0) * ne1 * ne2;
    if (offset < 0 || offset > sess->mmap_size || nbytes > sess->mmap_size - offset) {
        tnn_set_error("%s: byte range [%" PRId64 ", %" PRId64 ") lies outside the %" PRId64 "-byte mapping", fn,
                      offset, offset + nbytes, sess->mmap_size);
        return false;
    }
    return true;
}

/* remember that t's bytes are copied from the mapping at offset when the session is finalized */
static bool push_binding(struct tnn_mmap_binding ** arr, int64_t * n, struct ggml_tensor * t, int64_t offset,
                         const char * fn) {
    struct tnn_mmap_binding * nb = (struct tnn_mmap_binding *) realloc(*arr, (size_t) (*n + 1) * sizeof(*nb));
    if (!nb) {
        tnn_set_error("%s: out of memory", fn);
        return false;
    }
    *arr = nb;
    nb[*n].t = t;
    nb[*n].offset = offset;
    (*n)++;
    return true;
}

int tnn_session_attach_weight_mmap(tnn_session * sess, void * base, int64_t size) {
    const char * fn = "tnn_session_attach_weight_mmap";
    if (!tnn_check_session(sess, fn)) return -1;
    if (base == NULL || size <= 0) {
        tnn_set_error("%s: mapping base is NULL or size %" PRId64 " is not positive", fn, size);
        return -1;
    }
    if (sess->mmap_base != NULL) {
        tnn_set_error("%s: a weight mapping is already attached to this session", fn);
        return -1;
    }
    if (sess->finalized) {
        tnn_set_error("%s: attach the mapping before tnn_finalize_weights", fn);
        return -1;
    }
    if (((uintptr_t) base) % 64 != 0) {
        tnn_set_error("%s: mapping base %p is not 64-byte aligned", fn, base);
        return -1;
    }
    sess->mmap_base = (char *) base;
    sess->mmap_size = size;
    if (sess->kind == 0) {
        /* Host backend: tensors point straight into the mapped pages, no copy. */
        sess->buf_mmap = ggml_backend_cpu_buffer_from_ptr(base, (size_t) size);
        ggml_backend_buffer_set_usage(sess->buf_mmap, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    }
    return 0;
}

static tnn_tensor * new_mmap_tensor(tnn_session * sess, const char * fn, int type, int n_dims, int64_t ne0,
                                    int64_t ne1, int64_t ne2, int64_t offset) {
    if (!tnn_check_session(sess, fn)) return NULL;
    if (sess->mmap_base == NULL) {
        tnn_set_error("%s: no weight mapping attached; call tnn_session_attach_weight_mmap first", fn);
        return NULL;
    }
    if (sess->finalized) {
        tnn_set_error("%s: mapped tensors must be declared before tnn_finalize_weights", fn);
        return NULL;
    }
    if (!tnn_ctx_has_room(sess->ctx_mmap, fn, "mapped-weight")) return NULL;
    if (!tnn_check_type(type, fn)) return NULL;
    if (!check_dims(fn, ne0, ne1, ne2)) return NULL;
    if (!check_row_blocks(fn, type, ne0) || !check_size_fits(fn, type, ne0, ne1, ne2, 1)) return NULL;
    if (!check_map_range(sess, fn, type, ne0, ne1, ne2, offset)) return NULL;
    if (offset % 4 != 0) {
        tnn_set_error("%s: offset %" PRId64 " is not 4-byte aligned", fn, offset);
        return NULL;
    }
    struct ggml_tensor * t = NULL;
    switch (n_dims) {
        case 1: t = ggml_new_tensor_1d(sess->ctx_mmap, (enum ggml_type) type, ne0); break;
        case 2: t = ggml_new_tensor_2d(sess->ctx_mmap, (enum ggml_type) type, ne0, ne1); break;
        default: t = ggml_new_tensor_3d(sess->ctx_mmap, (enum ggml_type) type, ne0, ne1, ne2); break;
    }
    if (sess->buf_mmap != NULL) {
        if (ggml_backend_tensor_alloc(sess->buf_mmap, t, sess->mmap_base + offset) != GGML_STATUS_SUCCESS) {
            tnn_set_error("%s: ggml could not bind the tensor at offset %" PRId64, fn, offset);
            return NULL;
        }
        return t;
    }
    return push_binding(&sess->mmap_bindings, &sess->n_mmap_bindings, t, offset, fn) ? t : NULL;
}

tnn_tensor * tnn_input_1d_persistent_mmap(tnn_session * sess, int64_t n, int type, int64_t offset) {
    return new_mmap_tensor(sess, "tnn_input_1d_persistent_mmap", type, 1, n, 1, 1, offset);
}

tnn_tensor * tnn_input_2d_persistent_mmap(tnn_session * sess, int64_t rows, int64_t cols, int type, int64_t offset) {
    return new_mmap_tensor(sess, "tnn_input_2d_persistent_mmap", type, 2, cols, rows, 1, offset);
}

tnn_tensor * tnn_input_3d_persistent_mmap(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type,
                                          int64_t offset) {
    return new_mmap_tensor(sess, "tnn_input_3d_persistent_mmap", type, 3, ne0, ne1, ne2, offset);
}

/* ------------------------------------------------------------------ repacked matmul weights */

typedef ggml_backend_buffer_type_t * (*tnn_get_extra_bufts_fn)(ggml_backend_dev_t dev);

int tnn_session_set_weight_repack(tnn_session * sess, int enable) {
    const char * fn = "tnn_session_set_weight_repack";
    if (!tnn_check_session(sess, fn)) return -1;
    if (sess->finalized || sess->ctx_repack != NULL) {
        tnn_set_error("%s: choose repacking before declaring weights", fn);
        return -1;
    }
    sess->repack_buft = NULL;
    if (!enable || sess->kind != 0) return 0;
    ggml_backend_dev_t dev = ggml_backend_get_device(sess->backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : NULL;
    tnn_get_extra_bufts_fn get = reg ? (tnn_get_extra_bufts_fn) ggml_backend_reg_get_proc_address(
                                           reg, "ggml_backend_dev_get_extra_bufts") : NULL;
    for (ggml_backend_buffer_type_t * b = get ? get(dev) : NULL; b && *b; b++) {
        if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) {
            sess->repack_buft = *b;
        }
    }
    if (sess->repack_buft == NULL) return 0;
    sess->ctx_repack = new_meta_ctx(TNN_MAX_MMAP_TENSORS_DEFAULT, 0);
    if (sess->ctx_repack == NULL) {
        sess->repack_buft = NULL;
        tnn_set_error("%s: out of memory", fn);
        return -1;
    }
    return 1;
}

/* llama.cpp's weight_buft_supported: would the device run mul_mat(w, x) with w in the repack buffer? */
static bool repack_supports(tnn_session * sess, enum ggml_type type, int n_dims, int64_t ne0, int64_t ne1,
                            int64_t ne2) {
    struct ggml_context * ctx = new_meta_ctx(8, 0);
    if (ctx == NULL) return false;
    struct ggml_tensor * w = n_dims == 2 ? ggml_new_tensor_2d(ctx, type, ne0, ne1)
                                         : ggml_new_tensor_3d(ctx, type, ne0, ne1, ne2);
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(sess->repack_buft, 0);
    w->buffer = dummy;
    struct ggml_tensor * op;
    if (n_dims == 2) {
        op = ggml_mul_mat(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, 512));
    } else {
        struct ggml_tensor * b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne0, 2, 512);
        struct ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 512);
        op = ggml_mul_mat_id(ctx, w, b, ids);
    }
    bool ok = ggml_backend_dev_supports_op(ggml_backend_get_device(sess->backend), op);
    w->buffer = NULL;
    if (dummy) ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

/* A matmul weight: into the repack context when repacking is on and ggml takes this type/shape,
 * else a plain tensor. ``mapped``: bytes come from the mapping at ``offset`` (else uploaded later). */
static tnn_tensor * new_weight(tnn_session * sess, const char * fn, int type, int n_dims, int64_t ne0, int64_t ne1,
                               int64_t ne2, bool mapped, int64_t offset) {
    if (!tnn_check_session(sess, fn)) return NULL;
    if (sess->repack_buft == NULL || !tnn_check_type(type, fn) || ne0 <= 0 || ne1 <= 0 || ne2 <= 0 ||
        !repack_supports(sess, (enum ggml_type) type, n_dims, ne0, ne1, ne2) ||
        (mapped && sess->mmap_base == NULL) || sess->finalized) {
        /* not repackable, or an error the plain constructors report */
        return mapped ? new_mmap_tensor(sess, fn, type, n_dims, ne0, ne1, ne2, offset)
                      : new_persistent(sess, fn, type, n_dims, ne0, ne1, ne2);
    }
    if (!tnn_ctx_has_room(sess->ctx_repack, fn, "repacked-weight")) return NULL;
    if (!check_row_blocks(fn, type, ne0) || !check_size_fits(fn, type, ne0, ne1, ne2, 1)) return NULL;
    if (!mapped) {
        return n_dims == 2 ? ggml_new_tensor_2d(sess->ctx_repack, (enum ggml_type) type, ne0, ne1)
                           : ggml_new_tensor_3d(sess->ctx_repack, (enum ggml_type) type, ne0, ne1, ne2);
    }
    if (!check_map_range(sess, fn, type, ne0, ne1, ne2, offset)) return NULL;
    struct ggml_tensor * t = n_dims == 2 ? ggml_new_tensor_2d(sess->ctx_repack, (enum ggml_type) type, ne0, ne1)
                                         : ggml_new_tensor_3d(sess->ctx_repack, (enum ggml_type) type, ne0, ne1, ne2);
    return push_binding(&sess->repack_bindings, &sess->n_repack_bindings, t, offset, fn) ? t : NULL;
}

tnn_tensor * tnn_input_2d_weight_mmap(tnn_session * sess, int64_t rows, int64_t cols, int type, int64_t offset) {
    return new_weight(sess, "tnn_input_2d_weight_mmap", type, 2, cols, rows, 1, true, offset);
}

tnn_tensor * tnn_input_3d_weight_mmap(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type,
                                      int64_t offset) {
    return new_weight(sess, "tnn_input_3d_weight_mmap", type, 3, ne0, ne1, ne2, true, offset);
}

tnn_tensor * tnn_input_2d_weight_typed(tnn_session * sess, int64_t rows, int64_t cols, int type) {
    return new_weight(sess, "tnn_input_2d_weight_typed", type, 2, cols, rows, 1, false, 0);
}

tnn_tensor * tnn_input_3d_weight_typed(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type) {
    return new_weight(sess, "tnn_input_3d_weight_typed", type, 3, ne0, ne1, ne2, false, 0);
}

/* ------------------------------------------------------------------ persistent views */

/* ggml's CPU_REPACK layout stores a weight's rows interleaved in groups of NB_COLS rows (4 or 8 on
 * x86/ARM, 16 for the RISC-V kernels: the most any repack type uses, see ggml-cpu/repack.cpp). A view
 * of a repacked weight is only valid as whole groups; a multiple of 16 rows is one for every kernel. */
#define TNN_REPACK_MAX_INTERLEAVE 16

/* The kernel (ggml's tensor traits) the CPU_REPACK buffer's init_tensor picks for a tensor of this
 * type and shape, as it stores it in tensor->extra; NULL when there is none. */
static const void * repack_kernel(tnn_session * sess, enum ggml_type type, const int64_t ne[4]) {
    struct ggml_context * ctx = new_meta_ctx(1, 0);
    if (ctx == NULL) return NULL;
    const void * kernel = NULL;
    ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(sess->repack_buft, 64);
    if (probe != NULL) {
        struct ggml_tensor * t = ggml_new_tensor(ctx, type, 4, ne);
        if (ggml_backend_buffer_init_tensor(probe, t) == GGML_STATUS_SUCCESS) kernel = t->extra;
        ggml_backend_buffer_free(probe);
    }
    ggml_free(ctx);
    return kernel;
}

/* a view of a repacked weight: all columns, whole row groups, and the parent's kernel */
static bool check_repacked_view(tnn_session * sess, const char * fn, const struct ggml_tensor * parent, int64_t ne0,
                                int64_t ne1, int64_t nb1, int64_t offset) {
    const char * ty = ggml_type_name(parent->type);
    if (ne0 != parent->ne[0] || nb1 != (int64_t) parent->nb[1]) {
        tnn_set_error("%s: parent is a %s weight repacked for ggml's CPU kernels (rows interleaved in groups); a view "
                      "of it must keep every column (ne0 %" PRId64 ", nb1 %zu), got ne0 %" PRId64 ", nb1 %" PRId64,
                      fn, ty, parent->ne[0], parent->nb[1], ne0, nb1);
        return false;
    }
    const int64_t g = TNN_REPACK_MAX_INTERLEAVE;
    if (offset % (g * nb1) != 0 || ne1 % g != 0) {
        tnn_set_error("%s: parent is a %s weight repacked for ggml's CPU kernels (rows interleaved in groups of up "
                      "to %" PRId64 "); a view of it must start at a multiple of %" PRId64 " rows and span a multiple "
                      "of %" PRId64 " rows, got %" PRId64 " rows at byte offset %" PRId64 " (rows of %" PRId64 " bytes)",
                      fn, ty, g, g, g, ne1, offset, nb1);
        return false;
    }
    const struct ggml_tensor * root = parent->view_src ? parent->view_src : parent;
    const int64_t ne_view[4] = {ne0, ne1, 1, 1};
    const void * kernel = repack_kernel(sess, root->type, root->ne);
    if (kernel == NULL || repack_kernel(sess, root->type, ne_view) != kernel) {
        tnn_set_error("%s: ggml would run a %" PRId64 "-row view of this repacked %s weight with another repack "
                      "kernel than its %" PRId64 "-row parent's layout; declare those rows as a weight of their own",
                      fn, ne1, ty, root->ne[1]);
        return false;
    }
    return true;
}

/* A view is made in its parent's context (persistent, mapped or repacked) and gets its memory from
 * the parent at tnn_finalize_weights. */
tnn_tensor * tnn_view_2d_persistent(tnn_session * sess, tnn_tensor * parent, int64_t ne0, int64_t ne1, int64_t nb1,
                                    int64_t offset) {
    const char * fn = "tnn_view_2d_persistent";
    if (!tnn_check_session(sess, fn)) return NULL;
    if (sess->finalized) {
        tnn_set_error("%s: persistent tensors must be declared before tnn_finalize_weights", fn);
        return NULL;
    }
    struct ggml_context * ctx = NULL;
    if (parent != NULL) {
        if (tnn_ptr_in_ctx(sess->ctx_w, parent, true)) ctx = sess->ctx_w;
        else if (tnn_ptr_in_ctx(sess->ctx_mmap, parent, true)) ctx = sess->ctx_mmap;
        else if (tnn_ptr_in_ctx(sess->ctx_repack, parent, true)) ctx = sess->ctx_repack;
    }
    if (ctx == NULL) {
        tnn_set_error("%s: parent must be a persistent tensor of this session (tnn_input_*_persistent*, "
                      "tnn_input_*_mmap, tnn_input_*_weight_*)", fn);
        return NULL;
    }
    if (!tnn_ctx_has_room(ctx, fn, "persistent")) return NULL;
    if (ne0 <= 0 || ne1 <= 0 || nb1 <= 0 || offset < 0) {
        tnn_set_error("%s: ne0, ne1, nb1 must be positive and offset >= 0", fn);
        return NULL;
    }
    if (!tnn_view_fits(fn, parent, ne0, ne1, 1, 1, nb1, 0, 0, offset)) return NULL;
    if (ctx == sess->ctx_repack && !check_repacked_view(sess, fn, parent, ne0, ne1, nb1, offset)) return NULL;
    return ggml_view_2d(ctx, parent, ne0, ne1, (size_t) nb1, (size_t) offset);
}

int tnn_tensor_is_repacked(tnn_session * sess, tnn_tensor * t) {
    if (!tnn_check_session(sess, "tnn_tensor_is_repacked") ||
        !tnn_check_weight(sess, t, "tnn_tensor_is_repacked", "t")) return -1;
    return tnn_is_repacked(sess, t) ? 1 : 0;
}

int64_t tnn_session_mmap_resident_copy_bytes(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_session_mmap_resident_copy_bytes")) return -1;
    return sess->mmap_copy_bytes;
}

/* ------------------------------------------------------------------ graph life cycle */

#define TNN_GRAPH_SIZE (TNN_MAX_GRAPH_NODES + TNN_MAX_PERSISTENT_TENSORS + TNN_MAX_MMAP_TENSORS_DEFAULT)

int tnn_reset_for_rebuild(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_reset_for_rebuild")) return -1;
    if (sess->ctx_c) {
        ggml_free(sess->ctx_c);
        sess->ctx_c = NULL;
        sess->gf = NULL;
    }
    const bool grads = sess->next_graph_grads;   /* set by tnn_reset_for_training (train.c) */
    sess->next_graph_grads = false;
    sess->graph_grads = grads;
    sess->backward_built = false;
    sess->ctx_c = new_meta_ctx(TNN_MAX_GRAPH_NODES, ggml_graph_overhead_custom(TNN_GRAPH_SIZE, grads));
    if (!sess->ctx_c) {
        tnn_set_error("tnn_reset_for_rebuild: out of memory for the compute context");
        return -1;
    }
    /* graph size bounds nodes and leafs: every node is a compute tensor and
     * every leaf a compute or persistent tensor, so it can never overflow */
    sess->gf = ggml_new_graph_custom(sess->ctx_c, TNN_GRAPH_SIZE, grads);
    sess->graph_allocated = false;
    return 0;
}

static tnn_tensor * new_graph_input(tnn_session * sess, const char * fn, int type, int64_t ne0, int64_t ne1,
                                    int64_t ne2, int64_t ne3) {
    if (!tnn_check_session(sess, fn)) return NULL;
    if (!tnn_check_graph_ready(sess, fn)) return NULL;
    if (!tnn_check_type(type, fn)) return NULL;
    if (!check_dims(fn, ne0, ne1, ne2) || !check_dims(fn, ne3, 1, 1)) return NULL;
    if (!check_row_blocks(fn, type, ne0) || !check_size_fits(fn, type, ne0, ne1, ne2, ne3)) return NULL;
    struct ggml_tensor * t = ggml_new_tensor_4d(sess->ctx_c, (enum ggml_type) type, ne0, ne1, ne2, ne3);
    ggml_set_input(t);
    return t;
}

tnn_tensor * tnn_input_1d_i32(tnn_session * sess, int64_t n) {
    return new_graph_input(sess, "tnn_input_1d_i32", GGML_TYPE_I32, n, 1, 1, 1);
}

tnn_tensor * tnn_input_1d_i32_ctx(tnn_session * sess, int64_t n) {
    return new_graph_input(sess, "tnn_input_1d_i32_ctx", GGML_TYPE_I32, n, 1, 1, 1);
}

tnn_tensor * tnn_input_1d_f32(tnn_session * sess, int64_t n) {
    return new_graph_input(sess, "tnn_input_1d_f32", GGML_TYPE_F32, n, 1, 1, 1);
}

tnn_tensor * tnn_input_2d_f32(tnn_session * sess, int64_t rows, int64_t cols) {
    return new_graph_input(sess, "tnn_input_2d_f32", GGML_TYPE_F32, cols, rows, 1, 1);
}

tnn_tensor * tnn_input_4d(tnn_session * sess, int type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3) {
    return new_graph_input(sess, "tnn_input_4d", type, ne0, ne1, ne2, ne3);
}

int tnn_add_to_graph(tnn_session * sess, tnn_tensor * t) {
    const char * fn = "tnn_add_to_graph";
    if (!tnn_check_session(sess, fn) || !tnn_check_tensor(sess, t, fn, "t")) return -1;
    if (sess->gf == NULL) {
        tnn_set_error("%s: no compute graph; call tnn_reset_for_rebuild first", fn);
        return -1;
    }
    if (sess->graph_allocated) {
        tnn_set_error("%s: the graph is already realized; rebuild to change it", fn);
        return -1;
    }
    ggml_build_forward_expand(sess->gf, t);
    return 0;
}

int tnn_set_output(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_set_output", "t")) return -1;
    ggml_set_output(t);
    return 0;
}

int tnn_set_input(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_set_input", "t")) return -1;
    ggml_set_input(t);
    return 0;
}

int tnn_set_param(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_set_param", "t")) return -1;
    if (t->op != GGML_OP_NONE) {
        tnn_set_error("tnn_set_param: only leaf tensors (weights, adapters) can be parameters, got op %s",
                      ggml_op_name(t->op));
        return -1;
    }
    ggml_set_param(t);
    return 0;
}

int tnn_set_name(tnn_tensor * t, const char * name) {
    if (!tnn_check_tensor(NULL, t, "tnn_set_name", "t")) return -1;
    if (name == NULL) {
        tnn_set_error("tnn_set_name: name is NULL");
        return -1;
    }
    ggml_set_name(t, name);
    return 0;
}

int tnn_realize(tnn_session * sess, tnn_tensor * root) {
    const char * fn = "tnn_realize";
    if (!tnn_check_session(sess, fn) || !tnn_check_tensor(sess, root, fn, "root")) return -1;
    if (sess->gf == NULL) {
        tnn_set_error("%s: no compute graph; call tnn_reset_for_rebuild first", fn);
        return -1;
    }
    if (!sess->finalized) {
        tnn_set_error("%s: call tnn_finalize_weights before realizing a graph", fn);
        return -1;
    }
    if (sess->graph_allocated) {
        tnn_set_error("%s: the graph is already realized; call tnn_reset_for_rebuild to build a new one", fn);
        return -1;
    }
    ggml_set_output(root);
    ggml_build_forward_expand(sess->gf, root);
    int n = ggml_graph_n_nodes(sess->gf);
    for (int i = 0; i < n; i++) {
        struct ggml_tensor * node = ggml_graph_node(sess->gf, i);
        if (!ggml_backend_supports_op(sess->backend, node)) {
            char sh[128];
            tnn_shape_str(node, sh, sizeof sh);
            tnn_set_error("%s: backend %s does not support op %s on %s (node %d '%s')", fn,
                          ggml_backend_name(sess->backend), ggml_op_desc(node), sh, i, node->name);
            return -1;
        }
    }
    uint64_t sig = 1469598103934665603ULL;   /* FNV-1a over the indices of the output nodes */
    for (int i = 0; i < n; i++) {
        if (ggml_graph_node(sess->gf, i)->flags & GGML_TENSOR_FLAG_OUTPUT) {
            sig = (sig ^ (uint64_t) i) * 1099511628211ULL;
        }
    }
    if (sig != sess->outputs_signature) {
        if (!ggml_gallocr_reserve(sess->galloc, sess->gf)) {
            tnn_set_error("%s: could not plan the compute graph (%d nodes)", fn, n);
            return -1;
        }
        sess->outputs_signature = sig;
    }
    if (!ggml_gallocr_alloc_graph(sess->galloc, sess->gf)) {
        tnn_set_error("%s: could not allocate the compute graph (%d nodes)", fn, n);
        return -1;
    }
    sess->graph_allocated = true;
    return 0;
}

int tnn_graph_n_nodes(tnn_session * sess) {
    if (!tnn_check_session(sess, "tnn_graph_n_nodes")) return -1;
    return sess->gf ? ggml_graph_n_nodes(sess->gf) : 0;
}

/* Index-valued inputs are data, not shapes: ggml's CPU kernels assert (get_rows)
 * or read out of bounds (mul_mat_id) on an out-of-range id, so check them on the
 * host before computing. The ids tensor may reach a leaf through views,
 * reshapes, permutes, copies and conts (each passes element values through
 * unchanged), or come from top_k/argsort (values < the sorted row length). */
static bool check_index_input(const char * what, const struct ggml_tensor * ids, int64_t limit, int depth) {
    const struct ggml_tensor * t = ids;
    switch (t->op) {
        case GGML_OP_NONE:
        case GGML_OP_VIEW:
        case GGML_OP_RESHAPE:
        case GGML_OP_PERMUTE:
        case GGML_OP_TRANSPOSE:
            if (t->op != GGML_OP_NONE && t->view_src != NULL && t->view_src->op != GGML_OP_NONE) {
                /* a view of a computed tensor: its values are a subset of the source's */
                return depth < 64 && check_index_input(what, t->view_src, limit, depth + 1);
            }
            break;
        case GGML_OP_CPY:
        case GGML_OP_CONT:
        case GGML_OP_DUP:
            return depth < 64 && check_index_input(what, t->src[0], limit, depth + 1);
        case GGML_OP_TOP_K:
        case GGML_OP_ARGSORT:
            if (t->src[0]->ne[0] > limit) {
                tnn_set_error("tnn_compute: %s indices come from a top_k/argsort over %" PRId64
                              " values, but only %" PRId64 " are valid", what, t->src[0]->ne[0], limit);
                return false;
            }
            return true;
        default:
            tnn_set_error("tnn_compute: %s indices computed by op %s cannot be range-checked", what, ggml_op_desc(t));
            return false;
    }
    /* a leaf, or a view straight into one: read its elements through its strides */
    const struct ggml_tensor * base = t->view_src ? t->view_src : t;
    if (t->type != GGML_TYPE_I32 || t->data == NULL || base->buffer == NULL ||
        !ggml_backend_buffer_is_host(base->buffer)) {
        return true; /* device memory: not readable here */
    }
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
    for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
    for (int64_t i1 = 0; i1 < t->ne[1]; i1++)
    for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
        int32_t v = *(const int32_t *) ((const char *) t->data + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] +
                                        i3 * t->nb[3]);
        if (v < 0 || v >= limit) {
            tnn_set_error("tnn_compute: %s index %d at [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "] of input '%s' "
                          "is out of range [0, %" PRId64 ")", what, v, i0, i1, i2, i3, ids->name, limit);
            return false;
        }
    }
    return true;
}

int tnn_compute(tnn_session * sess) {
    const char * fn = "tnn_compute";
    if (!tnn_check_session(sess, fn)) return -1;
    if (!sess->graph_allocated) {
        tnn_set_error("%s: no realized graph; call tnn_realize first", fn);
        return -1;
    }
    int n = ggml_graph_n_nodes(sess->gf);
    for (int i = 0; i < n; i++) {
        struct ggml_tensor * node = ggml_graph_node(sess->gf, i);
        if (node->op == GGML_OP_GET_ROWS && !check_index_input("row", node->src[1], node->src[0]->ne[1], 0)) return -1;
        if (node->op == GGML_OP_MUL_MAT_ID && !check_index_input("expert", node->src[2], node->src[0]->ne[2], 0)) return -1;
        if (node->op == GGML_OP_SET_ROWS && !check_index_input("destination row", node->src[1], node->ne[1], 0)) return -1;
    }
    enum ggml_status st = ggml_backend_graph_compute(sess->backend, sess->gf);
    if (st != GGML_STATUS_SUCCESS) {
        tnn_set_error("%s: ggml_backend_graph_compute failed with status %d", fn, (int) st);
        return -1;
    }
    return 0;
}
