/* The one way errors are reported inside the library: a status, plus a message naming the
 * offending value where the caller passed a buffer for it. */
#ifndef INNSTEER_ERROR_H
#define INNSTEER_ERROR_H

#include "innsteer.h"

#include <stddef.h>

#if defined(__GNUC__) || defined(__clang__)
#define INNSTEER_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define INNSTEER_PRINTF(fmt, args)
#endif

/* Formats the message into err (when err and err_size are set; truncated to fit) and returns
 * st, so a failure reads `return set_error(err, err_size, INNSTEER_ERR_..., "...", value);`. */
innsteer_status set_error(char *err, size_t err_size, innsteer_status st, const char *fmt, ...) INNSTEER_PRINTF(4, 5);

#endif
