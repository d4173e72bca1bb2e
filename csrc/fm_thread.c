/*
 * fm_thread.c - the bounded thread pool and threads with a private fd table.
 *
 * Every thread started here blocks every signal (Python's handlers run on
 * its own threads) and, where asked, first takes a private fd table holding
 * only the fds it needs (fm__private_fd_table): a writable fd it opens never
 * reaches a child forked meanwhile by another thread (exec: ETXTBSY).
 */
#include "fm_internal.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#define MAX_THREADS 256

uint32_t fm__clamp_threads(uint32_t threads)
{
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (uint32_t)n : 1;
    }
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

struct pool_arg {
    void *(*fn)(void *);
    void *arg;
    const int *keep; /* the only fds a pool thread keeps in its table, or NULL */
};

/* Every pool thread first takes a private fd table (see fm__isolated): the
 * writable fds of copies never reach a child forked by another thread. */
static void *pool_main(void *p)
{
    struct pool_arg *a = p;
    if (a->keep != NULL)
        fm__private_fd_table(a->keep, FM_POOL_KEEP);
    return a->fn(a->arg);
}

void fm__run_pool(void *(*fn)(void *), void *arg, uint32_t n, const int *keep)
{
    pthread_t tid[MAX_THREADS];
    struct pool_arg a = {fn, arg, keep};
    uint32_t started = 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (uint32_t t = 0; t < n; t++) {
        if (pthread_create(&tid[started], NULL, pool_main, &a) != 0)
            break; /* fewer threads, same work */
        started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (started == 0)
        fn(arg);
    for (uint32_t t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
}

struct isolated {
    int (*fn)(void *);
    void *arg;
    const int *keep;
    int nkeep;
    int rc;
};

static void *isolated_main(void *p)
{
    struct isolated *i = p;
    fm__private_fd_table(i->keep, i->nkeep);
    i->rc = i->fn(i->arg);
    return NULL;
}

int fm__isolated(int (*fn)(void *), void *arg, const int *keep, int nkeep)
{
#ifdef __linux__
    struct isolated i = {fn, arg, keep, nkeep, 0};
    pthread_t tid;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&tid, NULL, isolated_main, &i);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) {
        pthread_join(tid, NULL);
        return i.rc;
    }
#else
    (void)keep;
    (void)nkeep;
#endif /* __linux__ */
    return fn(arg);
}
