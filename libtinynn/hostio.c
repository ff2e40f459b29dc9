/* Host I/O and type helpers: whole-tensor uploads/downloads in one call (no
 * per-element FFI), row sizes, and ggml's own quantizer. */
#include "tinynn_internal.h"

#include <inttypes.h>
#include <string.h>

/* ------------------------------------------------------------------ types */

int64_t tnn_row_size(int type, int64_t n) {
    if (!tnn_check_type(type, "tnn_row_size")) return -1;
    int64_t bs = ggml_blck_size((enum ggml_type) type);
    if (n < 0 || n % bs != 0) {
        tnn_set_error("tnn_row_size: %" PRId64 " elements is not a whole number of %s blocks (%" PRId64 ")", n,
                      ggml_type_name((enum ggml_type) type), bs);
        return -1;
    }
    int64_t bytes = 0;
    if (!tnn_add_mul_ok(&bytes, (int64_t) ggml_type_size((enum ggml_type) type), n / bs)) {
        tnn_set_error("tnn_row_size: %" PRId64 " elements of %s overflow a 64-bit byte count", n,
                      ggml_type_name((enum ggml_type) type));
        return -1;
    }
    return bytes;
}

int tnn_type_block_size(int type) {
    if (!tnn_check_type(type, "tnn_type_block_size")) return -1;
    return (int) ggml_blck_size((enum ggml_type) type);
}

const char * tnn_type_name(int type) {
    if (type < 0 || type >= GGML_TYPE_COUNT) return "";
    const char * n = ggml_type_name((enum ggml_type) type);
    return n ? n : "";
}

int tnn_type_count(void) { return GGML_TYPE_COUNT; }

int64_t tnn_quantize(int type, const float * src, void * dst, int64_t nrows, int64_t n_per_row, int64_t dst_size) {
    const char * fn = "tnn_quantize";
    if (!tnn_check_type(type, fn)) return -1;
    if (src == NULL || dst == NULL) {
        tnn_set_error("%s: src or dst is NULL", fn);
        return -1;
    }
    if (nrows <= 0 || n_per_row <= 0) {
        tnn_set_error("%s: nrows and n_per_row must be positive", fn);
        return -1;
    }
    if (ggml_quantize_requires_imatrix((enum ggml_type) type)) {
        tnn_set_error("%s: type %s needs an importance matrix", fn, ggml_type_name((enum ggml_type) type));
        return -1;
    }
    int64_t rs = tnn_row_size(type, n_per_row);
    if (rs < 0) return -1;
    int64_t need = 0;
    if (!tnn_add_mul_ok(&need, rs, nrows)) {
        tnn_set_error("%s: %" PRId64 " rows of %" PRId64 " bytes overflow a 64-bit byte count", fn, nrows, rs);
        return -1;
    }
    if (need > dst_size) {
        tnn_set_error("%s: dst holds %" PRId64 " bytes, need %" PRId64, fn, dst_size, need);
        return -1;
    }
    enum ggml_type t = (enum ggml_type) type;
    /* Q8_1 and Q8_K are activation-only: ggml_quantize_chunk has no case for them and aborts */
    if ((!ggml_is_quantized(t) && t != GGML_TYPE_F16 && t != GGML_TYPE_BF16 && t != GGML_TYPE_F32) ||
        t == GGML_TYPE_Q8_1 || t == GGML_TYPE_Q8_K) {
        tnn_set_error("%s: cannot quantize to %s", fn, ggml_type_name(t));
        return -1;
    }
    return (int64_t) ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, NULL);
}

int tnn_dequantize(int type, const void * src, float * dst, int64_t n, int64_t src_size) {
    const char * fn = "tnn_dequantize";
    if (!tnn_check_type(type, fn)) return -1;
    if (src == NULL || dst == NULL) {
        tnn_set_error("%s: src or dst is NULL", fn);
        return -1;
    }
    int64_t rs = tnn_row_size(type, n);
    if (rs < 0) return -1;
    if (rs > src_size) {
        tnn_set_error("%s: src holds %" PRId64 " bytes, need %" PRId64, fn, src_size, rs);
        return -1;
    }
    const struct ggml_type_traits * tr = ggml_get_type_traits((enum ggml_type) type);
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, (size_t) n * sizeof(float));
        return 0;
    }
    if (tr->to_float == NULL) {
        tnn_set_error("%s: no dequantizer for %s", fn, tr->type_name);
        return -1;
    }
    tr->to_float(src, dst, n);
    return 0;
}

/* ------------------------------------------------------------------ tensor info */

int tnn_tensor_is_contiguous(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_is_contiguous", "t")) return -1;
    return ggml_is_contiguous(t) ? 1 : 0;
}

int tnn_tensor_ndim(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_ndim", "t")) return -1;
    return ggml_n_dims(t);
}

int64_t tnn_tensor_ne(tnn_tensor * t, int dim) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_ne", "t")) return -1;
    if (dim < 0 || dim >= GGML_MAX_DIMS) {
        tnn_set_error("tnn_tensor_ne: dim %d out of range 0..%d", dim, GGML_MAX_DIMS - 1);
        return -1;
    }
    return t->ne[dim];
}

int64_t tnn_tensor_nb(tnn_tensor * t, int dim) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_nb", "t")) return -1;
    if (dim < 0 || dim >= GGML_MAX_DIMS) {
        tnn_set_error("tnn_tensor_nb: dim %d out of range 0..%d", dim, GGML_MAX_DIMS - 1);
        return -1;
    }
    return (int64_t) t->nb[dim];
}

int tnn_tensor_type(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_type", "t")) return -1;
    return (int) t->type;
}

int64_t tnn_tensor_nbytes(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_nbytes", "t")) return -1;
    return (int64_t) ggml_nbytes(t);
}

int tnn_tensor_is_allocated(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_is_allocated", "t")) return -1;
    return (t->data != NULL && (t->buffer != NULL || (t->view_src && t->view_src->buffer))) ? 1 : 0;
}

const char * tnn_tensor_name(tnn_tensor * t) {
    if (!tnn_check_tensor(NULL, t, "tnn_tensor_name", "t")) return NULL;
    return t->name;
}

/* ------------------------------------------------------------------ host I/O */

static bool check_io(tnn_session * sess, tnn_tensor * t, const void * data, int64_t nbytes, const char * fn) {
    if (!tnn_check_session(sess, fn) || !tnn_check_weight(sess, t, fn, "t")) return false;
    if (data == NULL) {
        tnn_set_error("%s: host buffer is NULL", fn);
        return false;
    }
    if (tnn_tensor_is_allocated(t) != 1) {
        tnn_set_error("%s: tensor '%s' has no memory yet (persistent: call tnn_finalize_weights; compute: it "
                      "must be part of a realized graph)", fn, t->name);
        return false;
    }
    if (!ggml_is_contiguous(t)) {
        tnn_set_error("%s: tensor '%s' is not contiguous", fn, t->name);
        return false;
    }
    if (nbytes != (int64_t) ggml_nbytes(t)) {
        char sh[128];
        tnn_shape_str(t, sh, sizeof sh);
        tnn_set_error("%s: host buffer is %" PRId64 " bytes but tensor '%s' %s is %zu bytes", fn, nbytes, t->name, sh,
                      ggml_nbytes(t));
        return false;
    }
    return true;
}

/* repacked weights are stored interleaved for the CPU kernels; ggml cannot convert them back */
static bool reject_repacked_read(tnn_session * sess, tnn_tensor * t, const char * fn) {
    if (t != NULL && tnn_check_session(sess, fn) && tnn_tensor_is_repacked(sess, t) == 1) {
        tnn_set_error("%s: tensor '%s' is repacked for ggml's CPU kernels and cannot be read back "
                      "(load with weight repacking off to read weights)", fn, t->name);
        return true;
    }
    return false;
}

static bool check_io_type(tnn_tensor * t, enum ggml_type want, const char * fn) {
    if (t != NULL && t->type != want) {
        tnn_set_error("%s: tensor '%s' is %s, not %s", fn, t->name, ggml_type_name(t->type), ggml_type_name(want));
        return false;
    }
    return true;
}

int tnn_tensor_set_raw(tnn_session * sess, tnn_tensor * t, const void * data, int64_t nbytes) {
    if (!check_io(sess, t, data, nbytes, "tnn_tensor_set_raw")) return -1;
    ggml_backend_tensor_set(t, data, 0, (size_t) nbytes);
    return 0;
}

int tnn_tensor_get_raw(tnn_session * sess, tnn_tensor * t, void * out, int64_t nbytes) {
    if (reject_repacked_read(sess, t, "tnn_tensor_get_raw")) return -1;
    if (!check_io(sess, t, out, nbytes, "tnn_tensor_get_raw")) return -1;
    ggml_backend_tensor_get(t, out, 0, (size_t) nbytes);
    return 0;
}

int tnn_tensor_set_f32(tnn_session * sess, tnn_tensor * t, const float * data, int64_t n) {
    if (!check_io_type(t, GGML_TYPE_F32, "tnn_tensor_set_f32")) return -1;
    if (!check_io(sess, t, data, n * 4, "tnn_tensor_set_f32")) return -1;
    ggml_backend_tensor_set(t, data, 0, (size_t) n * 4);
    return 0;
}

int tnn_tensor_set_i32(tnn_session * sess, tnn_tensor * t, const int32_t * data, int64_t n) {
    if (!check_io_type(t, GGML_TYPE_I32, "tnn_tensor_set_i32")) return -1;
    if (!check_io(sess, t, data, n * 4, "tnn_tensor_set_i32")) return -1;
    ggml_backend_tensor_set(t, data, 0, (size_t) n * 4);
    return 0;
}

int tnn_tensor_get_f32(tnn_session * sess, tnn_tensor * t, float * out, int64_t n) {
    if (reject_repacked_read(sess, t, "tnn_tensor_get_f32")) return -1;
    if (!check_io_type(t, GGML_TYPE_F32, "tnn_tensor_get_f32")) return -1;
    if (!check_io(sess, t, out, n * 4, "tnn_tensor_get_f32")) return -1;
    ggml_backend_tensor_get(t, out, 0, (size_t) n * 4);
    return 0;
}

int tnn_tensor_get_i32(tnn_session * sess, tnn_tensor * t, int32_t * out, int64_t n) {
    if (reject_repacked_read(sess, t, "tnn_tensor_get_i32")) return -1;
    if (!check_io_type(t, GGML_TYPE_I32, "tnn_tensor_get_i32")) return -1;
    if (!check_io(sess, t, out, n * 4, "tnn_tensor_get_i32")) return -1;
    ggml_backend_tensor_get(t, out, 0, (size_t) n * 4);
    return 0;
}

int tnn_upload_from_float_array(tnn_session * sess, tnn_tensor * t, const float * data, int64_t n) {
    return tnn_tensor_set_f32(sess, t, data, n);
}
