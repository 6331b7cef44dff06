/* A small persistent thread pool that sleeps on a condition variable between jobs (no spinning).
 * The steerer runs it only while llama.cpp's own threads wait for the eval callback, so the two
 * never compete for cores. */
#ifndef INNSTEER_POOL_H
#define INNSTEER_POOL_H

#include <pthread.h>
#include <stdbool.h>

#define POOL_MAX_THREADS 32

/* One part of a job: the parts split the work between them by index. */
typedef void (*pool_job)(void *arg, int part, int n_parts);

struct pool;
typedef struct {
    struct pool *pool;
    int part;
    unsigned generation; /* the last job published before this worker started */
} pool_worker;

typedef struct pool {
    pthread_t threads[POOL_MAX_THREADS];
    pool_worker workers[POOL_MAX_THREADS];
    int n_started;
    pthread_mutex_t m;
    pthread_cond_t go, done;
    unsigned generation;
    int pending;
    bool quit;
    pool_job job;
    void *arg;
    int n_parts;
} pool;

/* false if the mutex or condition variables cannot be created (nothing to destroy then) */
bool pool_init(pool *p);
void pool_destroy(pool *p);
/* Joins the threads; the next pool_run starts them again. */
void pool_stop(pool *p);
/* Runs job(arg, part, n_parts) for every part in 0..n_parts-1 (n_parts <= POOL_MAX_THREADS) and
 * returns when all are done: part 0 on the calling thread, the others on the pool's threads,
 * started at the first run that needs them. Returns false, having run nothing, when a thread
 * cannot be started. One caller at a time: pool_run and pool_stop are not reentrant. */
bool pool_run(pool *p, int n_parts, pool_job job, void *arg);

#endif
