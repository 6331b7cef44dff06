/*
 * innsteer: nonlinear activation steering for llama.cpp.
 *
 * A flow file (GGUF, see docs/flow-format.md) holds, for one or more layers, an invertible map
 * phi and a latent shift delta. Steering replaces every token row h of the layer output
 * `l_out-<layer>` by
 *
 *     h' = phi^-1( phi(h) + a * (delta + edit_scale * phi(h)) )
 *
 * (edit_scale is zero except for per-dimension affine transport flows), computed in
 * llama.cpp's scheduler eval callback. A flow's layer L is the layer where llama.cpp applies
 * a control vector's `direction.L`, so both number layers alike.
 *
 * Usage from C, next to llama.cpp:
 *
 *     innsteer_flow *flow; char err[256];
 *     if (innsteer_flow_load("honesty.gguf", &flow, err, sizeof err) != INNSTEER_OK) { ...err... }
 *     innsteer_steerer *st = innsteer_steerer_new(llama_model_n_embd(model), llama_model_n_layer(model), 512);
 *     int id; innsteer_steerer_attach(st, flow, 4.0f, &id, err, sizeof err);
 *     cparams.cb_eval = innsteer_eval_callback; cparams.cb_eval_user_data = st;
 *     ... llama_init_from_model(model, cparams) ... llama_decode(...) ...
 *     innsteer_steerer_set_strength(st, id, 2.0f);   // takes effect at the next callback
 *
 * All functions return a status instead of aborting; where an `err` buffer is given it receives
 * a message naming the offending value. The library links no ggml library: the ggml functions it
 * calls resolve against the ggml already loaded in the process (llama.cpp's). Functions for tests
 * and tools (the flow's maps on host rows) are in innsteer_tools.h.
 */
#ifndef INNSTEER_H
#define INNSTEER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INNSTEER_API __attribute__((visibility("default")))

#define INNSTEER_FORMAT_VERSION 1

typedef enum {
    INNSTEER_OK = 0,
    INNSTEER_ERR_IO = 1,          /* file missing or unreadable */
    INNSTEER_ERR_FORMAT = 2,      /* not a GGUF file, truncated or corrupted */
    INNSTEER_ERR_NOT_FLOW = 3,    /* a valid GGUF file that is not an innsteer flow */
    INNSTEER_ERR_UNSUPPORTED = 4, /* newer format version or unknown op kind */
    INNSTEER_ERR_INVALID = 5,     /* flow content fails validation (non-finite, not invertible, ...) */
    INNSTEER_ERR_MISMATCH = 6,    /* flow does not fit the model (n_embd, layer) */
    INNSTEER_ERR_ARG = 7,         /* bad argument (NULL, unknown id, non-finite strength) */
    INNSTEER_ERR_NOMEM = 8,
} innsteer_status;

typedef struct innsteer_flow innsteer_flow;
typedef struct innsteer_steerer innsteer_steerer;

/* How much of the edit a row gets (flows that carry gate parameters; see docs/flow-format.md):
 * OFF every row the full edit; DENSITY rows far from the training support (latent distance above
 * the flow's radius) get a damped edit; TARGET each row moves along delta only as far as it needs
 * to reach the positive class (never past it), up to `strength` times delta. */
typedef enum { INNSTEER_GATE_OFF = 0, INNSTEER_GATE_DENSITY = 1, INNSTEER_GATE_TARGET = 2 } innsteer_gate;

/* Where the eval callback computes the flow (docs/PERFORMANCE.md has the measurements):
 * AUTO      the device graph when ggml has a GPU device in the process, else HOST (the default);
 * HOST      rows copied to host memory, steered by the C kernel, copied back;
 * DEVICE    the flow as a ggml graph on ggml's first GPU device: activations stay in device
 *           memory (copied device-to-device into the graph's input and back);
 * CPU_GRAPH the same graph on ggml's CPU backend: checks the graph path without a GPU. */
typedef enum {
    INNSTEER_PATH_AUTO = 0,
    INNSTEER_PATH_HOST = 1,
    INNSTEER_PATH_DEVICE = 2,
    INNSTEER_PATH_CPU_GRAPH = 3,
} innsteer_path;
struct ggml_tensor;

INNSTEER_API const char *innsteer_status_name(innsteer_status status);

/* ---- flows ------------------------------------------------------------------------------ */

INNSTEER_API innsteer_status innsteer_flow_load(const char *path, innsteer_flow **out, char *err, size_t err_size);
/* innsteer_flow_load for one model: INNSTEER_ERR_MISMATCH, before any tensor is read, when the
 * flow's n_embd differs from n_embd or a layer is not below n_layer (0 skips either check).
 * Both refuse a path that is not a regular file (a FIFO, a device, a folder) without blocking. */
INNSTEER_API innsteer_status innsteer_flow_load_for(const char *path, int n_embd, int n_layer, innsteer_flow **out,
                                                    char *err, size_t err_size);
/* Same validation as innsteer_flow_load on an in-memory copy of a file (the data is copied). */
INNSTEER_API innsteer_status innsteer_flow_load_buffer(const void *data, size_t size, innsteer_flow **out,
                                                       char *err, size_t err_size);
/* Flows are reference counted: a steerer keeps the flows attached to it alive. */
INNSTEER_API void innsteer_flow_free(innsteer_flow *flow);

INNSTEER_API int innsteer_flow_n_embd(const innsteer_flow *flow);
INNSTEER_API int innsteer_flow_n_sites(const innsteer_flow *flow);
INNSTEER_API int innsteer_flow_site_layer(const innsteer_flow *flow, int site);
INNSTEER_API float innsteer_flow_default_strength(const innsteer_flow *flow);

/* What a flow file says about itself. Strings are NUL-terminated valid UTF-8, owned by the flow
 * (valid until innsteer_flow_free drops its last reference); a key the file lacks reads "". */
typedef struct {
    const char *name;               /* general.name, "" if absent; owned by the flow */
    const char *behavior;           /* innsteer.behavior, "" if absent */
    const char *method;             /* innsteer.method, "" if absent */
    const char *model_name;         /* innsteer.model.name, "" if absent */
    const char *model_architecture; /* innsteer.model.architecture, "" if absent */
    int model_n_embd;
    int model_n_layer;
    int n_sites;
    float default_strength;
    const char *provenance_json;    /* innsteer.provenance, "" if absent (not parsed in C) */
} innsteer_flow_info;
INNSTEER_API innsteer_status innsteer_flow_get_info(const innsteer_flow *flow, innsteer_flow_info *out);

/* One site (steered layer) of a flow, site in 0..n_sites-1. */
typedef struct {
    int layer;
    int latent_dim;      /* width of delta */
    int n_ops;
    const char *ops;     /* the op kinds, space-separated, e.g. "affine subspace affine coupling linear" */
    bool has_gate;
    bool has_edit_scale;
    float delta_norm;    /* Euclidean norm of delta */
} innsteer_site_info;
INNSTEER_API innsteer_status innsteer_flow_get_site_info(const innsteer_flow *flow, int site, innsteer_site_info *out);

/* Whether every site of the flow carries the parameters a gate mode needs. */
INNSTEER_API bool innsteer_flow_has_gate(const innsteer_flow *flow);

/* ---- steering inside llama.cpp ---------------------------------------------------------- */

/* max_rows: the largest batch a callback will see (llama.cpp's n_ubatch); scratch grows if a
 * larger one arrives. Returns NULL on bad sizes or out of memory. */
INNSTEER_API innsteer_steerer *innsteer_steerer_new(int n_embd, int n_layer, int max_rows);
INNSTEER_API void innsteer_steerer_free(innsteer_steerer *st);

/* Flows at the same layer apply in attach order; layers apply in forward-pass order. */
INNSTEER_API innsteer_status innsteer_steerer_attach(innsteer_steerer *st, innsteer_flow *flow, float strength,
                                                     int *id_out, char *err, size_t err_size);
INNSTEER_API innsteer_status innsteer_steerer_detach(innsteer_steerer *st, int id);
INNSTEER_API innsteer_status innsteer_steerer_set_strength(innsteer_steerer *st, int id, float strength);
INNSTEER_API innsteer_status innsteer_steerer_set_enabled(innsteer_steerer *st, int id, bool enabled);
/* INNSTEER_ERR_ARG for an unknown id or gate value; INNSTEER_ERR_UNSUPPORTED if the flow carries
 * no gate parameters and gate is not OFF. */
INNSTEER_API innsteer_status innsteer_steerer_set_gate(innsteer_steerer *st, int id, innsteer_gate gate);
/* Threads for prompt batches (default: the online CPUs, at most 32). They sleep between batches
 * and run only while llama.cpp waits for the callback. */
INNSTEER_API innsteer_status innsteer_steerer_set_threads(innsteer_steerer *st, int n_threads);
/* Where the flow is computed (innsteer_path). Batches of fewer than min_rows rows take the host
 * path whatever the path (decode: one row per sequence, where a host round trip can cost less than
 * running a graph). DEVICE and CPU_GRAPH start their ggml backend now and return
 * INNSTEER_ERR_UNSUPPORTED with a message (path stays HOST) when ggml has no such device. A new
 * steerer starts at AUTO with min_rows 32. The library reads no environment variables: settings
 * come through the setters only. */
INNSTEER_API innsteer_status innsteer_steerer_set_path(innsteer_steerer *st, innsteer_path path, int min_rows, char *err,
                                                       size_t err_size);
/* The device the DEVICE path runs the flow's graph on (a ggml_backend_dev_t), e.g. a remote RPC
 * device that is in no registry; NULL returns to ggml's first GPU device. Takes effect at the next
 * batch on the graph path. */
struct ggml_backend_device;
INNSTEER_API innsteer_status innsteer_steerer_set_device(innsteer_steerer *st, struct ggml_backend_device *device);
/* The ggml backend the graph path runs on, e.g. "CUDA0" ("" while none is started). */
INNSTEER_API const char *innsteer_steerer_device_name(const innsteer_steerer *st);
/* Master switch over all attached flows. */
INNSTEER_API void innsteer_steerer_set_active(innsteer_steerer *st, bool active);

/* Capture rows of l_out-<layer> before (post=false) or after (post=true) steering, appended
 * in evaluation order. */
INNSTEER_API innsteer_status innsteer_steerer_capture(innsteer_steerer *st, int layer, bool post, bool on);
INNSTEER_API int64_t innsteer_steerer_captured_rows(const innsteer_steerer *st, int layer, bool post);
INNSTEER_API innsteer_status innsteer_steerer_copy_captured(const innsteer_steerer *st, int layer, bool post,
                                                            float *dst, int64_t max_rows);
INNSTEER_API void innsteer_steerer_clear_captured(innsteer_steerer *st);

/* Counters: how often l_out-<layer> was seen, rows steered, rows kept because steering made
 * them non-finite. */
INNSTEER_API uint64_t innsteer_steerer_layer_visits(const innsteer_steerer *st, int layer);
INNSTEER_API uint64_t innsteer_steerer_rows_steered(const innsteer_steerer *st);
INNSTEER_API uint64_t innsteer_steerer_rows_rejected(const innsteer_steerer *st);
/* Rows steered by the graph path (a subset of rows_steered). */
INNSTEER_API uint64_t innsteer_steerer_rows_on_device(const innsteer_steerer *st);
/* The last error met inside the callback (empty if none), e.g. a tensor of the wrong width. */
INNSTEER_API const char *innsteer_steerer_last_error(const innsteer_steerer *st);

/* ---- many sequences in one batch, each with its own steering --------------------------------
 *
 * A slot is one sequence's steering: a list of (attached flow, strength, gate). Before each
 * llama_decode of a multi-sequence batch, innsteer_steerer_batch_begin says which sequence and
 * slot every token belongs to; the callback then steers each row with its own slot only, and
 * rows of slot -1 (or of a slot without flows at a layer) are not touched. While a batch is
 * begun, the attachments' own strengths, enabled flags and gates are not used (set_active still
 * switches everything off). innsteer_steerer_batch_end returns to whole-batch steering.
 *
 * llama.cpp splits a batch into ubatches, and a graph's rows are one ubatch in its own order:
 * `split` names the rule the context uses, INNSTEER_SPLIT_SIMPLE for a unified KV cache
 * (kv_unified, or n_seq_max 1), INNSTEER_SPLIT_EQUAL for one KV stream per sequence. Memories
 * that split otherwise (recurrent and hybrid models) are not supported. A layer seen more often
 * than the split predicts, or with a row count that fits no ubatch, is not steered and sets
 * last_error. No allocation happens per decode once the largest batch has been seen. */
typedef enum { INNSTEER_SPLIT_SIMPLE = 0, INNSTEER_SPLIT_EQUAL = 1 } innsteer_split;

#define INNSTEER_MAX_SLOTS 256
#define INNSTEER_MAX_SLOT_FLOWS 8

/* A free slot, empty and with zeroed counters. INNSTEER_ERR_NOMEM when all are in use. */
INNSTEER_API innsteer_status innsteer_slot_new(innsteer_steerer *st, int *slot_out);
INNSTEER_API innsteer_status innsteer_slot_free(innsteer_steerer *st, int slot);
/* Sets the flow's strength and gate in the slot (added if absent; strength 0 removes it). O(1):
 * a slot holds at most INNSTEER_MAX_SLOT_FLOWS flows; takes effect at the next layer visit. */
INNSTEER_API innsteer_status innsteer_slot_put(innsteer_steerer *st, int slot, int flow_id, float strength,
                                               innsteer_gate gate, char *err, size_t err_size);
INNSTEER_API innsteer_status innsteer_slot_clear(innsteer_steerer *st, int slot);

typedef struct {
    uint64_t tokens_evaluated; /* tokens given to batches with this slot */
    uint64_t rows_steered;     /* rows edited (one per token and flow site) */
    uint64_t rows_rejected;    /* rows kept because steering made them non-finite */
} innsteer_slot_stats;
INNSTEER_API innsteer_status innsteer_slot_get_stats(const innsteer_steerer *st, int slot, innsteer_slot_stats *out);

/* seq_ids and slots: one per token (slot -1: unsteered); outputs: one per token, or NULL for
 * "the last token only"; n_ubatch: the context's n_ubatch. */
INNSTEER_API innsteer_status innsteer_steerer_batch_begin(innsteer_steerer *st, int n_tokens, const int32_t *seq_ids,
                                                          const int32_t *slots, const int8_t *outputs, int n_ubatch,
                                                          innsteer_split split, char *err, size_t err_size);
INNSTEER_API void innsteer_steerer_batch_end(innsteer_steerer *st);

/* The llama.cpp scheduler callback (ggml_backend_sched_eval_callback); user_data is the steerer. */
INNSTEER_API bool innsteer_eval_callback(struct ggml_tensor *t, bool ask, void *user_data);

#ifdef __cplusplus
}
#endif

#endif /* INNSTEER_H */
