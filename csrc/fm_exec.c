/*
 * fm_exec.c - the plan executor and the benchmark floor.
 *
 * With FM_EXEC_CHECK_SRCS the pool first checks every entry's src (nothing
 * is created if one fails). Directories are then created, in plan order
 * (parents before children). Entries are cut into chunks that never span
 * two directories; worker threads claim chunks from one atomic counter,
 * resolve the chunk's directory once (openat2 RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS, or component-wise O_NOFOLLOW) and do its entries
 * relative to that fd (its path rebuilt from the plan's names: memory stays
 * linear in the sum of the names, never of the paths). After the links, one
 * getdents per directory checks that every LINK made a regular file. A cancel
 * flag is read between chunks. The threads are fm_thread.c's bounded pool; the
 * single-file primitives (open, reflink, copy, temp names) are fm_file.c's.
 */
#include "fm_internal.h"

#include <dirent.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_CHUNK 64
#define STRIPES 64
#define LINK_RETRIES 3 /* link_src */

/* Serializes EMLINK rotations of the same source (hashed by path). */
static pthread_mutex_t rotate_lock[STRIPES] = {[0 ... STRIPES - 1] = PTHREAD_MUTEX_INITIALIZER};
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* A child forked while a pool thread held a rotation lock would find it held
 * forever (the holder does not exist there): the child starts with fresh ones. */
static void reinit_rotate_locks(void)
{
    for (int i = 0; i < STRIPES; i++)
        pthread_mutex_init(&rotate_lock[i], NULL);
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, reinit_rotate_locks);
}

static _Atomic int no_openat2;

struct ctx {
    int dest_dirfd, src_dirfd, tmp_dirfd;
    const struct fm_plan *p;
    uint32_t flags;
    struct fm_exec_ctl *ctl; /* the caller's cancel flag and progress counter, or NULL */
    const char **dir_name;
    const char **name; /* per entry */
    const char **src;  /* per entry */
    uint32_t *chunk;   /* chunk c is entries [chunk[c], chunk[c + 1]) */
    uint32_t n_chunks;
    uint32_t *link_dirs; /* directories holding LINK entries (the link check) */
    uint32_t n_link_dirs;
    uint32_t *dir_first; /* per directory: its first entry (UINT32_MAX: none) */
    _Atomic uint32_t next_chunk;
    _Atomic int stop;
    _Atomic int no_reflink;
    int32_t *status;
    uint8_t *how;
    int32_t *dir_status;
};

static int valid_name(const char *s)
{
    if (s[0] == '\0' || strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return 0;
    return strchr(s, '/') == NULL;
}

/* Checks the plan and fills the per-directory / per-entry string pointers
 * (each array may be NULL). Returns 0 or -EINVAL. */
static int check_plan(const struct fm_plan *p, const char **dir_name, const char **name,
                      const char **src)
{
    if (p == NULL || p->n_dirs == 0 || p->dir_parent == NULL || p->dir_names == NULL)
        return -EINVAL;
    if (p->dir_parent[0] != -1 || p->dir_mode > 07777)
        return -EINVAL;
    if (p->n_entries > 0 && (p->op == NULL || p->entry_dir == NULL || p->mode == NULL ||
                             p->names == NULL || p->srcs == NULL))
        return -EINVAL;
    const char *s = p->dir_names;
    if (*s != '\0')
        return -EINVAL;
    if (dir_name != NULL)
        dir_name[0] = s;
    s++;
    for (uint32_t d = 1; d < p->n_dirs; d++) {
        if (p->dir_parent[d] < 0 || (uint32_t)p->dir_parent[d] >= d || !valid_name(s))
            return -EINVAL;
        if (dir_name != NULL)
            dir_name[d] = s;
        s += strlen(s) + 1;
    }
    uint8_t *seen = calloc(p->n_dirs, 1);
    if (seen == NULL)
        return -ENOMEM;
    const char *n = p->names, *t = p->srcs;
    int rc = 0;
    for (uint32_t i = 0; i < p->n_entries && rc == 0; i++) {
        int32_t d = p->entry_dir[i];
        if (p->op[i] < FM_OP_LINK || p->op[i] > FM_OP_COPY || d < 0 || (uint32_t)d >= p->n_dirs ||
            p->mode[i] > 07777 || !valid_name(n)) {
            rc = -EINVAL;
            break;
        }
        if (i == 0 || p->entry_dir[i - 1] != d) {
            if (seen[d]) /* entries of a directory must be contiguous */
                rc = -EINVAL;
            seen[d] = 1;
        }
        if (p->op[i] != FM_OP_EMPTY && *t == '\0')
            rc = -EINVAL;
        if (name != NULL)
            name[i] = n;
        if (src != NULL)
            src[i] = t;
        n += strlen(n) + 1;
        t += strlen(t) + 1;
    }
    free(seen);
    return rc;
}

int32_t fm_plan_check(const struct fm_plan *plan)
{
    return check_plan(plan, NULL, NULL, NULL);
}

/* Builds dir_path[d] for every directory into one buffer (the floor only: its
 * paths are precomputed before the clock starts). */
static int build_dir_paths(const struct fm_plan *p, const char **dir_name, char **dir_path,
                           char **buf_out)
{
    size_t *len = malloc(p->n_dirs * sizeof(*len));
    if (len == NULL)
        return -ENOMEM;
    size_t total = 1;
    len[0] = 0;
    for (uint32_t d = 1; d < p->n_dirs; d++) {
        size_t pl = len[p->dir_parent[d]];
        len[d] = (pl ? pl + 1 : 0) + strlen(dir_name[d]);
        total += len[d] + 1;
    }
    char *buf = malloc(total);
    if (buf == NULL) {
        free(len);
        return -ENOMEM;
    }
    char *w = buf;
    *w++ = '\0';
    dir_path[0] = buf;
    for (uint32_t d = 1; d < p->n_dirs; d++) {
        const char *pp = dir_path[p->dir_parent[d]];
        size_t pl = len[p->dir_parent[d]];
        dir_path[d] = w;
        if (pl) {
            memcpy(w, pp, pl);
            w[pl] = '/';
            w += pl + 1;
        }
        strcpy(w, dir_name[d]);
        w += strlen(dir_name[d]) + 1;
    }
    free(len);
    *buf_out = buf;
    return 0;
}

/* Opens dest_dirfd/path (a directory strictly below it) without following
 * any symlink. Returns an O_PATH fd or -errno. */
static int open_beneath(int dest_dirfd, const char *path)
{
    if (!atomic_load_explicit(&no_openat2, memory_order_relaxed)) {
        int fd = fm__openat_beneath(dest_dirfd, path);
        if (fd != -ENOSYS && fd != -EPERM)
            return fd;
        atomic_store(&no_openat2, 1); /* pre-5.6 kernel, or a seccomp filter */
    }
    char comp[NAME_MAX + 1];
    int cur = dest_dirfd;
    const char *s = path;
    while (*s != '\0') {
        const char *e = strchr(s, '/');
        size_t n = e == NULL ? strlen(s) : (size_t)(e - s);
        if (n > NAME_MAX) {
            if (cur != dest_dirfd)
                fm__close(cur);
            return -ENAMETOOLONG;
        }
        memcpy(comp, s, n);
        comp[n] = '\0';
        int fd = fm__openat(cur, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW, 0);
        if (cur != dest_dirfd)
            fm__close(cur);
        if (fd < 0)
            return fd;
        cur = fd;
        s += n + (e != NULL);
    }
    return cur == dest_dirfd ? fm__dup(cur) : cur;
}

/* Writes directory d's path below the destination ("a/b"; "" for 0) into buf:
 * 0, or -ENAMETOOLONG when it does not fit in size bytes. */
static int path_of_dir(const struct ctx *c, uint32_t d, char *buf, size_t size)
{
    size_t len = 0;
    for (uint32_t x = d; x != 0; x = (uint32_t)c->p->dir_parent[x])
        len += strlen(c->dir_name[x]) + 1; /* a '/' before it, or the final NUL */
    if (len > size || size == 0)
        return -ENAMETOOLONG;
    size_t end = len ? len - 1 : 0;
    buf[end] = '\0';
    for (uint32_t x = d; x != 0; x = (uint32_t)c->p->dir_parent[x]) {
        size_t n = strlen(c->dir_name[x]);
        end -= n;
        memcpy(buf + end, c->dir_name[x], n);
        if (end > 0)
            buf[--end] = '/';
    }
    return 0;
}

static int dir_fd(struct ctx *c, uint32_t d)
{
    if (d == 0)
        return c->dest_dirfd;
    char path[PATH_MAX];
    int rc = path_of_dir(c, d, path, sizeof(path));
    return rc < 0 ? rc : open_beneath(c->dest_dirfd, path);
}

static void put_dir_fd(struct ctx *c, int fd)
{
    if (fd >= 0 && fd != c->dest_dirfd)
        fm__close(fd);
}

/* A private reflink-or-copy of src at dfd/name with mode and mtime.
 * *method gets FM_HOW_REFLINK or FM_HOW_COPY. */
static int private_file(struct ctx *c, int sdirfd, const char *src, int dfd, const char *name,
                        uint32_t mode, int64_t mtime_ns, uint8_t *method)
{
    struct stat st;
    int sfd = fm__open_src(sdirfd, src, &st);
    if (sfd < 0)
        return sfd;
    int fd = -ENOTSUP;
    *method = FM_HOW_REFLINK;
    if (!atomic_load_explicit(&c->no_reflink, memory_order_relaxed)) {
        fd = fm__clone_create(sfd, dfd, name);
        if (fd == -ENOTSUP || fd == -EXDEV)
            atomic_store(&c->no_reflink, 1);
    }
    if (fd == -ENOTSUP || fd == -EXDEV) {
        *method = FM_HOW_COPY;
        fd = fm__copy_create(sfd, dfd, name);
    }
    fm__close(sfd);
    if (fd < 0)
        return fd;
    int rc = fm__fchmod(fd, mode);
    if (rc == 0 && mtime_ns >= 0)
        rc = fm__futimens_ns(fd, mtime_ns);
    int rc2 = fm__close(fd);
    if (rc == 0)
        rc = rc2;
    if (rc < 0)
        fm__unlinkat(dfd, name, 0);
    return rc;
}

static uint32_t stripe_of(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h % STRIPES;
}

/* linkat of a CAS name. ENOENT is tried again a few times: a link can find
 * an inode that loses its last name before it is linked, when another
 * process's EMLINK rotation renames a fresh copy over the same name (the name
 * itself never disappears). A blob really absent costs the retries only. */
static int link_src(struct ctx *c, const char *src, int dfd, const char *name)
{
    int rc = fm__linkat(c->src_dirfd, src, dfd, name);
    for (int k = 0; rc == -ENOENT && k < LINK_RETRIES; k++)
        rc = fm__linkat(c->src_dirfd, src, dfd, name);
    return rc;
}

/* EMLINK: replaces src by a fresh private copy of itself (same mode, bytes
 * and mtime; the existing links keep the old inode), then links again.
 * Under the lock, a real EMLINK first retries the link: another thread may
 * have rotated src meanwhile (an injected one may not: the retry would
 * succeed). *rotated tells whether this call made the copy. */
static int rotate_and_link(struct ctx *c, const char *src, int dfd, const char *name, int injected,
                           int *rotated)
{
    struct stat now;
    char tmp[PATH_MAX];
    int tdir = c->tmp_dirfd >= 0 ? c->tmp_dirfd : c->src_dirfd;
    pthread_mutex_t *lock = &rotate_lock[stripe_of(src)];
    pthread_mutex_lock(lock);
    int rc = injected ? -EMLINK : link_src(c, src, dfd, name);
    if (rc != -EMLINK)
        goto out;
    rc = fm__fstatat(c->src_dirfd, src, &now, AT_SYMLINK_NOFOLLOW);
    if (rc < 0)
        goto out;
    if (c->tmp_dirfd >= 0)
        fm__tmpname(tmp);
    else if ((rc = fm__tmp_beside(src, tmp, sizeof(tmp))) < 0)
        goto out;
#ifdef __APPLE__
    int64_t mtime = (int64_t)now.st_mtimespec.tv_sec * 1000000000 + now.st_mtimespec.tv_nsec;
#else
    int64_t mtime = (int64_t)now.st_mtim.tv_sec * 1000000000 + now.st_mtim.tv_nsec;
#endif /* __APPLE__ */
    uint8_t method;
    rc = private_file(c, c->src_dirfd, src, tdir, tmp, now.st_mode & 07777, mtime, &method);
    if (rc < 0)
        goto out;
    /* The rotated file stands in for a CAS blob: durable before it is named. */
    int fd = fm__openat(tdir, tmp, O_RDONLY | O_NOFOLLOW, 0);
    rc = fd < 0 ? fd : fm__fsync(fd);
    if (fd >= 0)
        fm__close(fd);
    if (rc == 0)
        rc = fm__renameat(tdir, tmp, c->src_dirfd, src);
    if (rc < 0) {
        fm__unlinkat(tdir, tmp, 0);
        goto out;
    }
    *rotated = 1;
    rc = link_src(c, src, dfd, name);
out:
    pthread_mutex_unlock(lock);
    return rc;
}

static int do_entry(struct ctx *c, int dfd, uint32_t i, uint8_t *how)
{
    const struct fm_plan *p = c->p;
    const char *name = c->name[i], *src = c->src[i];
    int64_t mtime = p->mtime_ns != NULL ? p->mtime_ns[i] : -1;
    uint8_t method = FM_HOW_NONE;
    int rc, fd, injected;

    switch (p->op[i]) {
    case FM_OP_LINK:
        rc = injected = fm__injected(FM_SITE_LINK);
        if (rc == 0)
            rc = link_src(c, src, dfd, name);
        if (rc == 0) {
            *how = FM_HOW_LINK;
        } else if (rc == -EXDEV || rc == -EPERM) {
            /* another filesystem, or a source not ours under protected_hardlinks */
            uint8_t why = rc == -EXDEV ? FM_HOW_XDEV : FM_HOW_DENIED;
            rc = private_file(c, c->src_dirfd, src, dfd, name, p->mode[i], mtime, &method);
            *how = rc == 0 ? (uint8_t)(why | method) : FM_HOW_NONE;
        } else if (rc == -EMLINK) {
            int rotated = 0;
            rc = rotate_and_link(c, src, dfd, name, injected != 0, &rotated);
            *how = rc == 0 ? (uint8_t)(FM_HOW_LINK | (rotated ? FM_HOW_ROTATED : 0)) : 0;
        }
        return rc;
    case FM_OP_SYMLINK:
        rc = fm__injected(FM_SITE_SYMLINK);
        if (rc == 0)
            rc = fm__symlinkat(src, dfd, name);
        if (rc == 0)
            *how = FM_HOW_SYMLINK;
        return rc;
    case FM_OP_EMPTY:
        /* Created read-only: no writable fd to a maybe-executable inode. */
        fd = fm__openat(dfd, name, O_RDONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0);
        if (fd < 0)
            return fd;
        rc = fm__fchmod(fd, p->mode[i]);
        if (rc == 0 && mtime >= 0)
            rc = fm__futimens_ns(fd, mtime);
        fm__close(fd);
        if (rc < 0)
            fm__unlinkat(dfd, name, 0);
        else
            *how = FM_HOW_CREATE;
        return rc;
    default: /* FM_OP_COPY */
        rc = private_file(c, c->src_dirfd, src, dfd, name, p->mode[i], mtime, &method);
        if (rc == 0)
            *how = method;
        return rc;
    }
}

static void fail(struct ctx *c)
{
    atomic_store(&c->stop, 1);
}

static int cancelled(const struct ctx *c)
{
    return c->ctl != NULL && __atomic_load_n(&c->ctl->cancel, __ATOMIC_RELAXED) != 0;
}

static int stopped(struct ctx *c)
{
    if (cancelled(c))
        return 1;
    return !(c->flags & FM_EXEC_KEEP_GOING) && atomic_load_explicit(&c->stop, memory_order_relaxed);
}

/* The src of a LINK / COPY entry must be a regular file: 0 or -errno (the
 * errno of fm__open_src for a non-regular one). */
static int check_src(struct ctx *c, uint32_t i)
{
    uint8_t op = c->p->op[i];
    if (op != FM_OP_LINK && op != FM_OP_COPY)
        return 0;
    struct stat st;
    int rc = fm__fstatat(c->src_dirfd, c->src[i], &st, AT_SYMLINK_NOFOLLOW);
    if (rc < 0 || S_ISREG(st.st_mode))
        return rc;
    return S_ISLNK(st.st_mode) ? -ELOOP : S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
}

/* FM_EXEC_CHECK_SRCS: every chunk, no early stop (every failing entry gets
 * its status); a failure sets c->stop, so nothing is created after. */
static void *check_worker(void *arg)
{
    struct ctx *c = arg;
    for (;;) {
        uint32_t k = atomic_fetch_add(&c->next_chunk, 1);
        if (k >= c->n_chunks)
            break;
        for (uint32_t i = c->chunk[k]; i < c->chunk[k + 1]; i++) {
            int rc = check_src(c, i);
            if (rc < 0) {
                c->status[i] = rc;
                atomic_store(&c->stop, 1); /* KEEP_GOING or not */
            }
        }
    }
    return NULL;
}

static void *worker(void *arg)
{
    struct ctx *c = arg;
    const struct fm_plan *p = c->p;
    int64_t cur_dir = -1;
    int fd = -1;
    while (!stopped(c)) {
        uint32_t k = atomic_fetch_add(&c->next_chunk, 1);
        if (k >= c->n_chunks)
            break;
        uint32_t a = c->chunk[k], b = c->chunk[k + 1];
        uint32_t d = (uint32_t)p->entry_dir[a];
        if (c->dir_status[d] != 0)
            continue; /* its entries stay -ECANCELED */
        if (cur_dir != d) {
            put_dir_fd(c, fd);
            fd = dir_fd(c, d);
            cur_dir = d;
        }
        uint32_t i = a;
        for (; i < b && !stopped(c); i++) {
            int rc = fd < 0 ? fd : do_entry(c, fd, i, &c->how[i]);
            c->status[i] = rc;
            if (rc < 0)
                fail(c);
        }
        if (c->ctl != NULL)
            __atomic_fetch_add(&c->ctl->done, (uint64_t)(i - a), __ATOMIC_RELAXED);
    }
    put_dir_fd(c, fd);
    return NULL;
}

/* Creates directories 1..n-1 in plan order. */
static void make_dirs(struct ctx *c)
{
    const struct fm_plan *p = c->p;
    int64_t cur = -1;
    int pfd = -1, check_mode = 1, need_chmod = 0;
    for (uint32_t d = 1; d < p->n_dirs; d++) {
        uint32_t parent = (uint32_t)p->dir_parent[d];
        if (c->dir_status[parent] != 0 || stopped(c))
            continue; /* stays -ECANCELED */
        if (cur != parent) {
            put_dir_fd(c, pfd);
            pfd = dir_fd(c, parent);
            cur = parent;
        }
        int rc = pfd < 0 ? pfd : fm__injected(FM_SITE_MKDIR);
        if (rc == 0)
            rc = fm__mkdirat(pfd, c->dir_name[d], p->dir_mode);
        if (rc == 0 && check_mode) {
            /* The umask may have stripped bits: find out once, on the first. */
            struct stat st;
            rc = fm__fstatat(pfd, c->dir_name[d], &st, AT_SYMLINK_NOFOLLOW);
            need_chmod = rc == 0 && (st.st_mode & 07777) != p->dir_mode;
            check_mode = 0;
        }
        if (rc == 0 && need_chmod) {
            /* Through an fd opened without following: never another inode. */
            int fd = fm__openat(pfd, c->dir_name[d], O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0);
            rc = fd < 0 ? fd : fm__fchmod(fd, p->dir_mode);
            if (fd >= 0)
                fm__close(fd);
        }
        c->dir_status[d] = rc;
        if (rc < 0)
            fail(c);
    }
    put_dir_fd(c, pfd);
}

static void free_ctx(struct ctx *c)
{
    free(c->dir_name);
    free(c->name);
    free(c->src);
    free(c->chunk);
    free(c->link_dirs);
    free(c->dir_first);
}

/* Allocates and fills the string tables of c. Returns 0 or -errno. */
static int init_ctx(struct ctx *c, const struct fm_plan *p)
{
    memset(c, 0, sizeof(*c));
    c->p = p;
    if (p == NULL || p->n_dirs == 0)
        return -EINVAL;
    size_t ne = p->n_entries ? p->n_entries : 1;
    c->dir_name = malloc(p->n_dirs * sizeof(char *));
    c->name = malloc(ne * sizeof(char *));
    c->src = malloc(ne * sizeof(char *));
    if (!c->dir_name || !c->name || !c->src)
        return -ENOMEM;
    return check_plan(p, c->dir_name, c->name, c->src);
}

/* ---- the link check: every LINK made a regular file ---- */

struct odd {
    const char *name;
    unsigned char type; /* DT_* of a non-regular, non-directory entry */
};

static int cmp_odd(const void *a, const void *b)
{
    return strcmp(((const struct odd *)a)->name, ((const struct odd *)b)->name);
}

/* The LINK entries of directory d that made something else than a regular
 * file (a CAS name swapped for a symlink, FIFO or device between its last
 * check and linkat) get -ELOOP (a symlink) or -EINVAL: one getdents pass
 * over the directory, d_type read from it (a stat only for DT_UNKNOWN). */
static int check_links_in(struct ctx *c, uint32_t d)
{
    int pfd = dir_fd(c, d);
    if (pfd < 0)
        return pfd;
    int fd = fm__openat(pfd, ".", O_RDONLY | O_DIRECTORY, 0);
    if (pfd != c->dest_dirfd)
        fm__close(pfd);
    if (fd < 0)
        return fd;
    char *ents = NULL;
    size_t len = 0;
    int rc = fm__read_dir(fd, &ents, &len);
    struct odd *odd = NULL;
    size_t n_odd = 0, cap = 0;
    for (size_t pos = 0; rc == 0 && pos < len;) {
        unsigned char type = (unsigned char)ents[pos];
        const char *name = ents + pos + 1;
        pos += strlen(name) + 2;
        if (type == DT_UNKNOWN) {
            struct stat st;
            if (fm__fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                continue;
            type = S_ISREG(st.st_mode)   ? DT_REG
                   : S_ISDIR(st.st_mode) ? DT_DIR
                   : S_ISLNK(st.st_mode) ? DT_LNK
                                         : DT_FIFO;
        }
        if (type == DT_REG || type == DT_DIR)
            continue;
        if (n_odd == cap) {
            cap = cap ? cap * 2 : 16;
            struct odd *o = realloc(odd, cap * sizeof(*o));
            if (o == NULL) {
                rc = -ENOMEM;
                break;
            }
            odd = o;
        }
        odd[n_odd++] = (struct odd){name, type};
    }
    fm__close(fd);
    if (rc == 0 && n_odd > 0) {
        qsort(odd, n_odd, sizeof(*odd), cmp_odd);
        const struct fm_plan *p = c->p;
        for (uint32_t i = c->dir_first[d]; i < p->n_entries && (uint32_t)p->entry_dir[i] == d;
             i++) {
            if (p->op[i] != FM_OP_LINK || c->status[i] != 0)
                continue;
            struct odd key = {c->name[i], 0};
            const struct odd *hit = bsearch(&key, odd, n_odd, sizeof(*odd), cmp_odd);
            if (hit != NULL) {
                c->status[i] = hit->type == DT_LNK ? -ELOOP : -EINVAL;
                c->how[i] = FM_HOW_NONE;
                fail(c);
            }
        }
    }
    free(odd);
    free(ents);
    return rc;
}

static void *check_links_worker(void *arg)
{
    struct ctx *c = arg;
    for (;;) {
        uint32_t k = atomic_fetch_add(&c->next_chunk, 1);
        if (k >= c->n_link_dirs)
            break;
        uint32_t d = c->link_dirs[k];
        int rc = check_links_in(c, d);
        if (rc < 0 && c->dir_status[d] == 0) {
            c->dir_status[d] = rc;
            fail(c);
        }
    }
    return NULL;
}

/* Which directories got LINK entries done in this call: c->link_dirs. */
static int find_link_dirs(struct ctx *c)
{
    const struct fm_plan *p = c->p;
    c->dir_first = malloc(p->n_dirs * sizeof(uint32_t));
    c->link_dirs = malloc(p->n_dirs * sizeof(uint32_t));
    if (c->dir_first == NULL || c->link_dirs == NULL)
        return -ENOMEM;
    for (uint32_t d = 0; d < p->n_dirs; d++)
        c->dir_first[d] = UINT32_MAX;
    int64_t last = -1;
    for (uint32_t i = 0; i < p->n_entries; i++) {
        uint32_t d = (uint32_t)p->entry_dir[i];
        if (c->dir_first[d] == UINT32_MAX)
            c->dir_first[d] = i;
        if (p->op[i] == FM_OP_LINK && c->status[i] == 0 && last != d) {
            c->link_dirs[c->n_link_dirs++] = d; /* entries are contiguous per dir */
            last = d;
        }
    }
    return 0;
}

int32_t fm_plan_exec(int32_t dest_dirfd, int32_t src_dirfd, const struct fm_plan *plan,
                     const struct fm_exec_opts *opts, int32_t *status, uint8_t *how,
                     int32_t *dir_status)
{
    struct ctx c;
    int rc = init_ctx(&c, plan);
    if (rc == 0 && ((plan->n_entries && (!status || !how)) || !dir_status))
        rc = -EINVAL;
    if (rc < 0) {
        free_ctx(&c);
        return rc;
    }
    pthread_once(&atfork_once, register_atfork);
    c.dest_dirfd = dest_dirfd;
    c.src_dirfd = src_dirfd;
    c.tmp_dirfd = opts != NULL ? opts->tmp_dirfd : -1;
    c.flags = opts != NULL ? opts->flags : 0;
    c.ctl = opts != NULL ? opts->ctl : NULL;
    uint32_t threads = fm__clamp_threads(opts != NULL ? opts->threads : 0);
    uint32_t inflight = opts != NULL && opts->max_inflight ? opts->max_inflight : 64;
    if (inflight < threads)
        inflight = threads;
    uint32_t chunk = inflight / threads;
    if (chunk > MAX_CHUNK)
        chunk = MAX_CHUNK;

    uint32_t n = plan->n_entries;
    c.chunk = malloc(((size_t)n + 1) * sizeof(uint32_t));
    if (c.chunk == NULL) {
        free_ctx(&c);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < n;) {
        uint32_t j = i + 1;
        while (j < n && j - i < chunk && plan->entry_dir[j] == plan->entry_dir[i])
            j++;
        c.chunk[c.n_chunks++] = i;
        i = j;
    }
    c.chunk[c.n_chunks] = n;

    c.status = status;
    c.how = how;
    c.dir_status = dir_status;
    for (uint32_t i = 0; i < n; i++) {
        status[i] = -ECANCELED;
        how[i] = FM_HOW_NONE;
    }
    int exist = (c.flags & FM_EXEC_DIRS_EXIST) != 0;
    dir_status[0] = 0;
    for (uint32_t d = 1; d < plan->n_dirs; d++)
        dir_status[d] = exist ? 0 : -ECANCELED;
    uint32_t n_threads = threads < c.n_chunks ? threads : c.n_chunks;
    int srcs_ok = 1;
    if ((c.flags & FM_EXEC_CHECK_SRCS) && c.n_chunks > 0) {
        if (n_threads > 1)
            fm__run_pool(check_worker, &c, n_threads, NULL);
        else
            check_worker(&c); /* opens no fd: no thread needed */
        srcs_ok = !atomic_load(&c.stop);
        atomic_store(&c.next_chunk, 0);
    }
    if (srcs_ok && !exist)
        make_dirs(&c);
    if (srcs_ok && !stopped(&c) && c.n_chunks > 0) {
        int keep[FM_POOL_KEEP] = {dest_dirfd, src_dirfd, c.tmp_dirfd};
        fm__run_pool(worker, &c, n_threads, keep);
    }
    if (srcs_ok && c.n_chunks > 0 && !cancelled(&c)) {
        rc = find_link_dirs(&c);
        if (rc == 0 && c.n_link_dirs > 0) {
            atomic_store(&c.next_chunk, 0);
            uint32_t nt = threads < c.n_link_dirs ? threads : c.n_link_dirs;
            int keep[FM_POOL_KEEP] = {dest_dirfd, -1, -1};
            if (nt > 1)
                fm__run_pool(check_links_worker, &c, nt, keep);
            else
                check_links_worker(&c);
        }
        if (rc < 0) {
            free_ctx(&c);
            return rc;
        }
    }

    rc = 0;
    for (uint32_t d = 0; d < plan->n_dirs && rc == 0; d++)
        if (dir_status[d] != 0 && dir_status[d] != -ECANCELED)
            rc = dir_status[d];
    for (uint32_t i = 0; i < n && rc == 0; i++)
        if (status[i] != 0 && status[i] != -ECANCELED)
            rc = status[i];
    if (rc == 0 && cancelled(&c)) {
        for (uint32_t i = 0; i < n && rc == 0; i++)
            if (status[i] == -ECANCELED)
                rc = -ECANCELED; /* stopped before the end: the caller cancelled */
        for (uint32_t d = 0; d < plan->n_dirs && rc == 0; d++)
            if (dir_status[d] == -ECANCELED)
                rc = -ECANCELED;
    }
    free_ctx(&c);
    return rc;
}

/* ---- the floor: nothing but mkdirat + linkat on precomputed paths ---- */

struct floor {
    int dest_dirfd, src_dirfd;
    char **dst;       /* per LINK entry */
    const char **src; /* per LINK entry */
    uint32_t n;
    _Atomic uint32_t next;
    _Atomic int32_t err;
};

static void *floor_worker(void *arg)
{
    struct floor *f = arg;
    for (;;) {
        uint32_t a = atomic_fetch_add(&f->next, MAX_CHUNK);
        if (a >= f->n || atomic_load_explicit(&f->err, memory_order_relaxed))
            break;
        uint32_t b = a + MAX_CHUNK < f->n ? a + MAX_CHUNK : f->n;
        for (uint32_t i = a; i < b; i++) {
            int rc = fm__linkat(f->src_dirfd, f->src[i], f->dest_dirfd, f->dst[i]);
            if (rc < 0) {
                int32_t zero = 0;
                atomic_compare_exchange_strong(&f->err, &zero, rc);
                break;
            }
        }
    }
    return NULL;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int32_t fm_floor_exec(int32_t dest_dirfd, int32_t src_dirfd, const struct fm_plan *plan,
                      uint32_t threads, uint64_t *elapsed_ns)
{
    struct ctx c;
    struct floor f;
    memset(&f, 0, sizeof(f));
    int rc = init_ctx(&c, plan);
    char *buf = NULL, *path_buf = NULL;
    char **dir_path = NULL;
    if (rc < 0)
        goto out;
    dir_path = malloc(plan->n_dirs * sizeof(char *));
    rc = dir_path == NULL ? -ENOMEM : build_dir_paths(plan, c.dir_name, dir_path, &path_buf);
    if (rc < 0)
        goto out;
    size_t total = 0;
    for (uint32_t i = 0; i < plan->n_entries; i++)
        if (plan->op[i] == FM_OP_LINK)
            total += strlen(dir_path[plan->entry_dir[i]]) + strlen(c.name[i]) + 2;
    f.dst = malloc((plan->n_entries + 1) * sizeof(char *));
    f.src = malloc((plan->n_entries + 1) * sizeof(char *));
    buf = malloc(total + 1);
    if (!f.dst || !f.src || !buf) {
        rc = -ENOMEM;
        goto out;
    }
    char *w = buf;
    for (uint32_t i = 0; i < plan->n_entries; i++) {
        if (plan->op[i] != FM_OP_LINK)
            continue;
        const char *dp = dir_path[plan->entry_dir[i]];
        f.dst[f.n] = w;
        f.src[f.n++] = c.src[i];
        if (*dp) {
            strcpy(w, dp);
            w += strlen(dp);
            *w++ = '/';
        }
        strcpy(w, c.name[i]);
        w += strlen(c.name[i]) + 1;
    }
    f.dest_dirfd = dest_dirfd;
    f.src_dirfd = src_dirfd;
    threads = fm__clamp_threads(threads);

    uint64_t t0 = now_ns();
    for (uint32_t d = 1; d < plan->n_dirs && rc == 0; d++)
        rc = fm__mkdirat(dest_dirfd, dir_path[d], plan->dir_mode);
    if (rc == 0 && f.n > 0) {
        uint32_t chunks = (f.n + MAX_CHUNK - 1) / MAX_CHUNK;
        int keep[FM_POOL_KEEP] = {dest_dirfd, src_dirfd, -1};
        fm__run_pool(floor_worker, &f, threads < chunks ? threads : chunks, keep);
        rc = atomic_load(&f.err);
    }
    uint64_t t1 = now_ns();
    if (rc == 0 && elapsed_ns != NULL)
        *elapsed_ns = t1 - t0;
out:
    free(f.dst);
    free(f.src);
    free(buf);
    free(dir_path);
    free(path_buf);
    free_ctx(&c);
    return rc;
}
