/*
 * steer_chat: a small chat program that steers a llama.cpp model with an innsteer flow.
 *
 *   steer_chat -m MODEL.gguf -f FLOW.gguf [-a STRENGTH] [-n MAX_TOKENS] [-g off|density|target]
 *              [-t THREADS] [-c N_CTX] [--compare] [-v] [MESSAGE ...]
 *
 * Each MESSAGE is one user turn (without any, one turn per line of stdin). Replies are greedy, so
 * a run repeats exactly. With --compare every turn is answered twice, unsteered then steered;
 * the conversation keeps the steered reply. Output, per turn:
 *
 *   === unsteered ===          (with --compare)
 *   ...reply...
 *   === steered (strength A) ===
 *   ...reply...
 *
 * Build (docs/EMBEDDING.md): link libinnsteer, libllama and libggml-base, e.g. against the llama.cpp
 * inside llama-cpp-python:
 *   cc -std=c11 -O2 native/examples/steer_chat.c $(python -m innsteer_local.runtime.cbuild) -o steer_chat
 * THREADS defaults to half the online CPUs, as in llama-cpp-python.
 *
 * Environment: INNSTEER_PATH (auto, host, device, cpu-graph) and INNSTEER_DEVICE_MIN_ROWS choose
 * where the flow is computed (innsteer_steerer_set_path); the library itself reads no variables.
 *
 * Exit status: 0 ok, 1 model/flow/decode error, 2 bad arguments.
 */
#define _POSIX_C_SOURCE 200809L /* sysconf, strdup */

#include "innsteer.h"
#include "llama.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_TURNS 256

typedef struct {
    bool set;
    innsteer_path path;
    int min_rows;
} path_setting;

typedef struct {
    const char *model_path;
    const char *flow_path;
    float strength;
    bool has_strength;
    int max_tokens;
    int n_threads;
    int n_ctx;
    innsteer_gate gate;
    bool compare;
    bool verbose;
    path_setting path;
    const char **messages;
    int n_messages;
} options;

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s -m MODEL.gguf -f FLOW.gguf [-a STRENGTH] [-n MAX_TOKENS] [-g off|density|target]\n"
            "          [-t THREADS] [-c N_CTX] [--compare] [-v] [MESSAGE ...]\n"
            "  without MESSAGE arguments, each line of stdin is one user turn\n",
            argv0);
}

static void quiet_log(enum ggml_log_level level, const char *text, void *user_data) {
    (void)level;
    (void)text;
    (void)user_data;
}

/* Parses a whole argument as a finite float; false (with a message) otherwise. */
static bool parse_float(const char *name, const char *s, float *out) {
    char *end = NULL;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(v)) {
        fprintf(stderr, "error: %s must be a finite number, got '%s'\n", name, s);
        return false;
    }
    *out = v;
    return true;
}

static bool parse_int(const char *name, const char *s, int lo, int hi, int *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno == ERANGE || v < lo || v > hi) {
        fprintf(stderr, "error: %s must be an integer in %d..%d, got '%s'\n", name, lo, hi, s);
        return false;
    }
    *out = (int)v;
    return true;
}

/* INNSTEER_PATH and INNSTEER_DEVICE_MIN_ROWS, if set; false (with a message) on a bad value. */
static bool parse_path_env(path_setting *p) {
    static const char *const names[] = {"auto", "host", "device", "cpu-graph"};
    const char *path = getenv("INNSTEER_PATH"), *min_rows = getenv("INNSTEER_DEVICE_MIN_ROWS");
    p->set = path || min_rows;
    p->path = INNSTEER_PATH_AUTO;
    p->min_rows = 32; /* the library's default */
    if (path) {
        int i = 0;
        while (i < 4 && strcmp(path, names[i]) != 0) i++;
        if (i == 4) {
            fprintf(stderr, "error: INNSTEER_PATH must be auto, host, device or cpu-graph, got '%s'\n", path);
            return false;
        }
        p->path = (innsteer_path)i;
    }
    return !min_rows || parse_int("INNSTEER_DEVICE_MIN_ROWS", min_rows, 1, 1 << 20, &p->min_rows);
}

static bool parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->max_tokens = 128;
    o->n_ctx = 2048;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->n_threads = cpus > 1 ? (int)(cpus / 2) : 1; /* as llama-cpp-python: spinning threads on shared cores stall */
    o->messages = (const char **)calloc((size_t)argc, sizeof(char *));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_value = i + 1 < argc;
        if (strcmp(a, "--compare") == 0) {
            o->compare = true;
        } else if (strcmp(a, "-v") == 0) {
            o->verbose = true;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            return false;
        } else if (a[0] == '-' && a[1] != '\0' && strchr("mfangtc", a[1]) && a[2] == '\0') {
            if (!has_value) {
                fprintf(stderr, "error: %s needs a value\n", a);
                return false;
            }
            const char *v = argv[++i];
            switch (a[1]) {
                case 'm': o->model_path = v; break;
                case 'f': o->flow_path = v; break;
                case 'a':
                    if (!parse_float("strength (-a)", v, &o->strength)) return false;
                    o->has_strength = true;
                    break;
                case 'n':
                    if (!parse_int("max tokens (-n)", v, 1, 1 << 20, &o->max_tokens)) return false;
                    break;
                case 't':
                    if (!parse_int("threads (-t)", v, 1, 512, &o->n_threads)) return false;
                    break;
                case 'c':
                    if (!parse_int("context size (-c)", v, 64, 1 << 20, &o->n_ctx)) return false;
                    break;
                case 'g':
                    if (strcmp(v, "off") == 0) o->gate = INNSTEER_GATE_OFF;
                    else if (strcmp(v, "density") == 0) o->gate = INNSTEER_GATE_DENSITY;
                    else if (strcmp(v, "target") == 0) o->gate = INNSTEER_GATE_TARGET;
                    else {
                        fprintf(stderr, "error: gate (-g) must be off, density or target, got '%s'\n", v);
                        return false;
                    }
                    break;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "error: unknown option '%s'\n", a);
            return false;
        } else {
            o->messages[o->n_messages++] = a;
        }
    }
    if (!o->model_path || !o->flow_path) {
        fprintf(stderr, "error: -m MODEL and -f FLOW are required\n");
        return false;
    }
    return parse_path_env(&o->path);
}

typedef struct {
    struct llama_model *model;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    struct llama_sampler *sampler;
    const char *tmpl;
    char *prompt;
    int prompt_cap;
} chat_state;

/* The chat so far, formatted by the model's template, ending with the assistant's turn. */
static const char *format_chat(chat_state *c, const struct llama_chat_message *msgs, int n) {
    int len = llama_chat_apply_template(c->tmpl, msgs, (size_t)n, true, c->prompt, c->prompt_cap);
    if (len > c->prompt_cap) {
        char *bigger = realloc(c->prompt, (size_t)len + 1);
        if (!bigger) return NULL;
        c->prompt = bigger;
        c->prompt_cap = len + 1;
        len = llama_chat_apply_template(c->tmpl, msgs, (size_t)n, true, c->prompt, c->prompt_cap);
    }
    if (len < 0) {
        fprintf(stderr, "error: the model's chat template is not supported by llama_chat_apply_template\n");
        return NULL;
    }
    c->prompt[len] = '\0';
    return c->prompt;
}

/* Greedy reply to `prompt` from an empty KV cache; returns a malloc'd string or NULL. */
static char *generate(chat_state *c, const char *prompt, int max_tokens) {
    llama_memory_clear(llama_get_memory(c->ctx), true);
    llama_sampler_reset(c->sampler);
    int n_prompt = -llama_tokenize(c->vocab, prompt, (int32_t)strlen(prompt), NULL, 0, true, true);
    llama_token *tokens = malloc(sizeof(llama_token) * (size_t)(n_prompt > 0 ? n_prompt : 1));
    if (!tokens || llama_tokenize(c->vocab, prompt, (int32_t)strlen(prompt), tokens, n_prompt, true, true) < 0) {
        fprintf(stderr, "error: cannot tokenize the prompt\n");
        free(tokens);
        return NULL;
    }
    int n_ctx = (int)llama_n_ctx(c->ctx);
    if (n_prompt + max_tokens > n_ctx) {
        fprintf(stderr, "error: prompt (%d tokens) + max tokens (%d) exceed the context size %d (use -c)\n", n_prompt,
                max_tokens, n_ctx);
        free(tokens);
        return NULL;
    }
    size_t cap = 256, len = 0;
    char *out = malloc(cap);
    struct llama_batch batch = llama_batch_get_one(tokens, n_prompt);
    llama_token tok;
    for (int i = 0; out && i < max_tokens; i++) {
        int rc = llama_decode(c->ctx, batch);
        if (rc != 0) {
            fprintf(stderr, "error: llama_decode failed with %d\n", rc);
            free(out);
            out = NULL;
            break;
        }
        tok = llama_sampler_sample(c->sampler, c->ctx, -1);
        if (llama_vocab_is_eog(c->vocab, tok)) break;
        char piece[256];
        int n = llama_token_to_piece(c->vocab, tok, piece, sizeof piece, 0, false);
        if (n < 0) n = 0;
        if (len + (size_t)n + 1 > cap) {
            while (len + (size_t)n + 1 > cap) cap *= 2;
            char *bigger = realloc(out, cap);
            if (!bigger) {
                free(out);
                out = NULL;
                break;
            }
            out = bigger;
        }
        memcpy(out + len, piece, (size_t)n);
        len += (size_t)n;
        batch = llama_batch_get_one(&tok, 1);
    }
    if (out) out[len] = '\0';
    free(tokens);
    return out;
}

int main(int argc, char **argv) {
    options o;
    if (!parse_args(argc, argv, &o)) {
        usage(argv[0]);
        free(o.messages);
        return 2;
    }
    if (!o.verbose) llama_log_set(quiet_log, NULL);

    /* The flow first: a bad flow file fails fast, before the model loads. */
    char err[512] = "";
    innsteer_flow *flow = NULL;
    innsteer_status st = innsteer_flow_load(o.flow_path, &flow, err, sizeof err);
    if (st != INNSTEER_OK) {
        fprintf(stderr, "error: cannot load flow %s: %s (%s)\n", o.flow_path, err, innsteer_status_name(st));
        free(o.messages);
        return 1;
    }
    float strength = o.has_strength ? o.strength : innsteer_flow_default_strength(flow);

    llama_backend_init();
    chat_state c = {0};
    c.model = llama_model_load_from_file(o.model_path, llama_model_default_params());
    if (!c.model) {
        fprintf(stderr, "error: cannot load model %s (missing, not a GGUF model, or unsupported)\n", o.model_path);
        innsteer_flow_free(flow);
        free(o.messages);
        return 1;
    }
    c.vocab = llama_model_get_vocab(c.model);
    c.tmpl = llama_model_chat_template(c.model, NULL);
    if (!c.tmpl) c.tmpl = "chatml"; /* base models: a generic format */

    /* The steerer must exist before the context: llama.cpp reads cb_eval when it is created. */
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t)o.n_ctx;
    cparams.n_batch = (uint32_t)o.n_ctx; /* a whole prompt in one llama_decode */
    cparams.n_threads = o.n_threads;
    cparams.n_threads_batch = o.n_threads;
    innsteer_steerer *steerer = innsteer_steerer_new(llama_model_n_embd(c.model), llama_model_n_layer(c.model),
                                                     (int)cparams.n_ubatch);
    int flow_id = -1;
    int rc = 1;
    if (!steerer) {
        fprintf(stderr, "error: cannot create a steerer\n");
        goto done;
    }
    st = innsteer_steerer_attach(steerer, flow, strength, &flow_id, err, sizeof err);
    if (st != INNSTEER_OK) {
        fprintf(stderr, "error: flow %s does not fit model %s: %s (%s)\n", o.flow_path, o.model_path, err,
                innsteer_status_name(st));
        goto done;
    }
    if (o.gate != INNSTEER_GATE_OFF && innsteer_steerer_set_gate(steerer, flow_id, o.gate) != INNSTEER_OK) {
        fprintf(stderr, "error: flow %s carries no gate parameters; use -g off\n", o.flow_path);
        goto done;
    }
    innsteer_steerer_set_threads(steerer, o.n_threads);
    if (o.path.set) {
        st = innsteer_steerer_set_path(steerer, o.path.path, o.path.min_rows, err, sizeof err);
        if (st != INNSTEER_OK) {
            fprintf(stderr, "error: INNSTEER_PATH: %s (%s)\n", err, innsteer_status_name(st));
            goto done;
        }
    }
    cparams.cb_eval = innsteer_eval_callback;
    cparams.cb_eval_user_data = steerer;
    c.ctx = llama_init_from_model(c.model, cparams);
    if (!c.ctx) {
        fprintf(stderr, "error: cannot create a llama context (n_ctx %d)\n", o.n_ctx);
        goto done;
    }
    c.sampler = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(c.sampler, llama_sampler_init_greedy());

    struct llama_chat_message history[2 * MAX_TURNS];
    char *replies[MAX_TURNS] = {0};
    char line[8192];
    int n_turns = 0;
    rc = 0;
    for (int turn = 0; rc == 0 && turn < MAX_TURNS; turn++) {
        const char *user;
        if (o.n_messages > 0) {
            if (turn >= o.n_messages) break;
            user = o.messages[turn];
        } else {
            if (!fgets(line, sizeof line, stdin)) break;
            line[strcspn(line, "\r\n")] = '\0';
            if (line[0] == '\0') continue;
            user = strdup(line);
        }
        history[2 * n_turns] = (struct llama_chat_message){"user", user};
        const char *prompt = format_chat(&c, history, 2 * n_turns + 1);
        if (!prompt) {
            rc = 1;
            break;
        }
        if (o.compare) {
            innsteer_steerer_set_active(steerer, false); /* bit-identical to no steering at all */
            char *plain = generate(&c, prompt, o.max_tokens);
            innsteer_steerer_set_active(steerer, true);
            if (!plain) {
                rc = 1;
                break;
            }
            printf("=== unsteered ===\n%s\n", plain);
            free(plain);
        }
        char *reply = generate(&c, prompt, o.max_tokens);
        if (!reply) {
            rc = 1;
            break;
        }
        printf("=== steered (strength %g) ===\n%s\n", strength, reply);
        fflush(stdout);
        replies[n_turns] = reply;
        history[2 * n_turns + 1] = (struct llama_chat_message){"assistant", reply};
        n_turns++;
    }
    if (rc == 0 && innsteer_steerer_last_error(steerer)[0]) {
        fprintf(stderr, "error: steering failed: %s\n", innsteer_steerer_last_error(steerer));
        rc = 1;
    }
    if (rc == 0 && n_turns > 0 && innsteer_steerer_layer_visits(steerer, innsteer_flow_site_layer(flow, 0)) == 0) {
        fprintf(stderr, "error: the model never computed l_out-%d: this architecture cannot be steered\n",
                innsteer_flow_site_layer(flow, 0));
        rc = 1;
    }
    for (int i = 0; i < n_turns; i++) {
        free(replies[i]);
        if (o.n_messages == 0) free((void *)history[2 * i].content);
    }

done:
    if (c.sampler) llama_sampler_free(c.sampler);
    if (c.ctx) llama_free(c.ctx); /* before the steerer: the context calls back into it */
    innsteer_steerer_free(steerer);
    innsteer_flow_free(flow);
    llama_model_free(c.model);
    llama_backend_free();
    free(c.prompt);
    free(o.messages);
    return rc;
}
