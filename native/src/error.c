#include "error.h"

#include <stdarg.h>
#include <stdio.h>

const char *innsteer_status_name(innsteer_status status) {
    switch (status) {
        case INNSTEER_OK: return "ok";
        case INNSTEER_ERR_IO: return "io error";
        case INNSTEER_ERR_FORMAT: return "corrupt or truncated file";
        case INNSTEER_ERR_NOT_FLOW: return "not a flow file";
        case INNSTEER_ERR_UNSUPPORTED: return "unsupported flow";
        case INNSTEER_ERR_INVALID: return "invalid flow";
        case INNSTEER_ERR_MISMATCH: return "flow does not fit the model";
        case INNSTEER_ERR_ARG: return "invalid argument";
        case INNSTEER_ERR_NOMEM: return "out of memory";
    }
    return "unknown status";
}

innsteer_status set_error(char *err, size_t err_size, innsteer_status st, const char *fmt, ...) {
    if (err && err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
    }
    return st;
}
