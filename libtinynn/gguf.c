/* GGUF files: the header is parsed by ggml's gguf reader; the file itself is
 * mapped once (private, copy-on-write) so weights can point into its pages.
 *
 * ggml's reader (gguf.cpp, gguf_init_from_reader) does bounded work on any
 * input: every claimed array length is checked against the bytes left in the
 * file (8 bytes per string element) and against GGUF_MAX_ARRAY_ELEMENTS before
 * anything is allocated, every string length against the bytes left, nested
 * arrays are refused, and each key / tensor record consumes file bytes, so a
 * claimed count larger than the file fails at the first short read. No
 * pre-check is needed here. The getters below only read what it built; ggml's
 * gguf_get_* GGML_ASSERT on a wrong type or index, so each one checks first.
 *
 * Handles are checked against a registry of live ones (a freed handle is never read
 * through), and a mapping a live session's weights point into is not unmapped: its
 * tnn_gguf_free is refused until the session is freed. */
#include "tinynn_internal.h"

#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

const char * tnn_last_ggml_log(void);

struct tnn_gguf {
    struct gguf_context * ctx;
    void * map;
    int64_t map_size;
    int64_t data_offset;
    struct tnn_gguf * next_live;
};

/* Registry of live handles (as validate.c's of sessions): a freed or made-up handle is refused
 * by looking it up here, never by reading through it. */
static tnn_gguf * g_live_ggufs = NULL;
static pthread_mutex_t g_live_lock = PTHREAD_MUTEX_INITIALIZER;

static void live_add(tnn_gguf * g) {
    pthread_mutex_lock(&g_live_lock);
    g->next_live = g_live_ggufs;
    g_live_ggufs = g;
    pthread_mutex_unlock(&g_live_lock);
}

static bool is_live(const tnn_gguf * g) {
    pthread_mutex_lock(&g_live_lock);
    const tnn_gguf * p = g_live_ggufs;
    while (p != NULL && p != g) p = p->next_live;
    pthread_mutex_unlock(&g_live_lock);
    return p != NULL;
}

/* unlink g; false when it was not live */
static bool live_remove(tnn_gguf * g) {
    bool found = false;
    pthread_mutex_lock(&g_live_lock);
    for (tnn_gguf ** pp = &g_live_ggufs; *pp; pp = &(*pp)->next_live) {
        if (*pp == g) {
            *pp = g->next_live;
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&g_live_lock);
    return found;
}

tnn_gguf * tnn_gguf_load(const char * path) {
    const char * fn = "tnn_gguf_load";
    tnn_install_log_hook();
    tnn_clear_error();
    if (path == NULL) {
        tnn_set_error("%s: path is NULL", fn);
        return NULL;
    }
    /* O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below);
     * for a regular file the flag changes nothing */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        tnn_set_error("%s: cannot open '%s': %s", fn, path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        tnn_set_error("%s: cannot stat '%s': %s", fn, path, strerror(errno));
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        tnn_set_error("%s: '%s' is not a regular file (%s)", fn, path,
                      S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket");
        return NULL;
    }
    if (st.st_size <= 0) {
        close(fd);
        tnn_set_error("%s: '%s' is empty", fn, path);
        return NULL;
    }
    /* Writable private pages: a write through the API (e.g. editing a norm
     * gamma to experiment) changes this process's copy, never the file. */
    void * map = mmap(NULL, (size_t) st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        tnn_set_error("%s: mmap of '%s' failed: %s", fn, path, strerror(errno));
        return NULL;
    }
    /* parse the very bytes that were mapped (the file opened and checked above, not the path
     * again); ggml's buffer reader never reads past map_size */
    struct gguf_init_params params = {/*.no_alloc =*/true, /*.ctx =*/NULL};
    struct gguf_context * ctx = gguf_init_from_buffer(map, (size_t) st.st_size, params);
    if (ctx == NULL) {
        munmap(map, (size_t) st.st_size);
        const char * why = tnn_last_ggml_log();
        tnn_set_error("%s: '%s' is not a valid GGUF file%s%s", fn, path, why[0] ? ": " : "", why);
        return NULL;
    }
    int64_t data_offset = (int64_t) gguf_get_data_offset(ctx);
    /* every tensor's bytes must lie inside the file, or the mapping would be read past its end */
    /* (unsigned, without overflow: a crafted size near SIZE_MAX must not wrap the check) */
    const uint64_t fsize = (uint64_t) st.st_size;
    for (int64_t i = 0; i < gguf_get_n_tensors(ctx); i++) {
        const uint64_t off = (uint64_t) gguf_get_tensor_offset(ctx, i), size = (uint64_t) gguf_get_tensor_size(ctx, i);
        if ((uint64_t) data_offset > fsize || off > fsize - (uint64_t) data_offset ||
            size > fsize - (uint64_t) data_offset - off) {
            tnn_set_error("%s: '%s' is truncated: tensor '%s' (%" PRIu64 " bytes at data offset %" PRIu64
                          ") ends past the end of the file (%" PRIu64 " bytes, data from byte %" PRId64 ")", fn,
                          path, gguf_get_tensor_name(ctx, i), size, off, fsize, data_offset);
            munmap(map, (size_t) st.st_size);
            gguf_free(ctx);
            return NULL;
        }
    }
    tnn_gguf * g = (tnn_gguf *) calloc(1, sizeof(*g));
    if (!g) {
        munmap(map, (size_t) st.st_size);
        gguf_free(ctx);
        tnn_set_error("%s: out of memory", fn);
        return NULL;
    }
    g->ctx = ctx;
    g->map = map;
    g->map_size = (int64_t) st.st_size;
    g->data_offset = data_offset;
    live_add(g);
    return g;
}

int tnn_gguf_free(tnn_gguf * g) {
    if (g == NULL) {
        tnn_set_error("tnn_gguf_free: handle is NULL");
        return -1;
    }
    if (!is_live(g)) {
        tnn_set_error("tnn_gguf_free: %p is not a live gguf handle (freed twice, or never loaded)", (void *) g);
        return -1;
    }
    /* A session whose weights point into the mapping would read unmapped pages at its next
     * compute: refuse, and keep the handle live (free the session first, as Engine.close does). */
    const tnn_session * user = tnn_session_mapping_in(g->map, g->map_size);
    if (user != NULL) {
        tnn_set_error("tnn_gguf_free: live session %p still has weights in this file's mapping; free the session "
                      "(tnn_session_free) before the gguf handle", (const void *) user);
        return -1;
    }
    if (!live_remove(g)) {   /* freed by another thread meanwhile */
        tnn_set_error("tnn_gguf_free: %p is not a live gguf handle (freed twice, or never loaded)", (void *) g);
        return -1;
    }
    munmap(g->map, (size_t) g->map_size);
    gguf_free(g->ctx);
    free(g);
    return 0;
}

static bool check_g(const tnn_gguf * g, const char * fn) {
    if (g == NULL) {
        tnn_set_error("%s: gguf handle is NULL", fn);
        return false;
    }
    if (!is_live(g)) {
        tnn_set_error("%s: %p is not a live gguf handle (already freed, or never loaded)", fn, (const void *) g);
        return false;
    }
    return true;
}

static bool check_idx(const tnn_gguf * g, int64_t idx, const char * fn) {
    if (!check_g(g, fn)) return false;
    if (idx < 0 || idx >= gguf_get_n_tensors(g->ctx)) {
        tnn_set_error("%s: tensor index %" PRId64 " out of range (file has %" PRId64 " tensors; -1 means not found)",
                      fn, idx, (int64_t) gguf_get_n_tensors(g->ctx));
        return false;
    }
    return true;
}

int64_t tnn_gguf_find_index(tnn_gguf * g, const char * name) {
    if (!check_g(g, "tnn_gguf_find_index")) return -2;
    if (name == NULL) {
        tnn_set_error("tnn_gguf_find_index: name is NULL");
        return -2;
    }
    return gguf_find_tensor(g->ctx, name);
}

int64_t tnn_gguf_n_tensors(tnn_gguf * g) {
    if (!check_g(g, "tnn_gguf_n_tensors")) return -1;
    return gguf_get_n_tensors(g->ctx);
}

const char * tnn_gguf_tensor_name(tnn_gguf * g, int64_t idx) {
    if (!check_idx(g, idx, "tnn_gguf_tensor_name")) return NULL;
    return gguf_get_tensor_name(g->ctx, idx);
}

int64_t tnn_gguf_tensor_file_offset(tnn_gguf * g, int64_t idx) {
    if (!check_idx(g, idx, "tnn_gguf_tensor_file_offset")) return -1;
    return g->data_offset + (int64_t) gguf_get_tensor_offset(g->ctx, idx);
}

int tnn_gguf_tensor_type(tnn_gguf * g, int64_t idx) {
    if (!check_idx(g, idx, "tnn_gguf_tensor_type")) return -1;
    return (int) gguf_get_tensor_type(g->ctx, idx);
}

int64_t tnn_gguf_tensor_nbytes(tnn_gguf * g, int64_t idx) {
    if (!check_idx(g, idx, "tnn_gguf_tensor_nbytes")) return -1;
    return (int64_t) gguf_get_tensor_size(g->ctx, idx);
}

int tnn_gguf_get_bool(tnn_gguf * g, const char * key) {
    if (!check_g(g, "tnn_gguf_get_bool")) return -2;
    if (key == NULL) {
        tnn_set_error("tnn_gguf_get_bool: key is NULL");
        return -2;
    }
    int64_t k = gguf_find_key(g->ctx, key);
    if (k < 0 || gguf_get_kv_type(g->ctx, k) != GGUF_TYPE_BOOL) return -1;
    return gguf_get_val_bool(g->ctx, k) ? 1 : 0;
}

void * tnn_gguf_mmap_base(tnn_gguf * g) {
    if (!check_g(g, "tnn_gguf_mmap_base")) return NULL;
    return g->map;
}

int64_t tnn_gguf_mmap_size(tnn_gguf * g) {
    if (!check_g(g, "tnn_gguf_mmap_size")) return -1;
    return g->map_size;
}

/* ---- key/value metadata (read from the gguf_context ggml built at load) ---- */

static const char * kv_type_name(int t) {
    const char * s = (t >= 0 && t < GGUF_TYPE_COUNT) ? gguf_type_name((enum gguf_type) t) : NULL;
    return s ? s : "?";
}

/* bytes of one element of a numeric GGUF type (0 for str/array/unknown), as gguf.cpp's GGUF_TYPE_SIZE */
static size_t kv_type_size(int t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
        default: return 0;
    }
}

static bool check_kv(const tnn_gguf * g, int64_t i, const char * fn) {
    if (!check_g(g, fn)) return false;
    if (i < 0 || i >= gguf_get_n_kv(g->ctx)) {
        tnn_set_error("%s: key index %" PRId64 " out of range (file has %" PRId64 " keys; -1 means not found)", fn, i,
                      (int64_t) gguf_get_n_kv(g->ctx));
        return false;
    }
    return true;
}

static bool check_out(const void * out, const char * fn) {
    if (out == NULL) {
        tnn_set_error("%s: out is NULL", fn);
        return false;
    }
    return true;
}

/* a scalar (not an array) of one of the wanted types? else an error naming key and types */
static bool check_scalar(const tnn_gguf * g, int64_t i, const char * fn, const char * want, bool (*ok)(int)) {
    if (!check_kv(g, i, fn)) return false;
    int t = (int) gguf_get_kv_type(g->ctx, i);
    if (!ok(t)) {
        tnn_set_error("%s: key '%s' has type %s, not %s", fn, gguf_get_key(g->ctx, i),
                      t == GGUF_TYPE_ARRAY ? "array" : kv_type_name(t), want);
        return false;
    }
    return true;
}

static bool is_int_type(int t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}
static bool is_float_type(int t) { return t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64; }
static bool is_bool_type(int t) { return t == GGUF_TYPE_BOOL; }
static bool is_str_type(int t) { return t == GGUF_TYPE_STRING; }
static bool is_array_type(int t) { return t == GGUF_TYPE_ARRAY; }

int64_t tnn_gguf_n_kv(tnn_gguf * g) {
    if (!check_g(g, "tnn_gguf_n_kv")) return -1;
    return gguf_get_n_kv(g->ctx);
}

const char * tnn_gguf_key(tnn_gguf * g, int64_t i) {
    if (!check_kv(g, i, "tnn_gguf_key")) return NULL;
    return gguf_get_key(g->ctx, i);
}

int64_t tnn_gguf_find_key(tnn_gguf * g, const char * key) {
    if (!check_g(g, "tnn_gguf_find_key")) return -2;
    if (key == NULL) {
        tnn_set_error("tnn_gguf_find_key: key is NULL");
        return -2;
    }
    return gguf_find_key(g->ctx, key);
}

int tnn_gguf_kv_type(tnn_gguf * g, int64_t i) {
    if (!check_kv(g, i, "tnn_gguf_kv_type")) return -1;
    return (int) gguf_get_kv_type(g->ctx, i);
}

/* any integer type, widened; a uint64 above INT64_MAX is refused (read it with tnn_gguf_val_u64) */
int tnn_gguf_val_i64(tnn_gguf * g, int64_t i, int64_t * out) {
    const char * fn = "tnn_gguf_val_i64";
    if (!check_out(out, fn) || !check_scalar(g, i, fn, "an integer", is_int_type)) return -1;
    switch ((int) gguf_get_kv_type(g->ctx, i)) {
        case GGUF_TYPE_UINT8:  *out = gguf_get_val_u8(g->ctx, i); break;
        case GGUF_TYPE_INT8:   *out = gguf_get_val_i8(g->ctx, i); break;
        case GGUF_TYPE_UINT16: *out = gguf_get_val_u16(g->ctx, i); break;
        case GGUF_TYPE_INT16:  *out = gguf_get_val_i16(g->ctx, i); break;
        case GGUF_TYPE_UINT32: *out = gguf_get_val_u32(g->ctx, i); break;
        case GGUF_TYPE_INT32:  *out = gguf_get_val_i32(g->ctx, i); break;
        case GGUF_TYPE_INT64:  *out = gguf_get_val_i64(g->ctx, i); break;
        case GGUF_TYPE_UINT64: {
            uint64_t v = gguf_get_val_u64(g->ctx, i);
            if (v > (uint64_t) INT64_MAX) {
                tnn_set_error("%s: key '%s' = %" PRIu64 " does not fit int64 (read it with tnn_gguf_val_u64)", fn,
                              gguf_get_key(g->ctx, i), v);
                return -1;
            }
            *out = (int64_t) v;
            break;
        }
        default: return -1; /* unreachable: checked above */
    }
    return 0;
}

/* any integer type with a non-negative value, widened */
int tnn_gguf_val_u64(tnn_gguf * g, int64_t i, uint64_t * out) {
    const char * fn = "tnn_gguf_val_u64";
    if (!check_out(out, fn) || !check_scalar(g, i, fn, "an integer", is_int_type)) return -1;
    int64_t s = 0;
    switch ((int) gguf_get_kv_type(g->ctx, i)) {
        case GGUF_TYPE_UINT64: *out = gguf_get_val_u64(g->ctx, i); return 0;
        case GGUF_TYPE_UINT8:  *out = gguf_get_val_u8(g->ctx, i); return 0;
        case GGUF_TYPE_UINT16: *out = gguf_get_val_u16(g->ctx, i); return 0;
        case GGUF_TYPE_UINT32: *out = gguf_get_val_u32(g->ctx, i); return 0;
        case GGUF_TYPE_INT8:   s = gguf_get_val_i8(g->ctx, i); break;
        case GGUF_TYPE_INT16:  s = gguf_get_val_i16(g->ctx, i); break;
        case GGUF_TYPE_INT32:  s = gguf_get_val_i32(g->ctx, i); break;
        case GGUF_TYPE_INT64:  s = gguf_get_val_i64(g->ctx, i); break;
        default: return -1;
    }
    if (s < 0) {
        tnn_set_error("%s: key '%s' = %" PRId64 " is negative", fn, gguf_get_key(g->ctx, i), s);
        return -1;
    }
    *out = (uint64_t) s;
    return 0;
}

/* f32 or f64, as double (exact for both) */
int tnn_gguf_val_f64(tnn_gguf * g, int64_t i, double * out) {
    const char * fn = "tnn_gguf_val_f64";
    if (!check_out(out, fn) || !check_scalar(g, i, fn, "a float (f32 or f64)", is_float_type)) return -1;
    *out = gguf_get_kv_type(g->ctx, i) == GGUF_TYPE_FLOAT32 ? (double) gguf_get_val_f32(g->ctx, i)
                                                             : gguf_get_val_f64(g->ctx, i);
    return 0;
}

int tnn_gguf_val_bool(tnn_gguf * g, int64_t i) {
    if (!check_scalar(g, i, "tnn_gguf_val_bool", "bool", is_bool_type)) return -1;
    return gguf_get_val_bool(g->ctx, i) ? 1 : 0;
}

const char * tnn_gguf_val_str(tnn_gguf * g, int64_t i) {
    if (!check_scalar(g, i, "tnn_gguf_val_str", "str", is_str_type)) return NULL;
    return gguf_get_val_str(g->ctx, i);
}

int tnn_gguf_arr_type(tnn_gguf * g, int64_t i) {
    if (!check_scalar(g, i, "tnn_gguf_arr_type", "array", is_array_type)) return -1;
    return (int) gguf_get_arr_type(g->ctx, i);
}

int64_t tnn_gguf_arr_n(tnn_gguf * g, int64_t i) {
    if (!check_scalar(g, i, "tnn_gguf_arr_n", "array", is_array_type)) return -1;
    return (int64_t) gguf_get_arr_n(g->ctx, i);
}

/* a numeric (or bool: one byte 0/1 each) array's elements, little-endian as in the file */
int64_t tnn_gguf_arr_copy(tnn_gguf * g, int64_t i, void * dst, int64_t dst_size) {
    const char * fn = "tnn_gguf_arr_copy";
    if (!check_scalar(g, i, fn, "array", is_array_type)) return -1;
    int et = (int) gguf_get_arr_type(g->ctx, i);
    size_t esize = kv_type_size(et);
    if (et == GGUF_TYPE_STRING || esize == 0) {
        tnn_set_error("%s: key '%s' is an array of %s, not of numbers (read strings with tnn_gguf_arr_str / "
                      "tnn_gguf_arr_str_copy)", fn, gguf_get_key(g->ctx, i), kv_type_name(et));
        return -1;
    }
    int64_t nbytes = (int64_t) (gguf_get_arr_n(g->ctx, i) * esize);
    if (dst_size != nbytes) {
        tnn_set_error("%s: key '%s' holds %" PRId64 " bytes (%zu x %s) but the buffer has %" PRId64, fn,
                      gguf_get_key(g->ctx, i), nbytes, (size_t) gguf_get_arr_n(g->ctx, i), kv_type_name(et), dst_size);
        return -1;
    }
    if (nbytes > 0) {
        if (dst == NULL) {
            tnn_set_error("%s: dst is NULL", fn);
            return -1;
        }
        memcpy(dst, gguf_get_arr_data(g->ctx, i), (size_t) nbytes);
    }
    return nbytes;
}

static bool check_str_arr(const tnn_gguf * g, int64_t i, const char * fn) {
    if (!check_scalar(g, i, fn, "array", is_array_type)) return false;
    int et = (int) gguf_get_arr_type(g->ctx, i);
    if (et != GGUF_TYPE_STRING) {
        tnn_set_error("%s: key '%s' is an array of %s, not of str", fn, gguf_get_key(g->ctx, i), kv_type_name(et));
        return false;
    }
    return true;
}

const char * tnn_gguf_arr_str(tnn_gguf * g, int64_t i, int64_t j) {
    const char * fn = "tnn_gguf_arr_str";
    if (!check_str_arr(g, i, fn)) return NULL;
    int64_t n = (int64_t) gguf_get_arr_n(g->ctx, i);
    if (j < 0 || j >= n) {
        tnn_set_error("%s: element %" PRId64 " of key '%s' out of range (it has %" PRId64 ")", fn, j,
                      gguf_get_key(g->ctx, i), n);
        return NULL;
    }
    return gguf_get_arr_str(g->ctx, i, (size_t) j);
}

/* bytes of all the strings of a string array together (no terminators) */
int64_t tnn_gguf_arr_str_nbytes(tnn_gguf * g, int64_t i) {
    if (!check_str_arr(g, i, "tnn_gguf_arr_str_nbytes")) return -1;
    int64_t total = 0;
    int64_t n = (int64_t) gguf_get_arr_n(g->ctx, i);
    for (int64_t j = 0; j < n; j++) total += (int64_t) strlen(gguf_get_arr_str(g->ctx, i, (size_t) j));
    return total;
}

/* all strings of a string array in one call: their bytes back to back into buf (exactly
 * tnn_gguf_arr_str_nbytes), and n+1 offsets (string j is buf[offsets[j] : offsets[j+1]]) */
int tnn_gguf_arr_str_copy(tnn_gguf * g, int64_t i, char * buf, int64_t buf_size, int64_t * offsets, int64_t n_offsets) {
    const char * fn = "tnn_gguf_arr_str_copy";
    if (!check_str_arr(g, i, fn)) return -1;
    int64_t n = (int64_t) gguf_get_arr_n(g->ctx, i);
    if (offsets == NULL || n_offsets != n + 1) {
        tnn_set_error("%s: key '%s' has %" PRId64 " strings: offsets must have %" PRId64 " entries, got %" PRId64 "%s",
                      fn, gguf_get_key(g->ctx, i), n, n + 1, n_offsets, offsets == NULL ? " (NULL)" : "");
        return -1;
    }
    if (buf_size < 0 || (buf_size > 0 && buf == NULL)) {
        tnn_set_error("%s: buf is NULL or buf_size %" PRId64 " is negative", fn, buf_size);
        return -1;
    }
    int64_t pos = 0;
    for (int64_t j = 0; j < n; j++) {
        const char * s = gguf_get_arr_str(g->ctx, i, (size_t) j);
        int64_t len = (int64_t) strlen(s);
        if (len > buf_size - pos) {
            tnn_set_error("%s: key '%s': buffer of %" PRId64 " bytes too small (see tnn_gguf_arr_str_nbytes)", fn,
                          gguf_get_key(g->ctx, i), buf_size);
            return -1;
        }
        offsets[j] = pos;
        memcpy(buf + pos, s, (size_t) len);
        pos += len;
    }
    offsets[n] = pos;
    if (pos != buf_size) {
        tnn_set_error("%s: key '%s' holds %" PRId64 " bytes but the buffer has %" PRId64, fn, gguf_get_key(g->ctx, i),
                      pos, buf_size);
        return -1;
    }
    return 0;
}

/* ---- tensor table: shape ---- */

/* dimensions as ggml_n_dims counts them (trailing 1s not counted; at least 1) */
int tnn_gguf_tensor_ndim(tnn_gguf * g, int64_t idx) {
    if (!check_idx(g, idx, "tnn_gguf_tensor_ndim")) return -1;
    const int64_t * ne = gguf_get_tensor_ne(g->ctx, idx);
    int nd = GGML_MAX_DIMS;
    while (nd > 1 && ne[nd - 1] == 1) nd--;
    return nd;
}

int64_t tnn_gguf_tensor_ne(tnn_gguf * g, int64_t idx, int dim) {
    if (!check_idx(g, idx, "tnn_gguf_tensor_ne")) return -1;
    if (dim < 0 || dim >= GGML_MAX_DIMS) {
        tnn_set_error("tnn_gguf_tensor_ne: dim %d out of range [0, %d)", dim, GGML_MAX_DIMS);
        return -1;
    }
    return gguf_get_tensor_ne(g->ctx, idx)[dim];
}

int tnn_gguf_version(tnn_gguf * g) {
    if (!check_g(g, "tnn_gguf_version")) return -1;
    return (int) gguf_get_version(g->ctx);
}
