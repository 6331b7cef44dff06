#include "batch_map.h"

#include "error.h"
#include "grow.h"

#include <stdlib.h>
#include <string.h>

void batch_map_free(batch_map *m) {
    if (!m) return;
    free(m->order);
    free(m->out_order);
    free(m->ub_start);
    free(m->ub_out);
    free(m->seq);
    free(m->slot);
    free(m->output);
    free(m->by_seq);
    free(m->used);
    memset(m, 0, sizeof *m);
}

static bool grow(batch_map *m, size_t n) {
    if (n <= m->cap) return true;
    size_t cap = m->cap ? m->cap : 64;
    while (cap < n) cap *= 2;
    void **const ints[] = {(void **)&m->order, (void **)&m->out_order, (void **)&m->ub_start, (void **)&m->ub_out,
                           (void **)&m->seq, (void **)&m->slot, (void **)&m->by_seq};
    void **const bytes[] = {(void **)&m->output, (void **)&m->used};
    /* ub_start and ub_out hold one entry more than there can be ubatches */
    if (!grow_arrays(ints, sizeof ints / sizeof ints[0], sizeof(int32_t) * (cap + 1))) return false;
    if (!grow_arrays(bytes, sizeof bytes / sizeof bytes[0], cap)) return false;
    m->cap = cap;
    return true;
}

static void split_simple(batch_map *m, int n_ubatch) {
    int n = m->n_tokens, u = 0;
    for (int i = 0; i < n; i++) m->order[i] = i;
    m->ub_start[0] = 0;
    for (int lo = 0; lo < n; lo += n_ubatch) m->ub_start[++u] = lo + n_ubatch < n ? lo + n_ubatch : n;
    m->n_ubatches = u;
}

/* llama_batch_allocr::split_equal(n_ubatch, sequential = true, n_keep_tail = 0) for tokens with
 * one sequence id each. */
static void split_equal(batch_map *m, int n_ubatch) {
    int n = m->n_tokens;
    /* counting sort by sequence: by_seq[seq_first[s] ..] are sequence s's tokens in batch order */
    memset(m->seq_first, 0, sizeof m->seq_first);
    for (int i = 0; i < n; i++) m->seq_first[m->seq[i] + 1]++;
    for (int s = 0; s < BATCH_MAX_SEQ; s++) m->seq_first[s + 1] += m->seq_first[s];
    memset(m->seq_taken, 0, sizeof m->seq_taken);
    for (int i = 0; i < n; i++) m->by_seq[m->seq_first[m->seq[i]] + m->seq_taken[m->seq[i]]++] = i;
    memset(m->seq_taken, 0, sizeof m->seq_taken);
    memset(m->used, 0, (size_t)(n > 0 ? n : 0));
    int pos = 0, u = 0, n_used = 0;
    m->ub_start[0] = 0;
    int32_t cur[BATCH_MAX_SEQ + 1];
    while (n_used < n) {
        /* the sequences of this ubatch: the first unused token's, then each id one higher */
        int n_seqs = 0, last = -1;
        for (int i = 0; i < n; i++) {
            if (m->used[i]) continue;
            int s = m->seq[i];
            bool taken = false;
            for (int k = 0; k < n_seqs && !taken; k++) taken = cur[k] == s;
            if (taken || (n_seqs > 0 && s != last + 1)) continue;
            cur[n_seqs++] = s;
            last = s;
            if (n_seqs > n_ubatch) break;
        }
        if (n_seqs == 0) break;
        /* as many tokens from each as all of them still have, within n_ubatch */
        int steps = 0;
        for (;;) {
            bool can = true;
            for (int k = 0; k < n_seqs && can; k++) {
                int s = cur[k];
                can = m->seq_taken[s] + steps < m->seq_first[s + 1] - m->seq_first[s];
            }
            if (!can) break;
            steps++;
            if ((steps + 1) * n_seqs > n_ubatch) break;
        }
        for (int k = 0; k < n_seqs; k++) {
            int s = cur[k];
            for (int j = 0; j < steps; j++) {
                int idx = m->by_seq[m->seq_first[s] + m->seq_taken[s] + j];
                m->order[pos++] = idx;
                m->used[idx] = 1;
            }
            m->seq_taken[s] += steps;
            n_used += steps;
        }
        m->ub_start[++u] = pos;
    }
    m->n_ubatches = u;
}

innsteer_status batch_map_fill(batch_map *m, int n_tokens, const int32_t *seq_ids, const int32_t *slots,
                               const int8_t *outputs, int n_ubatch, innsteer_split split, char *err, size_t err_size) {
    m->n_tokens = m->n_ubatches = 0;
    if (n_tokens < 1 || !seq_ids || !slots || n_ubatch < 1) {
        return set_error(err, err_size, INNSTEER_ERR_ARG, "a batch needs tokens, sequence ids, slots and n_ubatch >= 1");
    }
    if (split != INNSTEER_SPLIT_SIMPLE && split != INNSTEER_SPLIT_EQUAL) {
        return set_error(err, err_size, INNSTEER_ERR_ARG, "unknown split %d", (int)split);
    }
    for (int i = 0; i < n_tokens; i++) {
        if (seq_ids[i] < 0 || seq_ids[i] >= BATCH_MAX_SEQ) {
            return set_error(err, err_size, INNSTEER_ERR_ARG, "token %d: sequence id %d is outside 0..%d", i, seq_ids[i],
                             BATCH_MAX_SEQ - 1);
        }
    }
    if (!grow(m, (size_t)n_tokens)) return set_error(err, err_size, INNSTEER_ERR_NOMEM, "out of memory for %d tokens", n_tokens);
    m->n_tokens = n_tokens;
    memcpy(m->seq, seq_ids, sizeof(int32_t) * (size_t)n_tokens);
    memcpy(m->slot, slots, sizeof(int32_t) * (size_t)n_tokens);
    for (int i = 0; i < n_tokens; i++) m->output[i] = outputs ? (outputs[i] != 0) : (i == n_tokens - 1);
    if (split == INNSTEER_SPLIT_SIMPLE) {
        split_simple(m, n_ubatch);
    } else {
        split_equal(m, n_ubatch);
    }
    int k = 0;
    m->ub_out[0] = 0;
    for (int u = 0; u < m->n_ubatches; u++) {
        for (int r = m->ub_start[u]; r < m->ub_start[u + 1]; r++) {
            if (m->output[m->order[r]]) m->out_order[k++] = m->order[r];
        }
        m->ub_out[u + 1] = k;
    }
    return INNSTEER_OK;
}

const int32_t *batch_map_rows(const batch_map *m, int u, int64_t n_rows) {
    if (u < 0 || u >= m->n_ubatches) return NULL;
    if (n_rows == m->ub_start[u + 1] - m->ub_start[u]) return m->order + m->ub_start[u];
    if (n_rows == m->ub_out[u + 1] - m->ub_out[u]) return m->out_order + m->ub_out[u];
    return NULL;
}
