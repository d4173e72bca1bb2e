/*
 * fm_file.c - single-file primitives: link, reflink, copy, and the durable
 * private-copy / write / publish recipe. A file that may be executed is
 * written on an fm__isolated thread (fm_thread.c).
 */
#include "fm_internal.h"

#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define COPY_BUF (128 * 1024)

void fm__tmpname(char buf[FM_TMPNAME_MAX])
{
    static _Atomic uint64_t seq;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t s = atomic_fetch_add(&seq, 1);
    uint64_t r = ((uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)ts.tv_sec << 20) ^
                 (s * 0xBF58476D1CE4E5B9ull) ^ (uint64_t)(uintptr_t)&ts;
    snprintf(buf, FM_TMPNAME_MAX, ".fm-tmp.%ld.%llu.%016llx", (long)getpid(), (unsigned long long)s,
             (unsigned long long)r);
}

/* Splits path into its directory part (copied into dir, "." if none) and
 * returns a pointer to the last component. -ENAMETOOLONG if it does not fit. */
static int split_path(const char *path, char dir[PATH_MAX], const char **base)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        strcpy(dir, ".");
        *base = path;
        return 0;
    }
    size_t n = (size_t)(slash - path);
    if (n + 1 > PATH_MAX)
        return -ENAMETOOLONG;
    if (n == 0) {
        strcpy(dir, "/");
    } else {
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    *base = slash + 1;
    return 0;
}

/* tmp = "<dir of path>/<unique temp name>" (or just the name). */
int fm__tmp_beside(const char *path, char *tmp, size_t size)
{
    char name[FM_TMPNAME_MAX];
    fm__tmpname(name);
    const char *slash = strrchr(path, '/');
    size_t n = slash == NULL ? 0 : (size_t)(slash - path) + 1;
    if (n + strlen(name) + 1 > size)
        return -ENAMETOOLONG;
    memcpy(tmp, path, n);
    strcpy(tmp + n, name);
    return 0;
}

int fm__fsync_parent(int dirfd, const char *path)
{
    char dir[PATH_MAX];
    const char *base;
    int rc = split_path(path, dir, &base);
    if (rc < 0)
        return rc;
    int fd = fm__openat(dirfd, dir, O_RDONLY | O_DIRECTORY, 0);
    if (fd < 0)
        return fd;
    rc = fm__fsync(fd);
    fm__close(fd);
    return rc;
}

int fm__open_src(int dirfd, const char *path, struct stat *st)
{
    int fd = fm__openat(dirfd, path, O_RDONLY | O_NOFOLLOW, 0);
    if (fd < 0)
        return fd;
    int rc = fm__fstat(fd, st);
    if (rc == 0 && !S_ISREG(st->st_mode))
        rc = S_ISDIR(st->st_mode) ? -EISDIR : -EINVAL;
    if (rc < 0) {
        fm__close(fd);
        return rc;
    }
    return fd;
}

static int create_excl(int dirfd, const char *path)
{
    return fm__openat(dirfd, path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
}

static int drop(int fd, int dirfd, const char *path, int err)
{
    fm__close(fd);
    fm__unlinkat(dirfd, path, 0);
    return err;
}

int fm__clone_create(int src_fd, int dst_dirfd, const char *dst)
{
    int rc = fm__injected(FM_SITE_REFLINK);
#ifdef __APPLE__
    if (rc == 0)
        rc = fm__fclonefileat(src_fd, dst_dirfd, dst);
    if (rc == 0) {
        int fd = fm__openat(dst_dirfd, dst, O_RDONLY | O_NOFOLLOW, 0);
        if (fd < 0)
            fm__unlinkat(dst_dirfd, dst, 0);
        return fd;
    }
#elif defined(__linux__)
    if (rc == 0) {
        int fd = create_excl(dst_dirfd, dst);
        if (fd < 0)
            return fd;
        rc = fm__ficlone(fd, src_fd);
        if (rc == 0)
            return fd;
        drop(fd, dst_dirfd, dst, rc);
    }
#else
    (void)src_fd;
    (void)dst_dirfd;
    (void)dst;
    if (rc == 0)
        rc = -ENOTSUP;
#endif /* platform */
    if (rc == -EOPNOTSUPP || rc == -EINVAL || rc == -ENOTTY || rc == -ENOSYS)
        rc = -ENOTSUP;
    return rc;
}

static int copy_rw(int src_fd, int dst_fd, int64_t off)
{
    char buf[COPY_BUF];
    for (;;) {
        int64_t n = fm__pread(src_fd, buf, sizeof(buf), off);
        if (n <= 0)
            return (int)n;
        for (int64_t done = 0; done < n;) {
            int64_t w = fm__pwrite(dst_fd, buf + done, (size_t)(n - done), off + done);
            if (w < 0)
                return (int)w;
            done += w;
        }
        off += n;
    }
}

/* copy_file_range (fault-injection site COPY) until EOF; read/write from
 * where it stopped when the kernel or filesystem cannot. */
static int copy_fd(int src_fd, int dst_fd)
{
    int64_t off = 0;
    for (;;) {
        int64_t n = fm__injected(FM_SITE_COPY);
        if (n == 0) {
            int64_t a = off, b = off;
            n = fm__copy_file_range(src_fd, &a, dst_fd, &b, 1 << 30);
        }
        if (n == 0)
            return 0;
        if (n > 0) {
            off += n;
            continue;
        }
        if (n == -EXDEV || n == -ENOSYS || n == -EINVAL || n == -EOPNOTSUPP || n == -EPERM ||
            n == -ETXTBSY)
            return copy_rw(src_fd, dst_fd, off);
        return (int)n;
    }
}

int fm__copy_create(int src_fd, int dst_dirfd, const char *dst)
{
    int fd = create_excl(dst_dirfd, dst);
    if (fd < 0)
        return fd;
    int rc = copy_fd(src_fd, fd);
    if (rc < 0)
        return drop(fd, dst_dirfd, dst, rc);
    return fd;
}

int32_t fm_link(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst)
{
    return fm__linkat(src_dirfd, src, dst_dirfd, dst);
}

/* Shared body of fm_reflink / fm_copy. */
static int32_t make_private(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                            uint32_t mode, int reflink)
{
    struct stat st;
    int sfd = fm__open_src(src_dirfd, src, &st);
    if (sfd < 0)
        return sfd;
    int fd = reflink ? fm__clone_create(sfd, dst_dirfd, dst) : fm__copy_create(sfd, dst_dirfd, dst);
    fm__close(sfd);
    if (fd < 0)
        return fd;
    int rc = fm__fchmod(fd, mode & 07777);
    if (rc < 0)
        return drop(fd, dst_dirfd, dst, rc);
    return fm__close(fd);
}

/* The arguments of the functions below, for running them via fm__isolated. */
struct file_call {
    enum { CALL_REFLINK, CALL_COPY, CALL_PRIVATE_COPY, CALL_DURABLE_WRITE } kind;
    int32_t src_dirfd, dst_dirfd;
    const char *src, *dst;
    uint32_t mode, flags;
    uint8_t *how;
    const uint8_t *buf;
    uint64_t len;
};

static int private_copy(const struct file_call *a);
static int durable_write(const struct file_call *a);

static int file_call(void *p)
{
    const struct file_call *a = p;
    switch (a->kind) {
    case CALL_REFLINK:
    case CALL_COPY:
        return make_private(a->src_dirfd, a->src, a->dst_dirfd, a->dst, a->mode,
                            a->kind == CALL_REFLINK);
    case CALL_PRIVATE_COPY:
        return private_copy(a);
    default:
        return durable_write(a);
    }
}

/* A file that may be executed is written on a thread with a private fd
 * table (ETXTBSY, see fm__isolated); others right here. */
static int32_t run_file_call(struct file_call *a)
{
    int keep[2] = {a->src_dirfd, a->dst_dirfd};
    if (a->mode & 0111)
        return fm__isolated(file_call, a, keep, 2);
    return file_call(a);
}

int32_t fm_reflink(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                   uint32_t mode)
{
    struct file_call a = {.kind = CALL_REFLINK,
                          .src_dirfd = src_dirfd,
                          .src = src,
                          .dst_dirfd = dst_dirfd,
                          .dst = dst,
                          .mode = mode};
    return run_file_call(&a);
}

int32_t fm_copy(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                uint32_t mode)
{
    struct file_call a = {.kind = CALL_COPY,
                          .src_dirfd = src_dirfd,
                          .src = src,
                          .dst_dirfd = dst_dirfd,
                          .dst = dst,
                          .mode = mode};
    return run_file_call(&a);
}

int fm__publish_step(int src_dirfd, const char *src, int dst_dirfd, const char *dst, uint32_t flags)
{
    int rc = fm__injected(FM_SITE_RENAME);
    if (rc < 0)
        return rc;
    if (!(flags & FM_F_NOREPLACE))
        return fm__renameat(src_dirfd, src, dst_dirfd, dst);
    rc = fm__renameat_noreplace(src_dirfd, src, dst_dirfd, dst);
    if (rc != -ENOSYS && rc != -EINVAL)
        return rc;
    /* No renameat2 here (old kernel, or a filesystem without it): link
     * refuses an existing name just the same. */
    rc = fm__linkat(src_dirfd, src, dst_dirfd, dst);
    if (rc == 0)
        fm__unlinkat(src_dirfd, src, 0);
    return rc;
}

int32_t fm_publish(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                   uint32_t flags)
{
    int rc = fm__publish_step(src_dirfd, src, dst_dirfd, dst, flags);
    if (rc == 0 && (flags & FM_F_FSYNC))
        rc = fm__fsync_parent(dst_dirfd, dst);
    return rc;
}

/* Finishes a temp file: fchmod, fsync, close, rename, fsync the directory.
 * Consumes fd; unlinks tmp on failure. */
static int finish_temp(int fd, int dst_dirfd, const char *tmp, const char *dst, uint32_t mode,
                       uint32_t flags)
{
    int rc = fm__fchmod(fd, mode & 07777);
    if (rc == 0 && (flags & FM_F_FSYNC))
        rc = fm__fsync(fd);
    if (rc < 0)
        return drop(fd, dst_dirfd, tmp, rc);
    rc = fm__close(fd);
    if (rc == 0)
        rc = fm__publish_step(dst_dirfd, tmp, dst_dirfd, dst, flags);
    if (rc < 0) {
        fm__unlinkat(dst_dirfd, tmp, 0);
        return rc;
    }
    if (flags & FM_F_FSYNC)
        rc = fm__fsync_parent(dst_dirfd, dst);
    return rc;
}

int32_t fm_private_copy(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                        uint32_t mode, uint32_t flags, uint8_t *how)
{
    struct file_call a = {.kind = CALL_PRIVATE_COPY,
                          .src_dirfd = src_dirfd,
                          .src = src,
                          .dst_dirfd = dst_dirfd,
                          .dst = dst,
                          .mode = mode,
                          .flags = flags,
                          .how = how};
    return run_file_call(&a);
}

static int private_copy(const struct file_call *a)
{
    int32_t src_dirfd = a->src_dirfd, dst_dirfd = a->dst_dirfd;
    const char *src = a->src, *dst = a->dst;
    uint32_t mode = a->mode, flags = a->flags;
    uint8_t *how = a->how;
    char tmp[PATH_MAX];
    struct stat st;
    int rc = fm__tmp_beside(dst, tmp, sizeof(tmp));
    if (rc < 0)
        return rc;
    int sfd = fm__open_src(src_dirfd, src, &st);
    if (sfd < 0)
        return sfd;
    uint8_t method = FM_HOW_REFLINK;
    int fd = -ENOTSUP;
    if (!(flags & FM_F_NO_REFLINK))
        fd = fm__clone_create(sfd, dst_dirfd, tmp);
    if (fd < 0 && !(flags & FM_F_REFLINK_FORCE) && (fd == -ENOTSUP || fd == -EXDEV)) {
        method = FM_HOW_COPY;
        fd = fm__copy_create(sfd, dst_dirfd, tmp);
    }
    fm__close(sfd);
    if (fd < 0)
        return fd;
    rc = finish_temp(fd, dst_dirfd, tmp, dst, mode, flags);
    if (rc == 0 && how != NULL)
        *how = method;
    return rc;
}

int32_t fm_durable_write(int32_t dst_dirfd, const char *dst, const uint8_t *buf, uint64_t len,
                         uint32_t mode, uint32_t flags)
{
    struct file_call a = {.kind = CALL_DURABLE_WRITE,
                          .dst_dirfd = dst_dirfd,
                          .dst = dst,
                          .mode = mode,
                          .flags = flags,
                          .buf = buf,
                          .len = len};
    return run_file_call(&a);
}

static int durable_write(const struct file_call *a)
{
    int32_t dst_dirfd = a->dst_dirfd;
    const char *dst = a->dst;
    const uint8_t *buf = a->buf;
    uint64_t len = a->len;
    uint32_t mode = a->mode, flags = a->flags;
    char tmp[PATH_MAX];
    int rc = fm__tmp_beside(dst, tmp, sizeof(tmp));
    if (rc < 0)
        return rc;
    int fd = create_excl(dst_dirfd, tmp);
    if (fd < 0)
        return fd;
    /* 1 MiB writes: one huge write(2) is several times slower here (page
     * cache pressure), and any size is a correct loop. */
    for (uint64_t done = 0; done < len;) {
        uint64_t chunk = len - done > (1u << 20) ? (1u << 20) : len - done;
        int64_t n = fm__write(fd, buf + done, (size_t)chunk);
        if (n < 0)
            return drop(fd, dst_dirfd, tmp, (int)n);
        done += (uint64_t)n;
    }
    return finish_temp(fd, dst_dirfd, tmp, dst, mode, flags);
}
