/*
 * fm_internal.h - helpers shared by the C core's files (names fm__*).
 * Not part of the ABI; never fed to cffi.
 *
 * One section per defining file, in layer order. The files form a DAG (no
 * file calls into one listed after it; tests/test_layout_c.py checks it):
 *   fm_sys.c     syscall wrappers, the only reader of errno  calls: -
 *   fm_inject.c  fault injection (tests)                     calls: -
 *   fm_thread.c  bounded pool, private-fd-table threads      calls: sys
 *   fm_file.c    single-file primitives, durable recipe      calls: sys inject thread
 *   fm_durable.c group commit: batch sync and publish       calls: sys inject thread file
 *   fm_exec.c    plan executor, benchmark floor              calls: sys inject thread file
 *   fm_probe.c   version, capabilities, probes               calls: sys file
 *   fm_walk.c    remove_tree                                 calls: sys
 *   fm_mount.c   overlay mounts, clone_tree                  calls: sys
 *   fm_decode.c  Directory messages decoded and validated    calls: -
 * The last six define no fm__ helper, so they have no section here.
 */
#ifndef FM_INTERNAL_H
#define FM_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <errno.h>

#include "fastmat.h"

#ifndef O_PATH
#define O_PATH 0 /* macOS: a read-only fd does the job of an O_PATH one */
#endif

#define FM_TMPNAME_MAX 64

/* ---- fm_sys.c: the only code that reads errno. Each returns >= 0 or
 * -errno and retries EINTR where the call can be repeated. ---- */
int fm__openat(int dirfd, const char *path, int flags, unsigned mode);
int fm__openat_beneath(int dirfd, const char *path); /* openat2, -ENOSYS if absent */
int fm__close(int fd);
int fm__linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath);
int fm__symlinkat(const char *target, int dirfd, const char *path);
int fm__mkdirat(int dirfd, const char *path, unsigned mode);
int fm__unlinkat(int dirfd, const char *path, int flags);
int fm__renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath);
int fm__renameat_noreplace(int olddirfd, const char *oldpath, int newdirfd,
                           const char *newpath); /* -ENOSYS/-EINVAL if unsupported */
int fm__fstat(int fd, struct stat *st);
int fm__fstatat(int dirfd, const char *path, struct stat *st, int flags);
int fm__fchmod(int fd, unsigned mode);
int fm__fchmod_opath(int fd, unsigned mode); /* fd may be O_PATH (Linux) */
int fm__fsync(int fd);
int fm__syncfs(int fd); /* -ENOTSUP off Linux */
/* sync_file_range(SYNC_FILE_RANGE_WRITE) of the whole file: starts its
 * writeback, waits for nothing, makes nothing durable. -ENOTSUP off Linux. */
int fm__start_writeback(int fd);
int fm__fs_magic(int fd, uint64_t *magic);     /* fstatfs f_type */
int fm__futimens_ns(int fd, int64_t mtime_ns); /* atime = mtime */
int64_t fm__read(int fd, void *buf, size_t len);
int64_t fm__pread(int fd, void *buf, size_t len, int64_t off);
int64_t fm__write(int fd, const void *buf, size_t len);
int64_t fm__pwrite(int fd, const void *buf, size_t len, int64_t off);
int64_t fm__copy_file_range(int in, int64_t *off_in, int out, int64_t *off_out, size_t len);
int fm__ficlone(int dst_fd, int src_fd);
int fm__fclonefileat(int src_fd, int dst_dirfd, const char *dst);
int fm__clonefileat(int src_dirfd, const char *src, int dst_dirfd, const char *dst);
int fm__dup(int fd);
/* This thread gets its own fd table (unshare(CLONE_FILES), Linux) holding
 * only the fds in keep (at most 8; negative ones ignored): the copies of the
 * process's other fds are closed in it at once (close_range). */
int fm__private_fd_table(const int *keep, int nkeep);
/* Reads every entry of the directory fd (not closed) into a packed buffer of
 * records "<d_type byte><name>\0"; *out is malloc'ed (caller frees). */
int fm__read_dir(int fd, char **out, size_t *out_len);
int fm__mount(const char *source, const char *target, const char *type, unsigned long flags,
              const char *data);
int fm__umount2(const char *target, int flags);

/* ---- fm_inject.c: fault injection (tests) ---- */
/* 0, or the injected negative errno when a pending injection at `site` fires. */
int32_t fm__injected(uint32_t site);

/* ---- fm_thread.c: the bounded pool and private-fd-table threads ---- */
#define FM_POOL_KEEP 3 /* fds a pool thread keeps in its table (fm__run_pool) */
/* threads, or the online cores for 0, clamped to [1, 256]. */
uint32_t fm__clamp_threads(uint32_t threads);
/* Runs fn(arg) on n new threads (n <= fm__clamp_threads' bound) and waits
 * for them; when not even one can be created, the caller does the work.
 * With keep (FM_POOL_KEEP fds, negative ones ignored) each thread first
 * takes a private fd table holding only those; NULL (fn opens no fd) skips
 * that. Pool threads block every signal so that Python's handlers run on
 * its own threads. */
void fm__run_pool(void *(*fn)(void *), void *arg, uint32_t n, const int *keep);
/* Runs fn(arg) on a short-lived thread with a private file-descriptor table
 * holding only the fds in keep (fm__private_fd_table) and returns its
 * result: a child forked meanwhile by another thread cannot inherit the
 * writable fds fn opens, so exec of the file fn wrote never fails with
 * ETXTBSY; and the thread holds no copy of the process's other fds (a copy
 * would keep another thread's writable file open after its close). POSIX
 * locks are owned per table: closing copies releases none of the
 * process's locks. Runs fn directly where that is impossible. */
int fm__isolated(int (*fn)(void *), void *arg, const int *keep, int nkeep);

/* ---- fm_file.c: single-file primitives ---- */
/* Opens src for reading (O_NOFOLLOW); -EISDIR / -EINVAL unless a regular file. */
int fm__open_src(int dirfd, const char *path, struct stat *st);
/* Creates dst (O_EXCL, mode 0600) as a reflink of src_fd; returns the new fd
 * or -ENOTSUP / -EXDEV / -errno; dst is removed on failure. */
int fm__clone_create(int src_fd, int dst_dirfd, const char *dst);
/* The same as a byte copy (copy_file_range, else read/write). */
int fm__copy_create(int src_fd, int dst_dirfd, const char *dst);
/* Writes a unique temp name ".fm-tmp.<pid>.<seq>.<rand>" into buf. */
void fm__tmpname(char buf[FM_TMPNAME_MAX]);
/* tmp = "<directory part of path>/<unique temp name>"; -ENAMETOOLONG. */
int fm__tmp_beside(const char *path, char *tmp, size_t size);
/* fsyncs the directory containing dirfd/path. */
int fm__fsync_parent(int dirfd, const char *path);
/* The rename step of the durable recipe (fault-injection site RENAME):
 * renameat2 RENAME_NOREPLACE with FM_F_NOREPLACE (link + unlink where it is
 * missing; -EEXIST when dst exists), plain renameat otherwise. */
int fm__publish_step(int src_dirfd, const char *src, int dst_dirfd, const char *dst,
                     uint32_t flags);

#endif /* FM_INTERNAL_H */
