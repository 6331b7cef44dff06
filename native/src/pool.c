#include "pool.h"

bool pool_init(pool *p) {
    *p = (pool){0};
    if (pthread_mutex_init(&p->m, NULL) != 0) return false;
    if (pthread_cond_init(&p->go, NULL) != 0) {
        pthread_mutex_destroy(&p->m);
        return false;
    }
    if (pthread_cond_init(&p->done, NULL) != 0) {
        pthread_cond_destroy(&p->go);
        pthread_mutex_destroy(&p->m);
        return false;
    }
    return true;
}

void pool_stop(pool *p) {
    pthread_mutex_lock(&p->m);
    p->quit = true;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->m);
    for (int i = 0; i < p->n_started; i++) pthread_join(p->threads[i], NULL);
    p->n_started = 0;
    p->quit = false;
}

void pool_destroy(pool *p) {
    pool_stop(p);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->go);
    pthread_mutex_destroy(&p->m);
}

static void *worker_main(void *arg) {
    pool_worker *w = arg;
    pool *p = w->pool;
    unsigned seen = w->generation;
    pthread_mutex_lock(&p->m);
    for (;;) {
        while (!p->quit && p->generation == seen) pthread_cond_wait(&p->go, &p->m);
        if (p->quit) break;
        seen = p->generation;
        pool_job job = p->job;
        void *job_arg = p->arg;
        int n_parts = p->n_parts;
        pthread_mutex_unlock(&p->m);
        /* a pool started for more parts than this job has: the extra workers only check in */
        if (w->part < n_parts) job(job_arg, w->part, n_parts);
        pthread_mutex_lock(&p->m);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->m);
    return NULL;
}

bool pool_run(pool *p, int n_parts, pool_job job, void *arg) {
    while (p->n_started < n_parts - 1) {
        pool_worker *w = &p->workers[p->n_started];
        /* only the caller publishes jobs, so generation is stable here without the lock */
        *w = (pool_worker){.pool = p, .part = p->n_started + 1, .generation = p->generation};
        if (pthread_create(&p->threads[p->n_started], NULL, worker_main, w) != 0) return false;
        p->n_started++;
    }
    pthread_mutex_lock(&p->m);
    p->job = job;
    p->arg = arg;
    p->n_parts = n_parts;
    p->pending = p->n_started;
    p->generation++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->m);
    job(arg, 0, n_parts);
    pthread_mutex_lock(&p->m);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->m);
    pthread_mutex_unlock(&p->m);
    return true;
}
