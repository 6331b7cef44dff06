#define _GNU_SOURCE /* RTLD_DEFAULT */
#include "ggml_api.h"

#include "error.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

static ggml_api table;
static pthread_once_t resolve_once = PTHREAD_ONCE_INIT;
/* the first missing function of each group, "" when the group is complete */
static char tensor_missing[64], graph_missing[64];

static void resolve_all(void) {
    /* a group stops at its first missing function: the table is then unusable for that group */
#define GGML_API_LOOKUP(missing, name)                                   \
    if (!missing[0]) {                                                   \
        *(void **)&table.name = dlsym(RTLD_DEFAULT, #name);              \
        if (!table.name) snprintf(missing, sizeof missing, "%s", #name); \
    }
#define GGML_API_TENSOR(ret, name, args) GGML_API_LOOKUP(tensor_missing, name)
#define GGML_API_GRAPH(ret, name, args) GGML_API_LOOKUP(graph_missing, name)
    GGML_API_TENSOR_FUNCTIONS(GGML_API_TENSOR)
    GGML_API_GRAPH_FUNCTIONS(GGML_API_GRAPH)
#undef GGML_API_TENSOR
#undef GGML_API_GRAPH
#undef GGML_API_LOOKUP
}

static const ggml_api *resolved(bool graph, char *err, size_t err_size) {
    pthread_once(&resolve_once, resolve_all);
    const char *missing = tensor_missing[0] ? tensor_missing : graph ? graph_missing : "";
    if (!missing[0]) return &table;
    set_error(err, err_size, INNSTEER_ERR_UNSUPPORTED, "ggml function %s not found in the process", missing);
    return NULL;
}

const ggml_api *ggml_api_tensor(char *err, size_t err_size) { return resolved(false, err, err_size); }
const ggml_api *ggml_api_graph(char *err, size_t err_size) { return resolved(true, err, err_size); }
