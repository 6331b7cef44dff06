/* 1000 load / attach / set-strength / detach / free cycles: run under AddressSanitizer, whose
 * LeakSanitizer fails the program on any leak at exit. */
#include "innsteer.h"

#include <stdio.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    char err[256];
    innsteer_steerer *st = innsteer_steerer_new(576, 30, 64);
    if (!st) return 3;
    for (int i = 0; i < 1000; i++) {
        innsteer_flow *flow = NULL;
        if (innsteer_flow_load(argv[1], &flow, err, sizeof err) != INNSTEER_OK) {
            printf("load failed: %s\n", err);
            return 4;
        }
        int id = -1;
        if (innsteer_steerer_attach(st, flow, 1.0f, &id, err, sizeof err) != INNSTEER_OK) return 5;
        innsteer_flow_free(flow); /* the steerer keeps its own reference */
        if (innsteer_steerer_set_strength(st, id, 0.5f) != INNSTEER_OK) return 6;
        if (innsteer_steerer_set_threads(st, 1 + i % 3) != INNSTEER_OK) return 7;
        if (innsteer_steerer_detach(st, id) != INNSTEER_OK) return 8;
    }
    innsteer_steerer_free(st);
    printf("ok\n");
    return 0;
}
