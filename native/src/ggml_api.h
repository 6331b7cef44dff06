/* The ggml functions libinnsteer calls, looked up once in the ggml the process already loaded
 * (llama-cpp-python's, or the application's llama.cpp), by their public signatures in ggml.h,
 * ggml-alloc.h and ggml-backend.h. libinnsteer links no ggml library, so one build serves every
 * ggml backend that shares the public API, and it never reads struct ggml_tensor's layout. */
#ifndef INNSTEER_GGML_API_H
#define INNSTEER_GGML_API_H

#include "innsteer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ggml_tensor;
struct ggml_context;
struct ggml_cgraph;
struct ggml_backend;
struct ggml_backend_device;
struct ggml_backend_reg;
struct ggml_backend_buffer;
struct ggml_backend_buffer_type;
struct ggml_gallocr;

/* ggml_init takes this public struct by value (ggml.h: struct ggml_init_params). */
struct ggml_api_init_params {
    size_t mem_size;
    void *mem_buffer;
    bool no_alloc;
};

/* enum values from ggml.h / ggml-backend.h (public and stable) */
#define GGML_API_TYPE_F32 0
#define GGML_API_TYPE_I32 26
#define GGML_API_DEV_CPU 0
#define GGML_API_DEV_GPU 1
#define GGML_API_DEV_IGPU 2

typedef struct ggml_tensor ggml_api_T;
typedef struct ggml_context ggml_api_C;

/* What the eval callback needs: names, shapes and reading/writing a tensor in any buffer. */
#define GGML_API_TENSOR_FUNCTIONS(X)                                               \
    X(const char *, ggml_get_name, (const ggml_api_T *))                           \
    X(int64_t, ggml_nelements, (const ggml_api_T *))                               \
    X(int64_t, ggml_nrows, (const ggml_api_T *))                                   \
    X(size_t, ggml_element_size, (const ggml_api_T *))                             \
    X(size_t, ggml_nbytes, (const ggml_api_T *))                                   \
    X(bool, ggml_is_contiguous, (const ggml_api_T *))                              \
    X(void, ggml_backend_tensor_get, (const ggml_api_T *, void *, size_t, size_t)) \
    X(void, ggml_backend_tensor_set, (ggml_api_T *, const void *, size_t, size_t))

/* What the graph path (flow_graph.c) needs on top: building, allocating and computing graphs on a
 * backend from ggml's device registry. A ggml without one of them still steers on the host. */
#define GGML_API_GRAPH_FUNCTIONS(X)                                                                        \
    X(size_t, ggml_tensor_overhead, (void))                                                                \
    X(size_t, ggml_graph_overhead_custom, (size_t, bool))                                                  \
    X(ggml_api_C *, ggml_init, (struct ggml_api_init_params))                                              \
    X(void, ggml_free, (ggml_api_C *))                                                                     \
    X(ggml_api_T *, ggml_new_tensor_1d, (ggml_api_C *, int, int64_t))                                      \
    X(ggml_api_T *, ggml_new_tensor_2d, (ggml_api_C *, int, int64_t, int64_t))                             \
    X(void, ggml_set_input, (ggml_api_T *))                                                                \
    X(void, ggml_set_output, (ggml_api_T *))                                                               \
    X(ggml_api_T *, ggml_mul_mat, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                              \
    X(ggml_api_T *, ggml_add, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                                  \
    X(ggml_api_T *, ggml_sub, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                                  \
    X(ggml_api_T *, ggml_mul, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                                  \
    X(ggml_api_T *, ggml_div, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                                  \
    X(ggml_api_T *, ggml_scale, (ggml_api_C *, ggml_api_T *, float))                                       \
    X(ggml_api_T *, ggml_scale_bias, (ggml_api_C *, ggml_api_T *, float, float))                           \
    X(ggml_api_T *, ggml_tanh, (ggml_api_C *, ggml_api_T *))                                               \
    X(ggml_api_T *, ggml_exp, (ggml_api_C *, ggml_api_T *))                                                \
    X(ggml_api_T *, ggml_relu, (ggml_api_C *, ggml_api_T *))                                               \
    X(ggml_api_T *, ggml_silu, (ggml_api_C *, ggml_api_T *))                                               \
    X(ggml_api_T *, ggml_sqr, (ggml_api_C *, ggml_api_T *))                                                \
    X(ggml_api_T *, ggml_sum_rows, (ggml_api_C *, ggml_api_T *))                                           \
    X(ggml_api_T *, ggml_cont, (ggml_api_C *, ggml_api_T *))                                               \
    X(ggml_api_T *, ggml_transpose, (ggml_api_C *, ggml_api_T *))                                          \
    X(ggml_api_T *, ggml_repeat, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                               \
    X(ggml_api_T *, ggml_get_rows, (ggml_api_C *, ggml_api_T *, ggml_api_T *))                             \
    X(ggml_api_T *, ggml_concat, (ggml_api_C *, ggml_api_T *, ggml_api_T *, int))                          \
    X(ggml_api_T *, ggml_view_2d, (ggml_api_C *, ggml_api_T *, int64_t, int64_t, size_t, size_t))          \
    X(struct ggml_cgraph *, ggml_new_graph_custom, (ggml_api_C *, size_t, bool))                           \
    X(void, ggml_build_forward_expand, (struct ggml_cgraph *, ggml_api_T *))                               \
    X(bool, ggml_are_same_shape, (const ggml_api_T *, const ggml_api_T *))                                 \
    X(int, ggml_graph_n_nodes, (struct ggml_cgraph *))                                                     \
    X(ggml_api_T *, ggml_graph_node, (struct ggml_cgraph *, int))                                          \
    X(bool, ggml_backend_supports_op, (struct ggml_backend *, const ggml_api_T *))                         \
    X(struct ggml_backend_device *, ggml_backend_dev_by_type, (int))                                       \
    X(struct ggml_backend *, ggml_backend_dev_init, (struct ggml_backend_device *, const char *))          \
    X(struct ggml_backend_reg *, ggml_backend_dev_backend_reg, (struct ggml_backend_device *))             \
    X(void *, ggml_backend_reg_get_proc_address, (struct ggml_backend_reg *, const char *))                \
    X(const char *, ggml_backend_name, (struct ggml_backend *))                                            \
    X(void, ggml_backend_free, (struct ggml_backend *))                                                    \
    X(struct ggml_backend_buffer_type *, ggml_backend_get_default_buffer_type, (struct ggml_backend *))    \
    X(int, ggml_backend_graph_compute, (struct ggml_backend *, struct ggml_cgraph *))                      \
    X(void, ggml_backend_tensor_copy, (const ggml_api_T *, ggml_api_T *))                                  \
    X(void, ggml_backend_buffer_free, (struct ggml_backend_buffer *))                                      \
    X(struct ggml_backend_buffer *, ggml_backend_alloc_ctx_tensors, (ggml_api_C *, struct ggml_backend *)) \
    X(struct ggml_gallocr *, ggml_gallocr_new, (struct ggml_backend_buffer_type *))                        \
    X(void, ggml_gallocr_free, (struct ggml_gallocr *))                                                    \
    X(bool, ggml_gallocr_alloc_graph, (struct ggml_gallocr *, struct ggml_cgraph *))

typedef struct {
#define GGML_API_FIELD(ret, name, args) ret(*name) args;
    GGML_API_TENSOR_FUNCTIONS(GGML_API_FIELD)
    GGML_API_GRAPH_FUNCTIONS(GGML_API_FIELD)
#undef GGML_API_FIELD
} ggml_api;

/* The table, resolved at the first call of either (thread-safe; later calls cost a
 * pthread_once check, no lookup). NULL, with INNSTEER_ERR_UNSUPPORTED's message naming the first
 * missing function in err, when the process lacks what the caller needs: ggml_api_tensor
 * guarantees the tensor functions, ggml_api_graph all of them. */
const ggml_api *ggml_api_tensor(char *err, size_t err_size);
const ggml_api *ggml_api_graph(char *err, size_t err_size);

#endif
