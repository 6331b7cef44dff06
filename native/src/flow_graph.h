/* The flow as a ggml graph on a ggml backend: steering without a host round trip when llama.cpp's
 * activations live in device memory (CUDA, Metal, ...). Same maths as flow_steer.c (the edit is
 * carried back through the ops as a difference, h + dh), expressed with ggml ops. */
#ifndef INNSTEER_FLOW_GRAPH_H
#define INNSTEER_FLOW_GRAPH_H

#include "flow.h"

#include <stdint.h>

struct ggml_tensor;

typedef struct flow_graph flow_graph;
typedef struct graph_backend graph_backend;

/* A ggml backend from ggml's device registry: the first GPU (or integrated GPU) device for
 * INNSTEER_PATH_DEVICE, the CPU device for INNSTEER_PATH_CPU_GRAPH. INNSTEER_ERR_UNSUPPORTED (with
 * a message) when the process's ggml lacks a function the graph needs (ggml_api.h) or the
 * device. n_threads applies to the CPU backend only. */
/* device: for INNSTEER_PATH_DEVICE, the ggml device to use (NULL: ggml's first GPU device) */
innsteer_status graph_backend_new(innsteer_path path, struct ggml_backend_device *device, int n_threads, graph_backend **out,
                                  char *err, size_t err_size);
void graph_backend_free(graph_backend *b);
const char *graph_backend_name(const graph_backend *b);

/* One site's weights uploaded to the backend (once), plus the compute graphs built for recent
 * batch shapes. */
innsteer_status flow_graph_new(const flow_site *site, int n_embd, graph_backend *b, flow_graph **out, char *err,
                               size_t err_size);
void flow_graph_free(flow_graph *g);

/* Whether the graph path computes this gate mode for this site (else use the host kernel). */
bool flow_graph_supports(const flow_graph *g, innsteer_gate gate);

/* Steers the rows of t (a contiguous f32 tensor of n_rows x n_embd, in any ggml buffer) in place
 * on g's backend. Rows whose result is not finite keep their values (and are marked in bad, n_rows
 * flags, where given); host_rows (n_rows x n_embd floats) is used only then, to write back the
 * finite rows one by one. Returns when the result is in t. */
innsteer_status flow_graph_steer_tensor(flow_graph *g, struct ggml_tensor *t, int64_t n_rows, float strength,
                                        innsteer_gate gate, float *host_rows, uint8_t *bad, uint64_t *steered,
                                        uint64_t *rejected, char *err, size_t err_size);

/* The same graph on host rows (tests and tools): in and out are n_rows x n_embd floats. */
innsteer_status flow_graph_steer_host(flow_graph *g, const float *in, float *out, int64_t n_rows, float strength,
                                      innsteer_gate gate, uint64_t *rejected, char *err, size_t err_size);

#endif
