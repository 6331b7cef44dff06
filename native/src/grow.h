/* Growing several parallel arrays to one length at once. A failed realloc leaves that array
 * (and the ones not reached yet) as they were, still owned by the caller, so a caller only
 * records the new capacity after every array has grown. */
#ifndef INNSTEER_GROW_H
#define INNSTEER_GROW_H

#include <stdbool.h>
#include <stdlib.h>

static inline bool grow_arrays(void **const arrays[], size_t count, size_t bytes) {
    for (size_t i = 0; i < count; i++) {
        void *grown = realloc(*arrays[i], bytes);
        if (!grown) return false;
        *arrays[i] = grown;
    }
    return true;
}

#endif
