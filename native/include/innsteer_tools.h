/*
 * innsteer tools: a flow's maps on host rows, for tests, converters and inspection tools.
 *
 * Rows are n_embd floats, contiguous. phi's latent lives in the same n_embd-dimensional space.
 * These allocate scratch (and, for the graph path, a ggml backend) per call; the eval callback
 * (innsteer.h) does not use them.
 */
#ifndef INNSTEER_TOOLS_H
#define INNSTEER_TOOLS_H

#include "innsteer.h"

#ifdef __cplusplus
extern "C" {
#endif

INNSTEER_API innsteer_status innsteer_flow_forward(const innsteer_flow *flow, int site, const float *in, float *out,
                                                   int64_t n_rows);
INNSTEER_API innsteer_status innsteer_flow_inverse(const innsteer_flow *flow, int site, const float *in, float *out,
                                                   int64_t n_rows);
INNSTEER_API innsteer_status innsteer_flow_steer(const innsteer_flow *flow, int site, float strength, const float *in,
                                                 float *out, int64_t n_rows);
INNSTEER_API innsteer_status innsteer_flow_steer_gated(const innsteer_flow *flow, int site, float strength,
                                                       innsteer_gate gate, const float *in, float *out, int64_t n_rows);
/* The graph path's result on host rows: the flow as a ggml graph on the backend `path` names
 * (DEVICE, CPU_GRAPH, or AUTO: DEVICE if ggml has a GPU, else CPU_GRAPH). Needs ggml loaded in
 * the process. */
INNSTEER_API innsteer_status innsteer_flow_steer_graph(const innsteer_flow *flow, int site, float strength,
                                                       innsteer_gate gate, innsteer_path path, const float *in,
                                                       float *out, int64_t n_rows, char *err, size_t err_size);

#ifdef __cplusplus
}
#endif

#endif /* INNSTEER_TOOLS_H */
