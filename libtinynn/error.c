/* Error reporting: a per-thread message for the last failed call, plus a ggml
 * log hook so ggml's own complaints (e.g. a malformed GGUF) reach Python
 * instead of only stderr. */
#include "tinynn_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char g_last_error[1024];
static _Thread_local char g_last_log[1024];

void tnn_set_error(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
    va_end(ap);
}

const char * tnn_last_error(void) { return g_last_error; }

void tnn_clear_error(void) {
    g_last_error[0] = '\0';
    g_last_log[0] = '\0';
}

/* The warning/error lines ggml logged on this thread since the last tnn_clear_error, joined
 * with "; " (the first is the specific one: a failed GGUF parse logs what was wrong, then that
 * reading the section failed). */
const char * tnn_last_ggml_log(void);
const char * tnn_last_ggml_log(void) { return g_last_log; }

static void tnn_log_hook(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        size_t n = strlen(g_last_log);
        if (n + 3 < sizeof(g_last_log)) {
            snprintf(g_last_log + n, sizeof(g_last_log) - n, "%s%s", n ? "; " : "", text);
        }
        n = strlen(g_last_log);
        while (n > 0 && (g_last_log[n - 1] == '\n' || g_last_log[n - 1] == '\r')) g_last_log[--n] = '\0';
        if (getenv("TNN_VERBOSE")) fputs(text, stderr);
    } else if (level == GGML_LOG_LEVEL_CONT) {
        if (getenv("TNN_VERBOSE")) fputs(text, stderr);
    }
}

void tnn_install_log_hook(void) {
    static int installed = 0;
    if (!installed) {
        ggml_log_set(tnn_log_hook, NULL);
        installed = 1;
    }
}

void * tnn_null_ptr(void) { return NULL; }
