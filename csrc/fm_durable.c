/*
 * fm_durable.c - group commit: a batch of complete temp files is made
 * durable in one call (fsync of each on the pool, or one syncfs), then
 * published in one call (a rename per name, then one fsync per directory
 * that received a name). The durable recipe of fm_file.c, paid per batch.
 */
#include "fm_internal.h"

#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Splits a packed array of n NUL-terminated strings into pointers. */
static const char **unpack(const char *packed, uint32_t n)
{
    const char **out = malloc((n ? n : 1) * sizeof(*out));
    if (out == NULL)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        out[i] = packed;
        packed += strlen(packed) + 1;
    }
    return out;
}

static uint32_t pool_size(uint32_t threads, uint32_t items)
{
    uint32_t n = fm__clamp_threads(threads);
    return n < items ? n : items;
}

/* ---- fm_sync_batch ---- */

struct sync_ctx {
    int dirfd;
    const char **names;
    uint32_t n;
    uint32_t flags;
    int32_t *status;
    _Atomic uint32_t next;
};

static int sync_one(const struct sync_ctx *c, const char *name)
{
    int writeback = (c->flags & FM_SYNC_WRITEBACK) != 0;
    int rc = writeback ? 0 : fm__injected(FM_SITE_SYNC);
    if (rc < 0)
        return rc;
    int fd = fm__openat(c->dirfd, name, O_RDONLY | O_NOFOLLOW, 0);
    if (fd < 0)
        return fd;
    if (writeback) {
        rc = fm__start_writeback(fd);
        if (rc == -ENOTSUP || rc == -ENOSYS || rc == -EINVAL || rc == -ESPIPE)
            rc = 0; /* only a hint: the sync that follows does the work */
    } else {
        rc = fm__fsync(fd);
    }
    int crc = fm__close(fd);
    return rc < 0 ? rc : crc;
}

static void *sync_worker(void *p)
{
    struct sync_ctx *c = p;
    for (;;) {
        uint32_t i = atomic_fetch_add(&c->next, 1);
        if (i >= c->n)
            return NULL;
        c->status[i] = sync_one(c, c->names[i]);
    }
}

int32_t fm_sync_batch(int32_t dirfd, const char *names, uint32_t n, uint32_t flags,
                      uint32_t threads, int32_t *status)
{
    uint32_t mode = flags & (FM_SYNC_FSYNC | FM_SYNC_SYNCFS | FM_SYNC_WRITEBACK);
    if (mode != FM_SYNC_FSYNC && mode != FM_SYNC_SYNCFS && mode != FM_SYNC_WRITEBACK)
        return -EINVAL;
    if (n == 0)
        return 0;
    if (mode == FM_SYNC_SYNCFS) {
        int rc = fm__injected(FM_SITE_SYNC);
        if (rc == 0)
            rc = fm__syncfs(dirfd);
        for (uint32_t i = 0; i < n; i++)
            status[i] = rc;
        return rc;
    }
    const char **ptrs = unpack(names, n);
    if (ptrs == NULL)
        return -ENOMEM;
    struct sync_ctx c = {.dirfd = dirfd, .names = ptrs, .n = n, .flags = mode, .status = status};
    atomic_init(&c.next, 0);
    uint32_t workers = pool_size(threads, n);
    if (workers <= 1)
        sync_worker(&c);
    else
        fm__run_pool(sync_worker, &c, workers, NULL);
    free(ptrs);
    for (uint32_t i = 0; i < n; i++)
        if (status[i] < 0)
            return status[i];
    return 0;
}

/* ---- fm_publish_batch ---- */

struct dir_ref {
    const char *path; /* a destination name; its directory is path[0..len) */
    size_t len;       /* 0: the directory is dst_dirfd itself */
};

static int dir_cmp(const void *a, const void *b)
{
    const struct dir_ref *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->path, y->path, n);
    if (c != 0)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

struct dirsync_ctx {
    int dirfd;
    const struct dir_ref *dirs;
    uint32_t n;
    _Atomic uint32_t next;
    _Atomic int32_t first_err;
};

static int fsync_dir(int dirfd, const struct dir_ref *d)
{
    char path[PATH_MAX];
    if (d->len == 0) {
        strcpy(path, ".");
    } else {
        if (d->len + 1 > sizeof(path))
            return -ENAMETOOLONG;
        memcpy(path, d->path, d->len);
        path[d->len] = '\0';
    }
    int fd = fm__openat(dirfd, path, O_RDONLY | O_DIRECTORY, 0);
    if (fd < 0)
        return fd;
    int rc = fm__fsync(fd);
    fm__close(fd);
    return rc;
}

static void *dirsync_worker(void *p)
{
    struct dirsync_ctx *c = p;
    for (;;) {
        uint32_t i = atomic_fetch_add(&c->next, 1);
        if (i >= c->n)
            return NULL;
        int rc = fsync_dir(c->dirfd, &c->dirs[i]);
        int32_t none = 0;
        if (rc < 0)
            atomic_compare_exchange_strong(&c->first_err, &none, rc);
    }
}

/* fsyncs each distinct directory of the published names once. */
static int sync_dirs(int dirfd, const char **dsts, const int32_t *status, uint32_t n,
                     uint32_t threads)
{
    struct dir_ref *dirs = malloc((n ? n : 1) * sizeof(*dirs));
    if (dirs == NULL)
        return -ENOMEM;
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (status[i] != 0)
            continue;
        const char *slash = strrchr(dsts[i], '/');
        dirs[m].path = dsts[i];
        dirs[m].len = slash == NULL ? 0 : (size_t)(slash - dsts[i]);
        m++;
    }
    qsort(dirs, m, sizeof(*dirs), dir_cmp);
    uint32_t u = 0;
    for (uint32_t i = 0; i < m; i++)
        if (u == 0 || dir_cmp(&dirs[u - 1], &dirs[i]) != 0)
            dirs[u++] = dirs[i];
    struct dirsync_ctx c = {.dirfd = dirfd, .dirs = dirs, .n = u};
    atomic_init(&c.next, 0);
    atomic_init(&c.first_err, 0);
    uint32_t workers = pool_size(threads, u);
    if (workers <= 1)
        dirsync_worker(&c);
    else
        fm__run_pool(dirsync_worker, &c, workers, NULL);
    free(dirs);
    return atomic_load(&c.first_err);
}

int32_t fm_publish_batch(int32_t src_dirfd, const char *srcs, int32_t dst_dirfd, const char *dsts,
                         uint32_t n, uint32_t flags, uint32_t threads, int32_t *status)
{
    if (n == 0)
        return 0;
    const char **src = unpack(srcs, n);
    const char **dst = unpack(dsts, n);
    int32_t first = 0;
    if (src == NULL || dst == NULL) {
        first = -ENOMEM;
        goto out;
    }
    /* Renames one after the other: renames across directories serialize in
     * the kernel (s_vfs_rename_mutex) whatever the threads. */
    for (uint32_t i = 0; i < n; i++) {
        int rc = fm__publish_step(src_dirfd, src[i], dst_dirfd, dst[i], flags);
        status[i] = rc;
        if (rc < 0) {
            fm__unlinkat(src_dirfd, src[i], 0);
            if (first == 0 && rc != -EEXIST)
                first = rc;
        }
    }
    if (flags & FM_F_FSYNC) {
        int rc = sync_dirs(dst_dirfd, dst, status, n, threads);
        if (first == 0)
            first = rc;
    }
out:
    free(src);
    free(dst);
    return first;
}
