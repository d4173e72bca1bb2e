/*
 * fm_sys.c - thin system-call wrappers: the only place that reads errno.
 * Each returns >= 0 on success or -errno, and retries EINTR where repeating
 * the call is harmless.
 */
#include "fm_internal.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sched.h>
#include <sys/time.h>
#include <stdio.h> /* RENAME_NOREPLACE */
#ifdef __linux__
#include <linux/openat2.h>
#include <sys/vfs.h>
#ifndef FICLONE /* <linux/fs.h> clashes with glibc 2.36's <sys/mount.h> */
#define FICLONE _IOW(0x94, 9, int)
#endif /* FICLONE */
#endif /* __linux__ */
#ifdef __APPLE__
#include <sys/clonefile.h>
#endif /* __APPLE__ */

#define RETRY(expr)                                                                                \
    do {                                                                                           \
        long r_;                                                                                   \
        do {                                                                                       \
            r_ = (long)(expr);                                                                     \
        } while (r_ < 0 && errno == EINTR);                                                        \
        return r_ < 0 ? -errno : (int)r_;                                                          \
    } while (0)

#define RETRY64(expr)                                                                              \
    do {                                                                                           \
        int64_t r_;                                                                                \
        do {                                                                                       \
            r_ = (int64_t)(expr);                                                                  \
        } while (r_ < 0 && errno == EINTR);                                                        \
        return r_ < 0 ? -(int64_t)errno : r_;                                                      \
    } while (0)

int fm__openat(int dirfd, const char *path, int flags, unsigned mode)
{
    RETRY(openat(dirfd, path, flags | O_CLOEXEC, (mode_t)mode));
}

int fm__openat_beneath(int dirfd, const char *path)
{
#if defined(__linux__) && defined(SYS_openat2)
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    RETRY(syscall(SYS_openat2, dirfd, path, &how, sizeof(how)));
#else
    (void)dirfd;
    (void)path;
    return -ENOSYS;
#endif /* SYS_openat2 */
}

int fm__close(int fd)
{
    /* Never retried: Linux releases the fd even when close reports EINTR. */
    if (close(fd) < 0 && errno != EINTR)
        return -errno;
    return 0;
}

int fm__linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)
{
    RETRY(linkat(olddirfd, oldpath, newdirfd, newpath, 0));
}

int fm__symlinkat(const char *target, int dirfd, const char *path)
{
    RETRY(symlinkat(target, dirfd, path));
}

int fm__mkdirat(int dirfd, const char *path, unsigned mode)
{
    RETRY(mkdirat(dirfd, path, (mode_t)mode));
}

int fm__unlinkat(int dirfd, const char *path, int flags)
{
    RETRY(unlinkat(dirfd, path, flags));
}

int fm__renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)
{
    RETRY(renameat(olddirfd, oldpath, newdirfd, newpath));
}

int fm__renameat_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)
{
#if defined(__linux__) && defined(SYS_renameat2)
    RETRY(syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, RENAME_NOREPLACE));
#elif defined(__APPLE__) && defined(RENAME_EXCL)
    RETRY(renameatx_np(olddirfd, oldpath, newdirfd, newpath, RENAME_EXCL));
#else
    (void)olddirfd;
    (void)oldpath;
    (void)newdirfd;
    (void)newpath;
    return -ENOSYS;
#endif /* renameat2 */
}

int fm__fstat(int fd, struct stat *st)
{
    RETRY(fstat(fd, st));
}

int fm__fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
    RETRY(fstatat(dirfd, path, st, flags));
}

int fm__fchmod(int fd, unsigned mode)
{
    RETRY(fchmod(fd, (mode_t)mode));
}

int fm__fchmod_opath(int fd, unsigned mode)
{
#ifdef __linux__
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452 /* Linux 6.6; one number on every architecture */
#endif                    /* SYS_fchmodat2 */
    long r;
    do {
        r = syscall(SYS_fchmodat2, fd, "", (mode_t)mode, AT_EMPTY_PATH);
    } while (r < 0 && errno == EINTR);
    if (r == 0)
        return 0;
    if (errno != ENOSYS && errno != EINVAL)
        return -errno;
    /* Older kernels: the fd's magic link in /proc names exactly its inode. */
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    RETRY(chmod(path, (mode_t)mode));
#else
    RETRY(fchmod(fd, (mode_t)mode)); /* no O_PATH here: fd is an ordinary one */
#endif /* __linux__ */
}

int fm__fsync(int fd)
{
    RETRY(fsync(fd));
}

int fm__syncfs(int fd)
{
#ifdef __linux__
    RETRY(syncfs(fd));
#else
    (void)fd;
    return -ENOTSUP;
#endif /* __linux__ */
}

int fm__start_writeback(int fd)
{
#ifdef __linux__
    RETRY(sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE));
#else
    (void)fd;
    return -ENOTSUP;
#endif /* __linux__ */
}

int fm__fs_magic(int fd, uint64_t *magic)
{
    struct statfs sf;
    int rc;
    do {
        rc = fstatfs(fd, &sf);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
    *magic = (uint64_t)sf.f_type;
    return 0;
}

int fm__futimens_ns(int fd, int64_t mtime_ns)
{
    struct timespec ts[2];
    ts[0].tv_sec = (time_t)(mtime_ns / 1000000000);
    ts[0].tv_nsec = (long)(mtime_ns % 1000000000);
    ts[1] = ts[0];
    RETRY(futimens(fd, ts));
}

int64_t fm__read(int fd, void *buf, size_t len)
{
    RETRY64(read(fd, buf, len));
}

int64_t fm__pread(int fd, void *buf, size_t len, int64_t off)
{
    RETRY64(pread(fd, buf, len, (off_t)off));
}

int64_t fm__write(int fd, const void *buf, size_t len)
{
    RETRY64(write(fd, buf, len));
}

int64_t fm__pwrite(int fd, const void *buf, size_t len, int64_t off)
{
    RETRY64(pwrite(fd, buf, len, (off_t)off));
}

int64_t fm__copy_file_range(int in, int64_t *off_in, int out, int64_t *off_out, size_t len)
{
#if defined(__linux__) && defined(SYS_copy_file_range)
    loff_t a = (loff_t)*off_in, b = (loff_t)*off_out;
    int64_t r;
    do {
        r = (int64_t)syscall(SYS_copy_file_range, in, &a, out, &b, len, 0);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return -(int64_t)errno;
    *off_in = (int64_t)a;
    *off_out = (int64_t)b;
    return r;
#else
    (void)in;
    (void)off_in;
    (void)out;
    (void)off_out;
    (void)len;
    return -ENOSYS;
#endif /* copy_file_range */
}

int fm__ficlone(int dst_fd, int src_fd)
{
#if defined(__linux__) && defined(FICLONE)
    RETRY(ioctl(dst_fd, FICLONE, src_fd));
#else
    (void)dst_fd;
    (void)src_fd;
    return -ENOTSUP;
#endif /* FICLONE */
}

int fm__fclonefileat(int src_fd, int dst_dirfd, const char *dst)
{
#ifdef __APPLE__
    RETRY(fclonefileat(src_fd, dst_dirfd, dst, 0));
#else
    (void)src_fd;
    (void)dst_dirfd;
    (void)dst;
    return -ENOTSUP;
#endif /* __APPLE__ */
}

int fm__clonefileat(int src_dirfd, const char *src, int dst_dirfd, const char *dst)
{
#ifdef __APPLE__
    RETRY(clonefileat(src_dirfd, src, dst_dirfd, dst, CLONE_NOFOLLOW));
#else
    (void)src_dirfd;
    (void)src;
    (void)dst_dirfd;
    (void)dst;
    return -ENOTSUP;
#endif /* __APPLE__ */
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int fm__private_fd_table(const int *keep, int nkeep)
{
#ifdef __linux__
    int rc;
    do {
        rc = unshare(CLONE_FILES);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
#if defined(SYS_close_range)
    int k[8], n = 0;
    for (int i = 0; i < nkeep && n < 8; i++)
        if (keep[i] >= 0)
            k[n++] = keep[i];
    qsort(k, (size_t)n, sizeof(int), cmp_int);
    unsigned lo = 0;
    for (int i = 0; i <= n; i++) {
        unsigned hi = i < n ? (unsigned)k[i] : ~0u;
        if (hi > lo && syscall(SYS_close_range, lo, hi - 1, 0) < 0 && errno == ENOSYS)
            return 0; /* pre-5.9 kernel: the copies stay open until the thread ends */
        lo = hi + 1;
    }
#else
    (void)keep;
    (void)nkeep;
    (void)cmp_int;
#endif /* SYS_close_range */
    return 0;
#else
    (void)keep;
    (void)nkeep;
    (void)cmp_int;
    return -ENOTSUP;
#endif /* __linux__ */
}

int fm__dup(int fd)
{
    RETRY(fcntl(fd, F_DUPFD_CLOEXEC, 0));
}

int fm__read_dir(int fd, char **out, size_t *out_len)
{
    int dfd = fm__dup(fd);
    if (dfd < 0)
        return dfd;
    DIR *d = fdopendir(dfd);
    if (d == NULL) {
        int err = -errno;
        close(dfd);
        return err;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    int err = buf == NULL ? -ENOMEM : 0;
    while (err == 0) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (e == NULL) {
            err = -errno;
            break;
        }
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        size_t n = strlen(e->d_name) + 2;
        if (len + n > cap) {
            while (len + n > cap)
                cap *= 2;
            char *nb = realloc(buf, cap);
            if (nb == NULL) {
                err = -ENOMEM;
                break;
            }
            buf = nb;
        }
        buf[len] = (char)e->d_type;
        memcpy(buf + len + 1, e->d_name, n - 1);
        len += n;
    }
    closedir(d);
    if (err < 0) {
        free(buf);
        return err;
    }
    *out = buf;
    *out_len = len;
    return 0;
}

int fm__mount(const char *source, const char *target, const char *type, unsigned long flags,
              const char *data)
{
#ifdef __linux__
    RETRY(mount(source, target, type, flags, data));
#else
    (void)source;
    (void)target;
    (void)type;
    (void)flags;
    (void)data;
    return -ENOTSUP;
#endif /* __linux__ */
}

int fm__umount2(const char *target, int flags)
{
#ifdef __linux__
    RETRY(umount2(target, flags));
#else
    (void)target;
    (void)flags;
    return -ENOTSUP;
#endif /* __linux__ */
}
