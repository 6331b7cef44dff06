/* Fuzz target for the flow loader: every input must either load, pass validation, describe
 * itself consistently (innsteer_flow_get_info, innsteer_flow_get_site_info) and steer a probe row,
 * or be refused with a status and a message. Never crash, leak or read out of bounds.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Inative/include tests/native/fuzz/flow_fuzz.c \
 *     native/src/error.c native/src/gguf_read.c native/src/flow.c native/src/flow_ops.c native/src/flow_math.c \
 *     native/src/flow_steer.c -lm -o flow_fuzz
 *   ./flow_fuzz -max_total_time=600 -dict=tests/native/fuzz/flow.dict tests/native/fuzz/corpus
 *
 * (tests/native/test_fuzz.py links every library source listed in CMakeLists.txt instead.)
 *
 * Built with -DFUZZ_REPLAY (any C compiler, with or without sanitizers) it instead runs every
 * file named on the command line once: the regression test in CI. */
#include "innsteer_tools.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);

/* A described string must be there, NUL-terminated (strlen reads it) and within its cap. */
static void check_string(const char *s, size_t cap) {
    if (!s || strlen(s) > cap) abort();
}

/* The info must agree with the accessors and with itself. */
static void check_info(const innsteer_flow *flow) {
    innsteer_flow_info info;
    if (innsteer_flow_get_info(flow, &info) != INNSTEER_OK) abort();
    check_string(info.name, 4096);
    check_string(info.behavior, 4096);
    check_string(info.method, 4096);
    check_string(info.model_name, 4096);
    check_string(info.model_architecture, 4096);
    check_string(info.provenance_json, 65536);
    if (info.model_n_embd != innsteer_flow_n_embd(flow) || info.n_sites != innsteer_flow_n_sites(flow) ||
        info.default_strength != innsteer_flow_default_strength(flow) || info.model_n_layer < 1) {
        abort();
    }
    bool all_gated = true;
    for (int s = 0; s < info.n_sites; s++) {
        innsteer_site_info si;
        if (innsteer_flow_get_site_info(flow, s, &si) != INNSTEER_OK) abort();
        check_string(si.ops, 64 * 9);
        int words = 0;
        for (const char *p = si.ops; *p; p++) words += (p == si.ops || p[-1] == ' ') && *p != ' ';
        if (si.layer != innsteer_flow_site_layer(flow, s) || si.layer >= info.model_n_layer || words != si.n_ops ||
            si.latent_dim < 1 || si.latent_dim > info.model_n_embd || !(si.delta_norm >= 0.0f)) {
            abort();
        }
        all_gated = all_gated && si.has_gate;
    }
    if (all_gated != innsteer_flow_has_gate(flow)) abort();
    innsteer_site_info si;
    if (innsteer_flow_get_site_info(flow, info.n_sites, &si) != INNSTEER_ERR_ARG) abort();
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    innsteer_flow *flow = NULL;
    char err[256];
    innsteer_status st = innsteer_flow_load_buffer(data, size, &flow, err, sizeof err);
    if (st != INNSTEER_OK) {
        if (flow != NULL || err[0] == '\0') abort(); /* a refusal must come with a message and no flow */
        return 0;
    }
    check_info(flow);
    int n = innsteer_flow_n_embd(flow);
    float *in = calloc((size_t)n * 3, sizeof(float)), *out = calloc((size_t)n * 3, sizeof(float));
    if (!in || !out) abort();
    for (int i = 0; i < 3 * n; i++) in[i] = (float)((i % 17) - 8) * 0.25f;
    for (int s = 0; s < innsteer_flow_n_sites(flow); s++) {
        for (int g = INNSTEER_GATE_OFF; g <= INNSTEER_GATE_TARGET; g++) {
            if (g != INNSTEER_GATE_OFF && !innsteer_flow_has_gate(flow)) continue;
            if (innsteer_flow_steer_gated(flow, s, 1.0f, (innsteer_gate)g, in, out, 3) != INNSTEER_OK) abort();
        }
        if (innsteer_flow_forward(flow, s, in, out, 3) != INNSTEER_OK) abort();
        if (innsteer_flow_inverse(flow, s, out, in, 3) != INNSTEER_OK) abort();
    }
    free(in);
    free(out);
    innsteer_flow_free(flow);
    return 0;
}

#ifdef FUZZ_REPLAY
int main(int argc, char **argv) {
    int n = 0;
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            fprintf(stderr, "cannot open %s\n", argv[i]);
            return 2;
        }
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        unsigned char *buf = malloc(size > 0 ? (size_t)size : 1);
        if (!buf || (size > 0 && fread(buf, 1, (size_t)size, f) != (size_t)size)) return 2;
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)size);
        free(buf);
        n++;
    }
    printf("replayed %d inputs\n", n);
    return 0;
}
#endif
