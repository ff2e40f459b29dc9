/* GGUF files: the header is parsed by ggml's gguf reader; the file itself is
 * mapped once (private, copy-on-write) so weights can point into its pages. */
#include "tinynn_internal.h"

#include "gguf.h"

#include <fcntl.h>
#include <inttypes.h>
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
};

tnn_gguf * tnn_gguf_load(const char * path) {
    const char * fn = "tnn_gguf_load";
    tnn_install_log_hook();
    tnn_clear_error();
    if (path == NULL) {
        tnn_set_error("%s: path is NULL", fn);
        return NULL;
    }
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        tnn_set_error("%s: cannot open '%s'", fn, path);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        close(fd);
        tnn_set_error("%s: '%s' is empty or unreadable", fn, path);
        return NULL;
    }
    struct gguf_init_params params = {/*.no_alloc =*/true, /*.ctx =*/NULL};
    struct gguf_context * ctx = gguf_init_from_file(path, params);
    if (ctx == NULL) {
        close(fd);
        const char * why = tnn_last_ggml_log();
        tnn_set_error("%s: '%s' is not a valid GGUF file%s%s", fn, path, why[0] ? ": " : "", why);
        return NULL;
    }
    /* Writable private pages: a write through the API (e.g. editing a norm
     * gamma to experiment) changes this process's copy, never the file. */
    void * map = mmap(NULL, (size_t) st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        gguf_free(ctx);
        tnn_set_error("%s: mmap of '%s' failed", fn, path);
        return NULL;
    }
    int64_t data_offset = (int64_t) gguf_get_data_offset(ctx);
    /* every tensor's bytes must lie inside the file, or the mapping would be read past its end */
    for (int64_t i = 0; i < gguf_get_n_tensors(ctx); i++) {
        int64_t end = data_offset + (int64_t) gguf_get_tensor_offset(ctx, i) + (int64_t) gguf_get_tensor_size(ctx, i);
        if (end > (int64_t) st.st_size) {
            tnn_set_error("%s: '%s' is truncated: tensor '%s' ends at byte %" PRId64 " but the file has %" PRId64, fn,
                          path, gguf_get_tensor_name(ctx, i), end, (int64_t) st.st_size);
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
    return g;
}

int tnn_gguf_free(tnn_gguf * g) {
    if (g == NULL) {
        tnn_set_error("tnn_gguf_free: handle is NULL");
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
