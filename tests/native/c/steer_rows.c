/* Uses the public headers alone: loads a flow, steers rows read from a file, writes the result.
 *   steer_rows FLOW STRENGTH N_ROWS IN.f32 OUT.f32   (prints the status name on failure) */
#include "innsteer_tools.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s FLOW STRENGTH N_ROWS IN OUT\n", argv[0]);
        return 2;
    }
    char err[256];
    innsteer_flow *flow = NULL;
    innsteer_status st = innsteer_flow_load(argv[1], &flow, err, sizeof err);
    if (st != INNSTEER_OK) {
        printf("%s: %s\n", innsteer_status_name(st), err);
        return 1;
    }
    int n_embd = innsteer_flow_n_embd(flow);
    long n_rows = strtol(argv[3], NULL, 10);
    float *in = malloc(sizeof(float) * (size_t)n_rows * n_embd), *out = malloc(sizeof(float) * (size_t)n_rows * n_embd);
    FILE *f = fopen(argv[4], "rb");
    if (!in || !out || !f || fread(in, sizeof(float), (size_t)n_rows * n_embd, f) != (size_t)n_rows * n_embd) return 3;
    fclose(f);
    st = innsteer_flow_steer(flow, 0, strtof(argv[2], NULL), in, out, n_rows);
    if (st != INNSTEER_OK) return 4;
    /* a steerer refuses a flow for another width, with the reason */
    innsteer_steerer *other = innsteer_steerer_new(n_embd + 1, 4, 8);
    int id = -1;
    st = innsteer_steerer_attach(other, flow, 1.0f, &id, err, sizeof err);
    printf("attach to n_embd %d: %s (%s)\n", n_embd + 1, innsteer_status_name(st), err);
    innsteer_steerer_free(other);
    f = fopen(argv[5], "wb");
    if (!f || fwrite(out, sizeof(float), (size_t)n_rows * n_embd, f) != (size_t)n_rows * n_embd) return 5;
    fclose(f);
    innsteer_flow_free(flow);
    free(in);
    free(out);
    printf("ok\n");
    return 0;
}
