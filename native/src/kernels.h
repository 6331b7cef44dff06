/* Small dense kernels shared by the flow maps. Plain loops written so the compiler vectorises
 * them (eight independent partial sums: no -ffast-math needed). */
#ifndef INNSTEER_KERNELS_H
#define INNSTEER_KERNELS_H

#include "flow.h"

#include <math.h>
#include <stddef.h>

/* Eight partial sums: vectorisable, and the rounding error grows with n/8 instead of n. */
static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    }
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

static inline void matvec(const float *restrict m, const float *restrict bias, const float *restrict x, float *restrict y,
                          int rows, int cols) {
    for (int r = 0; r < rows; r++) y[r] = dot(m + (size_t)r * cols, x, cols) + (bias ? bias[r] : 0.0f);
}

/* Y[j] = M X[j] + bias for n vectors: each weight row is read once per block of vectors, so a
 * prompt batch is matrix-matrix work rather than n separate matrix-vector products. */
static inline void matmat(const float *restrict m, const float *restrict bias, const float *restrict x, size_t ldx,
                          float *restrict y, size_t ldy, int rows, int cols, int n) {
    for (int r = 0; r < rows; r++) {
        const float *w = m + (size_t)r * cols;
        float b = bias ? bias[r] : 0.0f;
        for (int j = 0; j < n; j++) y[(size_t)j * ldy + r] = dot(w, x + (size_t)j * ldx, cols) + b;
    }
}

/* x += basis^T (y - y0) for one row: moves x within the subspace only, the complement stays
 * bit-exact. */
static inline void subspace_lift(const flow_op *op, float *restrict x, const float *y, const float *y0, int n_embd) {
    for (int k = 0; k < op->rank; k++) {
        float d = y[k] - y0[k];
        if (d == 0.0f) continue;
        const float *u = op->basis + (size_t)k * n_embd;
        for (int i = 0; i < n_embd; i++) x[i] += d * u[i];
    }
}

static inline float activate(act_kind act, float v) {
    switch (act) {
        case ACT_RELU: return v > 0.0f ? v : 0.0f;
        case ACT_TANH: return tanhf(v);
        case ACT_SILU: return v / (1.0f + expf(-v));
    }
    return v;
}

#endif
