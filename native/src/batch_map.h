/* Which sequence each row of l_out-<layer> belongs to, when one llama_decode carries many
 * sequences. llama.cpp cuts a batch into ubatches before it builds a graph, and the rows of a
 * graph are that ubatch's tokens in its own order, so the map repeats llama.cpp's split
 * (llama-batch.cpp, llama_batch_allocr::split_simple and split_equal):
 *
 *   SIMPLE  (unified KV cache, one stream): consecutive runs of n_ubatch tokens in batch order.
 *   EQUAL   (one KV stream per sequence, sequential): each ubatch takes a run of consecutive
 *           sequence ids (the first unused token's sequence, then id + 1, ...), the same number
 *           of tokens from each, laid out sequence by sequence.
 *
 * Tokens carry one sequence id each. The last layer keeps only the output rows (the graph
 * selects them with inp_out_ids before the layer's output), so a ubatch has two row counts that
 * the callback can meet: all its tokens, or its outputs. */
#ifndef INNSTEER_BATCH_MAP_H
#define INNSTEER_BATCH_MAP_H

#include "innsteer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BATCH_MAX_SEQ 256 /* llama.cpp's LLAMA_MAX_SEQ */

typedef struct {
    int n_tokens, n_ubatches;
    size_t cap;        /* tokens the buffers hold */
    int32_t *order;    /* batch indices in ubatch order, ubatch after ubatch */
    int32_t *out_order;/* the output tokens' batch indices, in the same order */
    int32_t *ub_start; /* ubatch u: order[ub_start[u] .. ub_start[u + 1]) (n_ubatches + 1 entries) */
    int32_t *ub_out;   /* ubatch u: out_order[ub_out[u] .. ub_out[u + 1]) */
    int32_t *seq;      /* per batch index */
    int32_t *slot;     /* per batch index: the steering slot, -1 for none */
    int8_t *output;    /* per batch index */
    /* split_equal's scratch */
    int32_t *by_seq;   /* batch indices grouped by sequence, in batch order within one */
    int32_t seq_first[BATCH_MAX_SEQ + 1], seq_taken[BATCH_MAX_SEQ];
    uint8_t *used;
} batch_map;

void batch_map_free(batch_map *m);

/* Fills the map for a batch (copies the arrays; grows the buffers only when a batch is larger
 * than any before). outputs may be NULL (the last token only is an output, as llama_batch_get_one
 * does). INNSTEER_ERR_ARG with a message on a sequence id outside 0..BATCH_MAX_SEQ-1 or a bad size. */
innsteer_status batch_map_fill(batch_map *m, int n_tokens, const int32_t *seq_ids, const int32_t *slots,
                               const int8_t *outputs, int n_ubatch, innsteer_split split, char *err, size_t err_size);

/* The batch indices of ubatch u's rows when the tensor has n_rows rows (all tokens, or the
 * outputs at the last layer); NULL when n_rows fits neither. */
const int32_t *batch_map_rows(const batch_map *m, int u, int64_t n_rows);

#endif
