/* Every size cap of the flow reader, in one place. They keep a hostile file from making the
 * library allocate or loop without bound. innsteer_local/choices.py mirrors these values under the
 * same names, so that the C and the Python reader accept and refuse the same files: change them
 * together. (Included as "limits.h" from this folder only; <limits.h> is the C library's.) */
#ifndef INNSTEER_LIMITS_H
#define INNSTEER_LIMITS_H

/* the whole file */
#define MAX_FILE_BYTES ((size_t)1 << 31)

/* GGUF container (gguf_read.c). A flow file has a few dozen keys and tensors. */
#define MAX_KV 4096
#define MAX_TENSORS 4096
#define MAX_STRING 65536 /* any GGUF string, in bytes */
#define MAX_ARRAY 1048576
#define MAX_NESTING 2

/* flow content (flow.c) */
#define MAX_EMBD 65536
#define MAX_LAYERS 100000 /* innsteer.model.n_layer */
#define MAX_SITES 512
#define MAX_OPS 64
#define MAX_MLP_LAYERS 4
#define MAX_WIDTH 65536 /* hidden width of a coupling's conditioner */
/* rows of a subspace basis: orthonormalising it costs rank operations per float of the file */
#define MAX_RANK 256

/* descriptive strings (general.name, innsteer.behavior, innsteer.method, innsteer.model.*), in
 * bytes; innsteer.provenance is bounded by MAX_STRING alone */
#define MAX_META_STRING 4096

#endif
