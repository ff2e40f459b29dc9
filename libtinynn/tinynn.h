/*
 * libtinynn: a thin, validating C shim over ggml.
 *
 * Python (toy_llm.tinynn, via cffi) builds every compute graph by calling these
 * functions one-to-one. Each function does one ggml thing: it validates its
 * arguments (handles, shapes, types, offsets) *before* calling ggml, because
 * ggml aborts the process on a failed assert. On failure it returns NULL (for
 * handles) or a negative number (for counts/status) and records a message that
 * tnn_last_error() returns.
 *
 * Life cycle of a session (mirrors ggml's examples/simple/simple-backend.cpp):
 *   tnn_session_new            backend (CPU / CUDA / Metal)
 *   tnn_input_*_persistent*    declare weights, KV cache, adapters (ctx_w, or
 *                              pointing into an attached GGUF mmap)
 *   tnn_finalize_weights       allocate the persistent tensors on the backend
 *   loop:
 *     tnn_reset_for_rebuild    fresh compute context + graph
 *     tnn_input_1d_i32 / ops   build the graph
 *     tnn_realize(root)        expand root into the graph, allocate it
 *     tnn_tensor_set_*         upload inputs
 *     tnn_compute              run
 *     tnn_tensor_get_*         download outputs
 *
 * The block between TNN_CDEF_BEGIN and TNN_CDEF_END is fed verbatim to cffi's
 * cdef(): it must contain only plain C declarations (no macros).
 */
#ifndef TINYNN_H
#define TINYNN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* TNN_CDEF_BEGIN */
typedef struct tnn_session tnn_session;
typedef struct tnn_gguf tnn_gguf;
typedef struct ggml_tensor tnn_tensor;

/* ---- errors & misc ---- */
const char * tnn_last_error(void);          /* message of the last failure in this thread ("" if none) */
void         tnn_clear_error(void);
void *       tnn_null_ptr(void);            /* NULL, for callers that have no null literal */
int64_t      tnn_row_size(int type, int64_t n);   /* bytes of one row of n elements of type; <0 on error */
int          tnn_type_block_size(int type);       /* elements per block; <0 on error */
const char * tnn_type_name(int type);             /* "" for an unknown type */
int          tnn_type_count(void);
int64_t      tnn_quantize(int type, const float * src, void * dst, int64_t nrows, int64_t n_per_row, int64_t dst_size);
int          tnn_dequantize(int type, const void * src, float * dst, int64_t n, int64_t src_size);

/* ---- session & buffers ---- */
tnn_session * tnn_session_new(int kind);          /* 0=CPU 1=CUDA 2=Metal; falls back to CPU if not compiled in */
int           tnn_session_free(tnn_session * sess);
const char *  tnn_backend_name(tnn_session * sess);
int           tnn_session_set_n_threads(tnn_session * sess, int n_threads);
/* CPU: 1 keeps the session's n_threads workers alive between computes (ggml's threadpool, resized by
 * set_n_threads); 0 (the default) lets ggml start and join them in every compute, as llama.cpp does */
int           tnn_session_set_threadpool(tnn_session * sess, int enable);
int           tnn_session_backend_kind(tnn_session * sess);  /* the kind actually running */
int           tnn_have_backend(int kind);                    /* 1 if compiled in */

/* persistent tensors (weights, caches): declared before tnn_finalize_weights.
 * 2-D shapes are given as (rows, cols): ggml ne = [cols, rows]. */
tnn_tensor * tnn_input_1d_f32_persistent(tnn_session * sess, int64_t n);
tnn_tensor * tnn_input_2d_f32_persistent(tnn_session * sess, int64_t rows, int64_t cols);
tnn_tensor * tnn_input_2d_persistent_typed(tnn_session * sess, int64_t rows, int64_t cols, int type);
tnn_tensor * tnn_input_3d_persistent_typed(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type);
/* a persistent window [ne0, ne1] (row stride nb1, byte offset) into a persistent tensor, a mapped
 * weight (tnn_input_*_mmap) or a matmul weight (tnn_input_*_weight_*, repacked or not), declared
 * before finalize and given the parent's memory there: e.g. one KV head's part of a layer's cache, or
 * one attention head's rows of a layer's weight. A view of a repacked weight must keep every column
 * (ne0 and nb1 the parent's) and start at and span a multiple of 16 rows (ggml's widest row interleave). */
tnn_tensor * tnn_view_2d_persistent(tnn_session * sess, tnn_tensor * parent, int64_t ne0, int64_t ne1, int64_t nb1,
                                    int64_t offset);
tnn_tensor * tnn_rope_freq_factors_alloc(tnn_session * sess, int64_t d_head);   /* F32 [d_head/2] */
int          tnn_finalize_weights(tnn_session * sess);
int          tnn_is_finalized(tnn_session * sess);

/* tensors that point into an attached, read-only weight mapping (a GGUF mmap).
 * offset is the byte offset from the mapping's base. 3-D shapes are ne order. */
int          tnn_session_attach_weight_mmap(tnn_session * sess, void * base, int64_t size);
tnn_tensor * tnn_input_1d_persistent_mmap(tnn_session * sess, int64_t n, int type, int64_t offset);
tnn_tensor * tnn_input_2d_persistent_mmap(tnn_session * sess, int64_t rows, int64_t cols, int type, int64_t offset);
tnn_tensor * tnn_input_3d_persistent_mmap(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type, int64_t offset);
int64_t      tnn_session_mmap_resident_copy_bytes(tnn_session * sess);  /* bytes copied off the map (non-host backends) */
/* Matmul weights. With repacking on (CPU backend, before any weight is declared), a weight whose
 * type/shape ggml's CPU_REPACK buffer takes is copied there at finalize in its interleaved layout,
 * exactly as llama.cpp does by default, so the same GEMV kernels run (bit-identical results, and
 * faster). Repacked tensors can only be the weight of tnn_matmul / tnn_mul_mat_id, and can be
 * written (whole) but not read back. Returns 1 when repacking is active, 0 when unavailable. */
int          tnn_session_set_weight_repack(tnn_session * sess, int enable);
tnn_tensor * tnn_input_2d_weight_mmap(tnn_session * sess, int64_t rows, int64_t cols, int type, int64_t offset);
tnn_tensor * tnn_input_3d_weight_mmap(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type, int64_t offset);
tnn_tensor * tnn_input_2d_weight_typed(tnn_session * sess, int64_t rows, int64_t cols, int type);  /* filled by upload */
tnn_tensor * tnn_input_3d_weight_typed(tnn_session * sess, int64_t ne0, int64_t ne1, int64_t ne2, int type);
int          tnn_tensor_is_repacked(tnn_session * sess, tnn_tensor * t);

/* ---- graph life cycle ---- */
int          tnn_reset_for_rebuild(tnn_session * sess);
tnn_tensor * tnn_input_1d_i32(tnn_session * sess, int64_t n);        /* graph input, allocated by tnn_realize */
tnn_tensor * tnn_input_1d_i32_ctx(tnn_session * sess, int64_t n);    /* same, the seed's name for the position input */
tnn_tensor * tnn_input_1d_f32(tnn_session * sess, int64_t n);
tnn_tensor * tnn_input_2d_f32(tnn_session * sess, int64_t rows, int64_t cols);
tnn_tensor * tnn_input_4d(tnn_session * sess, int type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3);
int          tnn_add_to_graph(tnn_session * sess, tnn_tensor * t);   /* expand t into the graph now (ordering) */
int          tnn_set_output(tnn_tensor * t);                         /* keep t's memory alive for download */
int          tnn_set_input(tnn_tensor * t);
int          tnn_set_param(tnn_tensor * t);                          /* mark trainable */
int          tnn_set_name(tnn_tensor * t, const char * name);
int          tnn_realize(tnn_session * sess, tnn_tensor * root);     /* expand root, allocate the graph */
int          tnn_compute(tnn_session * sess);
int          tnn_graph_n_nodes(tnn_session * sess);

/* ---- tensor info & host I/O (whole tensors, one call) ---- */
int          tnn_tensor_ndim(tnn_tensor * t);
int          tnn_tensor_is_contiguous(tnn_tensor * t);            /* 1 / 0 */
int64_t      tnn_tensor_ne(tnn_tensor * t, int dim);
int64_t      tnn_tensor_nb(tnn_tensor * t, int dim);
int          tnn_tensor_type(tnn_tensor * t);
int64_t      tnn_tensor_nbytes(tnn_tensor * t);
int          tnn_tensor_is_allocated(tnn_tensor * t);
const char * tnn_tensor_name(tnn_tensor * t);
int          tnn_tensor_set_f32(tnn_session * sess, tnn_tensor * t, const float * data, int64_t n);
int          tnn_tensor_set_i32(tnn_session * sess, tnn_tensor * t, const int32_t * data, int64_t n);
int          tnn_tensor_set_raw(tnn_session * sess, tnn_tensor * t, const void * data, int64_t nbytes);
int          tnn_tensor_get_f32(tnn_session * sess, tnn_tensor * t, float * out, int64_t n);
int          tnn_tensor_get_i32(tnn_session * sess, tnn_tensor * t, int32_t * out, int64_t n);
int          tnn_tensor_get_raw(tnn_session * sess, tnn_tensor * t, void * out, int64_t nbytes);
int          tnn_upload_from_float_array(tnn_session * sess, tnn_tensor * t, const float * data, int64_t n);

/* ---- ops (each returns a new tensor in the compute context) ---- */
tnn_tensor * tnn_get_rows(tnn_session * sess, tnn_tensor * table, tnn_tensor * ids);
tnn_tensor * tnn_matmul(tnn_session * sess, tnn_tensor * w, tnn_tensor * x);    /* ggml_mul_mat(w, x): ne=[w.ne1, x.ne1, ...] */
/* The same product for a 2-D Q4_1, Q5_0 or Q8_0 w and a 2-D F32 x on the CPU backend, bit for bit
 * ggml_mul_mat's, by kernels that unpack each weight block once per four columns of x, or for one
 * column run two rows at once with the weights prefetched (tiles.c): x is quantized (Q8_1 / Q8_0)
 * by a ggml_cpy node, then one custom node multiplies. No backward (inference graphs only). tnn_tiles_available(type): 1 where this CPU and
 * ggml build pass the kernel's bit-exactness self-test against ggml_mul_mat for that weight type. */
int tnn_tiles_available(int type);
int tnn_tiles_apply(tnn_session * sess, tnn_tensor * w, tnn_tensor * x);   /* 1: tnn_mul_mat_tiles takes w x, 0: not */
tnn_tensor * tnn_mul_mat_tiles(tnn_session * sess, tnn_tensor * w, tnn_tensor * x);
tnn_tensor * tnn_add(tnn_session * sess, tnn_tensor * a, tnn_tensor * b);       /* b broadcasts over a */
tnn_tensor * tnn_mul(tnn_session * sess, tnn_tensor * a, tnn_tensor * b);
tnn_tensor * tnn_scale(tnn_session * sess, tnn_tensor * a, float s);
tnn_tensor * tnn_silu(tnn_session * sess, tnn_tensor * a);
tnn_tensor * tnn_gelu(tnn_session * sess, tnn_tensor * a);                      /* tanh approximation */
tnn_tensor * tnn_swiglu_split(tnn_session * sess, tnn_tensor * a, tnn_tensor * b); /* silu(a) * b, one op */
tnn_tensor * tnn_tanh(tnn_session * sess, tnn_tensor * a);
tnn_tensor * tnn_softmax(tnn_session * sess, tnn_tensor * a);
tnn_tensor * tnn_softmax_ext(tnn_session * sess, tnn_tensor * a, tnn_tensor * mask, float scale, float max_bias);
tnn_tensor * tnn_rms_norm(tnn_session * sess, tnn_tensor * a, tnn_tensor * gamma, float eps);  /* gamma may be NULL */
tnn_tensor * tnn_rope_ext(tnn_session * sess, tnn_tensor * a, tnn_tensor * pos, int n_dims,
                          float freq_base, float freq_scale, float ext_factor, float attn_factor,
                          float beta_fast, float beta_slow, tnn_tensor * freq_factors,
                          int mode, int n_ctx_orig);
tnn_tensor * tnn_view_1d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t offset);
tnn_tensor * tnn_view_2d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t nb1, int64_t offset);
tnn_tensor * tnn_view_3d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                         int64_t nb1, int64_t nb2, int64_t offset);
/* ggml_view_4d: strides need not grow with the dimension (a KV cache's per-sequence streams) */
tnn_tensor * tnn_view_4d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                         int64_t nb1, int64_t nb2, int64_t nb3, int64_t offset);
tnn_tensor * tnn_reshape_2d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1);
tnn_tensor * tnn_reshape_3d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2);
tnn_tensor * tnn_reshape_4d(tnn_session * sess, tnn_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3);
tnn_tensor * tnn_transpose(tnn_session * sess, tnn_tensor * a);                 /* swaps ne0/ne1, materialized */
tnn_tensor * tnn_permute(tnn_session * sess, tnn_tensor * a, int ax0, int ax1, int ax2, int ax3);
tnn_tensor * tnn_cont(tnn_session * sess, tnn_tensor * a);
/* Activation hooks (CPU backend): tnn_map_hook(sess, a, user) is a new tensor shaped like ``a``
 * (F32, contiguous) that the dispatcher fills at compute time: dispatcher(user, dst, src, n) with
 * src = a's n floats. One dispatcher per process, set once; without one, dst is a copy of src. */
typedef void (*tnn_hook_fn)(void * user, float * dst, const float * src, int64_t n);
int          tnn_set_hook_dispatcher(tnn_hook_fn fn);
tnn_tensor * tnn_map_hook(tnn_session * sess, tnn_tensor * a, void * user);
tnn_tensor * tnn_cast(tnn_session * sess, tnn_tensor * a, int type);         /* F32 <-> F16/BF16 */
tnn_tensor * tnn_concat(tnn_session * sess, tnn_tensor * a, tnn_tensor * b, int dim);
tnn_tensor * tnn_cpy(tnn_session * sess, tnn_tensor * src, tnn_tensor * dst);  /* converts type (quantizes) */
/* dst[:, ids[i], i2] = src[:, i, i2] for every i (ids: I32 [n_rows, 1 or a divisor of ne2]); converts
 * type (quantizes) like tnn_cpy. Row indices are range-checked at tnn_compute. Returns a view of dst. */
tnn_tensor * tnn_set_rows(tnn_session * sess, tnn_tensor * dst, tnn_tensor * src, tnn_tensor * ids);
tnn_tensor * tnn_flash_attn_ext(tnn_session * sess, tnn_tensor * q, tnn_tensor * k, tnn_tensor * v,
                                tnn_tensor * mask, float scale, float max_bias, float logit_softcap);
tnn_tensor * tnn_mul_mat_hadamard(tnn_session * sess, tnn_tensor * rot, tnn_tensor * x); /* rot @ x, rot a Walsh-Hadamard matrix (fast path) */
tnn_tensor * tnn_mul_mat_id(tnn_session * sess, tnn_tensor * as, tnn_tensor * b, tnn_tensor * ids);
tnn_tensor * tnn_top_k(tnn_session * sess, tnn_tensor * a, int k);
tnn_tensor * tnn_argsort_top_k(tnn_session * sess, tnn_tensor * a, int k);     /* indices of the k largest, descending */
tnn_tensor * tnn_clamp(tnn_session * sess, tnn_tensor * a, float min, float max);
tnn_tensor * tnn_sum_rows(tnn_session * sess, tnn_tensor * a);
tnn_tensor * tnn_div(tnn_session * sess, tnn_tensor * a, tnn_tensor * b);

/* ---- GGUF (header parsed by ggml's gguf, tensor data mmap'd read-only) ---- */
tnn_gguf *   tnn_gguf_load(const char * path);
int          tnn_gguf_free(tnn_gguf * g);
int64_t      tnn_gguf_find_index(tnn_gguf * g, const char * name);   /* -1 when absent (not an error) */
int64_t      tnn_gguf_n_tensors(tnn_gguf * g);
const char * tnn_gguf_tensor_name(tnn_gguf * g, int64_t idx);
int64_t      tnn_gguf_tensor_file_offset(tnn_gguf * g, int64_t idx);   /* from file start = mmap base */
int          tnn_gguf_tensor_type(tnn_gguf * g, int64_t idx);
int64_t      tnn_gguf_tensor_nbytes(tnn_gguf * g, int64_t idx);
int          tnn_gguf_get_bool(tnn_gguf * g, const char * key);       /* 1/0; -1 when absent or not a bool */
void *       tnn_gguf_mmap_base(tnn_gguf * g);
int64_t      tnn_gguf_mmap_size(tnn_gguf * g);
int          tnn_gguf_version(tnn_gguf * g);
/* tensor shape: ndim counts dimensions as ggml_n_dims does (trailing 1s dropped, at least 1);
 * ne(idx, dim) for dim 0..3 (1 past ndim) */
int          tnn_gguf_tensor_ndim(tnn_gguf * g, int64_t idx);
int64_t      tnn_gguf_tensor_ne(tnn_gguf * g, int64_t idx, int dim);
/* key/value metadata by key index i in [0, n_kv). Types are GGUF value type ids (gguf.h enum
 * gguf_type: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 str, 9 array, 10 u64,
 * 11 i64, 12 f64). Every getter checks the handle, the index and the type (an error names the key
 * and both types). Strings are as ggml keeps them: NUL-terminated (text after an embedded NUL,
 * which llama.cpp does not see either, is not returned). */
int64_t      tnn_gguf_n_kv(tnn_gguf * g);
const char * tnn_gguf_key(tnn_gguf * g, int64_t i);
int64_t      tnn_gguf_find_key(tnn_gguf * g, const char * key);     /* -1 when absent (not an error) */
int          tnn_gguf_kv_type(tnn_gguf * g, int64_t i);
int          tnn_gguf_val_i64(tnn_gguf * g, int64_t i, int64_t * out);  /* any int type; u64 > INT64_MAX refused */
int          tnn_gguf_val_u64(tnn_gguf * g, int64_t i, uint64_t * out); /* any int type; negative refused */
int          tnn_gguf_val_f64(tnn_gguf * g, int64_t i, double * out);   /* f32 or f64 */
int          tnn_gguf_val_bool(tnn_gguf * g, int64_t i);                /* 1/0 */
const char * tnn_gguf_val_str(tnn_gguf * g, int64_t i);
int          tnn_gguf_arr_type(tnn_gguf * g, int64_t i);               /* element type of an array */
int64_t      tnn_gguf_arr_n(tnn_gguf * g, int64_t i);
/* a numeric or bool array (bool: one byte 0/1 each) into dst; dst_size must be exactly
 * n * element size; returns the bytes copied */
int64_t      tnn_gguf_arr_copy(tnn_gguf * g, int64_t i, void * dst, int64_t dst_size);
const char * tnn_gguf_arr_str(tnn_gguf * g, int64_t i, int64_t j);     /* element j of a string array */
/* a whole string array in one call: the bytes of all strings back to back into buf (buf_size
 * exactly tnn_gguf_arr_str_nbytes), and n+1 offsets (string j is buf[offsets[j]:offsets[j+1]]) */
int64_t      tnn_gguf_arr_str_nbytes(tnn_gguf * g, int64_t i);
int          tnn_gguf_arr_str_copy(tnn_gguf * g, int64_t i, char * buf, int64_t buf_size, int64_t * offsets,
                                   int64_t n_offsets);
/* ---- training: ggml's autodiff and AdamW (train.c) ----
 * tnn_reset_for_training starts a graph that keeps gradients (else as tnn_reset_for_rebuild);
 * build the forward pass and a scalar loss, then tnn_build_backward(loss): it refuses, naming
 * the op, a graph whose way from a parameter (tnn_set_param) to the loss crosses an op ggml has
 * no backward for (FLASH_ATTN_EXT, CONCAT, GELU, TANH, MUL_MAT_ID, ...). tnn_graph_grad(t) is t's
 * gradient. Gradients accumulate in place in a buffer of their own: tnn_graph_reset_grads before
 * each compute sets them to 0 and the loss's seed to 1 (ggml_graph_reset, but leaving the AdamW
 * moments alone). tnn_opt_step_adamw updates the persistent F32 parameter a (and its persistent
 * moments m, v) in place when the graph runs; params is an F32 [7] input {lr, beta1, beta2, eps,
 * wd, 1/(1-beta1^t), 1/(1-beta2^t)}; add the step to the graph (tnn_add_to_graph). */
int          tnn_reset_for_training(tnn_session * sess);
int          tnn_graph_keeps_grads(tnn_session * sess);                          /* 1 / 0 */
tnn_tensor * tnn_sqr(tnn_session * sess, tnn_tensor * a);
tnn_tensor * tnn_sqrt(tnn_session * sess, tnn_tensor * a);
tnn_tensor * tnn_sum(tnn_session * sess, tnn_tensor * a);                        /* all elements -> [1] */
/* a + b placed at the view of a (strides nb1, nb2, nb3 bytes, byte offset): ggml_acc */
tnn_tensor * tnn_acc(tnn_session * sess, tnn_tensor * a, tnn_tensor * b, int64_t nb1, int64_t nb2, int64_t nb3,
                     int64_t offset);
/* mean over rows of -sum(labels * log_softmax(logits)); both [n_classes, n_rows] F32 */
tnn_tensor * tnn_cross_entropy_loss(tnn_session * sess, tnn_tensor * logits, tnn_tensor * labels);
int          tnn_build_backward(tnn_session * sess, tnn_tensor * loss);
int          tnn_graph_reset_grads(tnn_session * sess);
tnn_tensor * tnn_graph_grad(tnn_session * sess, tnn_tensor * t);
tnn_tensor * tnn_opt_step_adamw(tnn_session * sess, tnn_tensor * a, tnn_tensor * grad, tnn_tensor * m,
                                tnn_tensor * v, tnn_tensor * params);
/* TNN_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* TINYNN_H */
