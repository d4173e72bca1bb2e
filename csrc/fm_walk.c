/*
 * fm_walk.c - tree removal, with lstat semantics. The walk holds O(1) file
 * descriptors whatever the depth: it reads a directory's entries into
 * memory, closes the parent when it descends and comes back up through ".."
 * after checking that ".." is still the directory it came from (-ESTALE if
 * the tree was moved meanwhile).
 */
#include "fm_internal.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

struct frame {
    dev_t dev;
    ino_t ino;
    char *ents; /* records "<d_type byte><name>\0" */
    size_t len, pos;
    char *name; /* this directory's name in its parent; NULL for the root */
};

struct walk {
    struct frame *stack;
    size_t depth, cap;
};

static int push(struct walk *w, int fd, const struct stat *st, const char *name)
{
    if (w->depth == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 16;
        struct frame *s = realloc(w->stack, cap * sizeof(*s));
        if (s == NULL)
            return -ENOMEM;
        w->stack = s;
        w->cap = cap;
    }
    struct frame *f = &w->stack[w->depth];
    memset(f, 0, sizeof(*f));
    f->dev = st->st_dev;
    f->ino = st->st_ino;
    if (name != NULL && (f->name = strdup(name)) == NULL)
        return -ENOMEM;
    int rc = fm__read_dir(fd, &f->ents, &f->len);
    if (rc < 0) {
        free(f->name);
        return rc;
    }
    w->depth++;
    return 0;
}

static void pop(struct walk *w)
{
    struct frame *f = &w->stack[--w->depth];
    free(f->ents);
    free(f->name);
}

/* Opens directory `name` under dirfd for the walk without following a
 * symlink, and makes that very inode u+rwx when it is not (through the fd:
 * whatever is renamed meanwhile, the chmod never reaches another file; a
 * directory we may not even read is reached with O_PATH and chmod'ed through
 * it). *st gets the opened directory's fstat. Returns an O_RDONLY fd or -errno
 * (-ENOTDIR / -ELOOP: not a directory now). */
static int enter(int dirfd, const char *name, struct stat *st)
{
    int fd = fm__openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0);
    if (fd == -EACCES) {
        int pfd = fm__openat(dirfd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW, 0);
        if (pfd < 0)
            return pfd;
        int rc = fm__fstat(pfd, st);
        if (rc == 0)
            rc = fm__fchmod_opath(pfd, (st->st_mode & 07777) | S_IRWXU);
        fd = rc < 0 ? rc : fm__openat(pfd, ".", O_RDONLY | O_DIRECTORY, 0);
        fm__close(pfd);
        return fd;
    }
    if (fd < 0)
        return fd;
    int rc = fm__fstat(fd, st);
    if (rc < 0) {
        fm__close(fd);
        return rc;
    }
    if ((st->st_mode & S_IRWXU) != S_IRWXU)
        fm__fchmod(fd, (st->st_mode & 07777) | S_IRWXU); /* else unlinks say why */
    return fd;
}

/* Handles one entry of the directory fd: 0 or -errno, and *sub >= 0 an fd
 * on a subdirectory to descend into (*st filled), else -1. */
static int visit(struct walk *w, int fd, unsigned char type, const char *name, struct stat *st,
                 int *sub)
{
    int rc;
    *sub = -1;
    if (type != DT_DIR && type != DT_UNKNOWN) {
        rc = fm__unlinkat(fd, name, 0);
        if (rc != -EISDIR && rc != -EPERM)
            return rc == -ENOENT ? 0 : rc;
        if (type != DT_REG)
            return 0; /* left in place: the parent's rmdir reports it */
    }
    rc = enter(fd, name, st);
    if (rc == -ENOTDIR || rc == -ELOOP) { /* not (or no longer) a directory */
        rc = fm__unlinkat(fd, name, 0);
        return rc == -ENOENT ? 0 : rc;
    }
    if (rc < 0)
        return rc == -ENOENT ? 0 : rc; /* removed meanwhile (a concurrent remover) */
    if (st->st_dev != w->stack[w->depth - 1].dev) {
        fm__close(rc);
        return -EBUSY; /* a mount point: never delete another filesystem's files */
    }
    *sub = rc;
    return 0;
}

/* Leaves the directory fd (the top frame): reopens its parent through "..",
 * checks it is still the one we came from, and removes the directory.
 * Returns the parent fd or -errno. */
static int leave(struct walk *w, int fd)
{
    struct frame *child = &w->stack[w->depth - 1];
    struct frame *parent = &w->stack[w->depth - 2];
    int pfd = fm__openat(fd, "..", O_RDONLY | O_DIRECTORY | O_NOFOLLOW, 0);
    fm__close(fd);
    if (pfd < 0)
        return pfd;
    struct stat st;
    int rc = fm__fstat(pfd, &st);
    if (rc == 0 && (st.st_dev != parent->dev || st.st_ino != parent->ino))
        rc = -ESTALE;
    if (rc == 0) {
        rc = fm__unlinkat(pfd, child->name, AT_REMOVEDIR);
        if (rc == -ENOENT)
            rc = 0;
    }
    pop(w);
    if (rc < 0) {
        fm__close(pfd);
        return rc;
    }
    return pfd;
}

int32_t fm_remove_tree(int32_t dirfd, const char *path)
{
    struct walk w = {0};
    struct stat st;
    int rc = fm__fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW);
    if (rc < 0)
        return rc;
    if (!S_ISDIR(st.st_mode))
        return fm__unlinkat(dirfd, path, 0);
    int fd = enter(dirfd, path, &st);
    if (fd == -ENOTDIR || fd == -ELOOP)
        return fm__unlinkat(dirfd, path, 0); /* replaced meanwhile by a file */
    if (fd < 0)
        return fd;
    /* A mount point: removing would delete another filesystem's files. */
    struct stat up;
    rc = fm__fstatat(fd, "..", &up, 0);
    if (rc == 0 && up.st_dev != st.st_dev)
        rc = -EBUSY;
    if (rc == 0)
        rc = push(&w, fd, &st, NULL);
    while (rc == 0 && w.depth > 0) {
        struct frame *f = &w.stack[w.depth - 1];
        if (f->pos < f->len) {
            unsigned char type = (unsigned char)f->ents[f->pos];
            const char *name = f->ents + f->pos + 1;
            f->pos += strlen(name) + 2;
            struct stat cst;
            int cfd;
            rc = visit(&w, fd, type, name, &cst, &cfd);
            if (rc < 0 || cfd < 0)
                continue;
            rc = push(&w, cfd, &cst, name);
            fm__close(fd); /* the parent is reached again through ".." */
            fd = cfd;
            continue;
        }
        if (w.depth == 1) {
            pop(&w);
            break;
        }
        fd = leave(&w, fd);
        if (fd < 0)
            rc = fd;
    }
    if (fd >= 0)
        fm__close(fd);
    while (w.depth > 0)
        pop(&w);
    free(w.stack);
    if (rc == 0) {
        rc = fm__unlinkat(dirfd, path, AT_REMOVEDIR);
        if (rc == -ENOENT)
            rc = 0; /* it existed when we started: a concurrent remover won */
    }
    return rc;
}
