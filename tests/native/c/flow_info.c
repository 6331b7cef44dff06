/* Prints what innsteer_flow_get_info / innsteer_flow_get_site_info say about each flow file, one
 * JSON object a line, and checks what the API promises on the way:
 *   flow_info FLOW...
 *   {"path": ..., "status": "ok", "name": ..., ..., "sites": [{"layer": ..., "ops": ...}, ...]}
 *   {"path": ..., "status": "invalid flow", "error": "general.name is not valid UTF-8"}
 * Exit status 0 when every promise held (whether or not the files load), 1 otherwise. */
#include "innsteer.h"

#include <stdio.h>
#include <string.h>

static int broken;

#define EXPECT(cond)                                                            \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
            broken = 1;                                                         \
        }                                                                       \
    } while (0)

/* A JSON string: the library hands out valid UTF-8, so only quotes, backslashes and control
 * characters need escaping. */
static void put_string(const char *key, const char *s) {
    printf("\"%s\": \"", key);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p < 0x20) printf("\\u%04x", *p);
        else putchar(*p);
    }
    printf("\"");
}

static int count_words(const char *s) {
    int n = 0;
    for (const char *p = s; *p; p++) n += *p != ' ' && (p == s || p[-1] == ' ');
    return n;
}

static void describe(const innsteer_flow *flow) {
    innsteer_flow_info info;
    EXPECT(innsteer_flow_get_info(flow, &info) == INNSTEER_OK);
    EXPECT(innsteer_flow_get_info(flow, NULL) == INNSTEER_ERR_ARG);
    EXPECT(info.model_n_embd == innsteer_flow_n_embd(flow) && info.n_sites == innsteer_flow_n_sites(flow));
    EXPECT(info.default_strength == innsteer_flow_default_strength(flow));
    put_string("name", info.name);
    printf(", ");
    put_string("behavior", info.behavior);
    printf(", ");
    put_string("method", info.method);
    printf(", ");
    put_string("model_name", info.model_name);
    printf(", ");
    put_string("model_architecture", info.model_architecture);
    printf(", \"model_n_embd\": %d, \"model_n_layer\": %d, \"n_sites\": %d, \"default_strength\": %.9g, ", info.model_n_embd,
           info.model_n_layer, info.n_sites, (double)info.default_strength);
    put_string("provenance_json", info.provenance_json);
    printf(", \"sites\": [");
    for (int s = 0; s < info.n_sites; s++) {
        innsteer_site_info si;
        EXPECT(innsteer_flow_get_site_info(flow, s, &si) == INNSTEER_OK);
        EXPECT(si.layer == innsteer_flow_site_layer(flow, s));
        EXPECT(count_words(si.ops) == si.n_ops);
        printf("%s{\"layer\": %d, \"latent_dim\": %d, \"n_ops\": %d, ", s ? ", " : "", si.layer, si.latent_dim, si.n_ops);
        put_string("ops", si.ops);
        printf(", \"has_gate\": %s, \"has_edit_scale\": %s, \"delta_norm\": %.9g}", si.has_gate ? "true" : "false",
               si.has_edit_scale ? "true" : "false", (double)si.delta_norm);
    }
    printf("]");
    innsteer_site_info si;
    EXPECT(innsteer_flow_get_site_info(flow, -1, &si) == INNSTEER_ERR_ARG);
    EXPECT(innsteer_flow_get_site_info(flow, info.n_sites, &si) == INNSTEER_ERR_ARG);
    EXPECT(innsteer_flow_get_site_info(flow, 0, NULL) == INNSTEER_ERR_ARG);
}

int main(int argc, char **argv) {
    EXPECT(innsteer_flow_get_info(NULL, NULL) == INNSTEER_ERR_ARG);
    for (int i = 1; i < argc; i++) {
        char err[512] = "";
        innsteer_flow *flow = NULL;
        innsteer_status st = innsteer_flow_load(argv[i], &flow, err, sizeof err);
        printf("{");
        put_string("path", argv[i]);
        printf(", ");
        put_string("status", innsteer_status_name(st));
        printf(", ");
        if (st == INNSTEER_OK) {
            describe(flow);
            innsteer_flow_free(flow);
        } else {
            EXPECT(flow == NULL && err[0]);
            put_string("error", err);
        }
        printf("}\n");
    }
    return broken;
}
