/*
 * fastmat.h - the public interface of fastmat's C core.
 *
 * This header is fed verbatim to cffi's ffi.cdef(), so it contains only
 * simple "#define NAME value" lines, struct declarations and prototypes
 * using fixed-width integer types (no mode_t, off_t, ssize_t includes).
 * The build script includes the system headers before it.
 *
 * Conventions: every action function returns 0 or -errno (never -1 with
 * errno); every fd it opens is O_CLOEXEC; paths are interpreted relative to
 * the given directory fd and never follow a symlink in the last component
 * unless a comment says otherwise. Nothing here touches Python objects;
 * every function is safe to call from several threads at once. A file that
 * may be executed (a mode with an x bit, every fm_plan_exec entry) is written
 * only by a thread with a private fd table, so a child forked meanwhile by
 * another thread never inherits a writable fd to it (exec: ETXTBSY).
 */

/* Bumped whenever a prototype or struct below changes; checked by Python. */
#define FM_ABI_VERSION 8

/* ---- capabilities (fm_capabilities) ---- */
#define FM_CAP_FICLONE 1         /* Linux FICLONE ioctl compiled in */
#define FM_CAP_CLONEFILE 2       /* macOS clonefile(2) compiled in */
#define FM_CAP_COPY_FILE_RANGE 4 /* copy_file_range(2) compiled in */
#define FM_CAP_OPENAT2 8         /* openat2(2) RESOLVE_BENEATH available */
#define FM_CAP_OVERLAY 16        /* overlay mount code compiled in (Linux) */

/* ---- flags for the single-file functions ---- */
#define FM_F_FSYNC 1         /* fsync the new file and its directory */
#define FM_F_NOREPLACE 2     /* publish fails with -EEXIST if the name exists */
#define FM_F_REFLINK_FORCE 4 /* reflink only: fail with -ENOTSUP, never copy */
#define FM_F_NO_REFLINK 8    /* never try a reflink, always copy bytes */

/* ---- plan operations (struct fm_plan.op) ---- */
#define FM_OP_LINK 1    /* linkat(src_dirfd, src, dir, name); per-file fallbacks */
#define FM_OP_SYMLINK 2 /* symlinkat(src, dir, name): src is the link target */
#define FM_OP_EMPTY 3   /* a new empty regular file with the given mode */
#define FM_OP_COPY 4    /* a private reflink-or-copy of src with mode, mtime */

/* ---- how an entry was made (out array "how"); low bits a method ---- */
#define FM_HOW_NONE 0
#define FM_HOW_LINK 1
#define FM_HOW_REFLINK 2
#define FM_HOW_COPY 3
#define FM_HOW_SYMLINK 4
#define FM_HOW_CREATE 5
#define FM_HOW_METHOD_MASK 15
#define FM_HOW_ROTATED 16 /* EMLINK: source inode rotated, then linked */
#define FM_HOW_XDEV 32    /* EXDEV: linkat refused, reflinked or copied */
#define FM_HOW_DENIED 64  /* EPERM (protected_hardlinks): linkat refused, reflinked or copied */

/* ---- fm_plan_exec flags ---- */
#define FM_EXEC_DIRS_EXIST 1 /* directories already created by an earlier call */
#define FM_EXEC_KEEP_GOING 2 /* do not stop at the first failing entry */
#define FM_EXEC_CHECK_SRCS 4 /* check every LINK / COPY src before creating anything */

/* ---- Directory decoding (fm_dir_decode) ---- */
/* The lists of a Directory message (struct fm_dir_error.list). */
#define FM_DIR_FILES 0
#define FM_DIR_DIRS 1
#define FM_DIR_SYMLINKS 2
/* Why a message was refused (struct fm_dir_error.code). The first group are
 * wire-format refusals (the message is not a decodable Directory). */
#define FM_DIR_E_TRUNCATED 1  /* a varint, fixed field or length runs past its end */
#define FM_DIR_E_VARINT 2     /* a varint over 10 bytes, or a length over 5 */
#define FM_DIR_E_TAG 3        /* a tag over 5 bytes or 2**32 - 1, or field number 0 */
#define FM_DIR_E_WIRETYPE 4   /* wire type 6 or 7 */
#define FM_DIR_E_GROUP 5      /* wire type 3 or 4: a group (see fm_dir_decode) */
#define FM_DIR_E_UTF8 6       /* a string field that is not valid UTF-8 */
#define FM_DIR_E_SIZE 7       /* the message is 2 GiB or larger */
#define FM_DIR_E_WIRE_MAX 7   /* codes up to this one are wire-format refusals */
#define FM_DIR_E_UNSORTED 8   /* list not sorted: name before str (the next name) */
#define FM_DIR_E_TOO_MANY 9   /* more entries than max_entries */
#define FM_DIR_E_RESERVED 10  /* name is "", "." or ".." */
#define FM_DIR_E_SLASH 11     /* name holds '/' or NUL */
#define FM_DIR_E_LONG 12      /* name longer than max_name_bytes */
#define FM_DIR_E_DUPLICATE 13 /* name already used by an earlier entry */
#define FM_DIR_E_HASH 14      /* digest hash (str) not 64 lowercase hex digits */
#define FM_DIR_E_DIGEST 15    /* digest str/num[0] impossible: size < 0, or 0 not empty */
#define FM_DIR_E_MODE 16      /* file unix_mode num[0] above 07777 */
#define FM_DIR_E_MTIME 17     /* file mtime num[0] s num[1] ns out of [0, 2**63 - 1] ns */
#define FM_DIR_E_TARGET 18    /* symlink target (str) empty, with NUL or too long */

struct fm_dir_opts {
    int64_t max_entries;      /* files + directories + symlinks (TreeLimits) */
    int64_t max_name_bytes;   /* UTF-8 bytes of one name */
    int64_t max_target_bytes; /* UTF-8 bytes of one symlink target */
    const char *blob_prefix;  /* "blobs/": a blob's area, from fastmat.cas.layout */
    const char *exec_prefix;  /* "exec/": its executable variant's area */
};

/* Why fm_dir_decode refused a message; byte ranges are offsets into its buf. */
struct fm_dir_error {
    uint32_t code;     /* FM_DIR_E_* */
    uint32_t list;     /* FM_DIR_FILES / DIRS / SYMLINKS of the offending entry */
    uint64_t index;    /* the entry's index in that list */
    uint64_t offset;   /* wire-format refusals: where in buf */
    uint64_t name_off; /* the entry's name (empty for FM_DIR_E_TOO_MANY and wire refusals) */
    uint64_t name_len;
    uint64_t str_off; /* the next name, the hash or the target, as the code says */
    uint64_t str_len;
    int64_t num[2];
};

/*
 * A decoded Directory: this header, then the parts it locates (offsets from
 * the header's address; every field a uint64_t, so Python can read the
 * header as native "Q"s). Entries are the files in message order, then
 * the symlinks. Strings are packed back to back, each NUL-terminated.
 */
struct fm_dir {
    uint64_t size; /* bytes of the block, header included */
    uint64_t n_files;
    uint64_t n_symlinks;
    uint64_t n_dirs;
    uint64_t n_blobs;      /* files with a blob (size > 0) */
    uint64_t n_execs;      /* executable files linked from the exec area */
    uint64_t longest_name; /* UTF-8 bytes of the longest name, directories too */
    uint64_t n_bytes_lo;   /* the sum of the file sizes: lo + hi * 2**64 */
    uint64_t n_bytes_hi;
    uint64_t has_mtimes; /* some file has a NodeProperties mtime */
    uint64_t mtimes;     /* int64_t[n] (-1: none), when has_mtimes */
    uint64_t modes;      /* uint32_t[n] */
    uint64_t ops;        /* uint8_t[n]: FM_OP_* */
    uint64_t names;      /* n names */
    uint64_t names_len;
    uint64_t srcs; /* n: "<prefix><hh>/<hash>-<size>", "" (EMPTY) or a symlink target */
    uint64_t srcs_len;
    uint64_t blobs; /* n_blobs: the blob path each file with bytes reads */
    uint64_t blobs_len;
    uint64_t execs; /* n_execs: "<hash>-<size>" of each exec-linked file */
    uint64_t execs_len;
    uint64_t child_names; /* n_dirs: the directories' names */
    uint64_t child_names_len;
    uint64_t child_keys; /* n_dirs: "<hash>-<size>" of each directory */
    uint64_t child_keys_len;
};

/* ---- fault injection sites (tests only; fm_inject) ---- */
#define FM_SITE_LINK 1    /* linkat of a plan entry */
#define FM_SITE_REFLINK 2 /* FICLONE / clonefile */
#define FM_SITE_COPY 3    /* copy_file_range (falls back to read/write) */
#define FM_SITE_MKDIR 4   /* mkdirat of a plan directory */
#define FM_SITE_SYMLINK 5 /* symlinkat of a plan entry */
#define FM_SITE_RENAME 6  /* the publish step of the durable recipe */
#define FM_SITE_SYNC 7    /* the data sync of a batch: one file's fsync, or the syncfs */
#define FM_SITE_COUNT 8

/* ---- fm_sync_batch modes (exactly one) ---- */
#define FM_SYNC_FSYNC 1     /* fsync every file, on the pool */
#define FM_SYNC_SYNCFS 2    /* one syncfs(2) of dirfd's filesystem for the whole batch */
#define FM_SYNC_WRITEBACK 4 /* only start every file's writeback; waits for nothing */

/*
 * A flat materialization plan. Directory 0 is the destination itself
 * (dirfd passed to fm_plan_exec); directories are listed parents before
 * children. Strings are packed back to back, each NUL-terminated, in index
 * order. Entries of one directory must be contiguous.
 */
struct fm_plan {
    uint32_t n_dirs;
    const int32_t *dir_parent; /* [n_dirs]; dir_parent[0] == -1 */
    const char *dir_names;     /* n_dirs strings; "" for directory 0 */
    uint32_t dir_mode;         /* mode of created directories (0755) */
    uint32_t n_entries;
    const uint8_t *op;        /* [n_entries] FM_OP_* */
    const int32_t *entry_dir; /* [n_entries] index into the directories */
    const uint32_t *mode;     /* [n_entries] mode for EMPTY / COPY / fallback copies */
    const int64_t *mtime_ns;  /* [n_entries] or NULL; < 0 leaves the mtime */
    const char *names;        /* n_entries strings: one path component each */
    const char *srcs;         /* n_entries strings: path under src_dirfd, or target */
};

/* Shared with the caller while fm_plan_exec runs (any thread may read it). */
struct fm_exec_ctl {
    int32_t cancel; /* set nonzero to stop between chunks */
    uint32_t reserved;
    uint64_t done; /* entries finished so far (added once per chunk) */
};

struct fm_exec_opts {
    uint32_t threads;        /* worker threads; 0 = online cores; clamped [1, 256] */
    uint32_t max_inflight;   /* entries claimed but unfinished; 0 = 64; >= threads */
    uint32_t flags;          /* FM_EXEC_* */
    int32_t tmp_dirfd;       /* where EMLINK rotation builds its copy; -1 = beside src */
    struct fm_exec_ctl *ctl; /* or NULL: cancellation and progress */
};

uint32_t fm_abi_version(void);
uint32_t fm_capabilities(void);

/*
 * Executes a plan: creates directories 1..n_dirs-1 under dest_dirfd (unless
 * FM_EXEC_DIRS_EXIST), then every entry on a bounded pthread pool, each
 * relative to its directory's fd (opened with RESOLVE_BENEATH /
 * RESOLVE_NO_SYMLINKS, or component-wise O_NOFOLLOW). LINK entries fall back
 * per file: EXDEV or EPERM (fs.protected_hardlinks: a source the caller does
 * not own) -> reflink, else copy (mode from the plan); EMLINK ->
 * rotate the source inode (a fresh private copy renamed over src, existing
 * links untouched) and link again. status[i] gets 0 or -errno per entry
 * (-ECANCELED if never attempted after a failure), how[i] an FM_HOW_* value,
 * dir_status[d] 0 or -errno per directory. Returns 0, or the first failure
 * in plan order (directories before entries), or -EINVAL for a malformed plan.
 * Directory paths are rebuilt from the names when needed (memory linear in the
 * names); a directory whose path exceeds PATH_MAX gets -ENAMETOOLONG.
 *
 * Link check: once the entries are done, every LINK entry must have made a
 * regular file (one getdents per directory): one that made a symlink (its src
 * was swapped for one after any check) gets status -ELOOP, anything else
 * non-regular -EINVAL; the caller discards the tree.
 *
 * opts->ctl: when ctl->cancel becomes nonzero, no new chunk is started;
 * entries never attempted stay -ECANCELED and, if nothing failed, -ECANCELED
 * is returned. ctl->done counts the entries finished, chunk by chunk (read it
 * for progress; nothing is ever called back per file).
 *
 * FM_EXEC_CHECK_SRCS: first, on the same pool, fstatat(src_dirfd, src,
 * AT_SYMLINK_NOFOLLOW) of every LINK and COPY entry's src; it must be a
 * regular file. Every failing entry gets status[i] = -ENOENT (absent),
 * -ELOOP (a symlink), -EISDIR (a directory), -EINVAL (another non-regular
 * file) or the fstatat error (-EACCES, -ENOTDIR, ...). If any failed, nothing
 * is created (KEEP_GOING or not): every other status[i] stays -ECANCELED,
 * every directory's dir_status stays -ECANCELED (0 for directory 0, and for
 * all with FM_EXEC_DIRS_EXIST), and the first failing entry's error in plan
 * order is returned. A src may still vanish between the check and its use.
 */
int32_t fm_plan_exec(int32_t dest_dirfd, int32_t src_dirfd, const struct fm_plan *plan,
                     const struct fm_exec_opts *opts, int32_t *status, uint8_t *how,
                     int32_t *dir_status);

/* Checks a plan as fm_plan_exec would, doing nothing: 0 or -EINVAL (a parent
 * index not before its child, an entry_dir out of range, a directory's
 * entries not contiguous, an op out of range, a name that is not one path
 * component, an empty src for LINK / SYMLINK / COPY, a mode above 07777). */
int32_t fm_plan_check(const struct fm_plan *plan);

/*
 * The floor, for benchmarks: the same plan done with nothing but mkdirat and
 * linkat (paths relative to dest_dirfd, precomputed before the clock starts)
 * on the same number of threads. Only LINK entries are done. *elapsed_ns gets
 * the time of the syscall loops. Returns 0 or the first -errno.
 */
int32_t fm_floor_exec(int32_t dest_dirfd, int32_t src_dirfd, const struct fm_plan *plan,
                      uint32_t threads, uint64_t *elapsed_ns);

/* linkat(src_dirfd, src, dst_dirfd, dst, 0). Returns 0 or -errno
 * (-EEXIST, -ENOENT, -EXDEV, -EMLINK, ...). */
int32_t fm_link(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst);

/* Creates dst (O_EXCL) as a reflink of src, with exactly `mode` (fchmod:
 * FICLONE does not carry it). Returns 0, -ENOTSUP where the platform or
 * filesystem cannot (also for EOPNOTSUPP / EINVAL from FICLONE), -EXDEV,
 * -EEXIST, -ENOENT. dst is removed on any failure. */
int32_t fm_reflink(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                   uint32_t mode);

/* Creates dst (O_EXCL) as a byte copy of src (copy_file_range, else
 * read/write), with exactly `mode`. Returns 0 or -errno; dst removed on
 * failure. */
int32_t fm_copy(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                uint32_t mode);

/*
 * The durable private-copy recipe: a unique temp in dst_dirfd (O_CREAT |
 * O_EXCL | O_CLOEXEC), reflink-or-copy of src (FM_F_REFLINK_FORCE /
 * FM_F_NO_REFLINK choose), fchmod(mode), fsync if FM_F_FSYNC, close, rename
 * to dst (renameat2 RENAME_NOREPLACE if FM_F_NOREPLACE: -EEXIST when taken),
 * fsync the directory if FM_F_FSYNC. The temp is unlinked on any failure.
 * *how (may be NULL) gets FM_HOW_REFLINK or FM_HOW_COPY, untouched on error.
 */
int32_t fm_private_copy(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                        uint32_t mode, uint32_t flags, uint8_t *how);

/* The same recipe for bytes in memory: write loop, fchmod, fsync, rename. */
int32_t fm_durable_write(int32_t dst_dirfd, const char *dst, const uint8_t *buf, uint64_t len,
                         uint32_t mode, uint32_t flags);

/* Moves an already complete file into place: renameat2(..., RENAME_NOREPLACE)
 * when FM_F_NOREPLACE (fallback link + unlink where renameat2 is missing),
 * plain renameat otherwise; fsync of dst_dirfd with FM_F_FSYNC. */
int32_t fm_publish(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst,
                   uint32_t flags);

/*
 * Group commit, step 1: makes the n files named in `names` (n packed
 * NUL-terminated paths under dirfd) durable together. FM_SYNC_FSYNC opens
 * each (O_RDONLY | O_NOFOLLOW) and fsyncs it on a pool of `threads` threads
 * (0 = online cores; clamped to [1, 256] and to n), so their writeback
 * overlaps and the filesystem joins their journal commits; FM_SYNC_SYNCFS
 * makes one syncfs(2) of dirfd's filesystem instead (it also flushes every
 * other dirty file there); FM_SYNC_WRITEBACK only starts each file's
 * writeback (sync_file_range SYNC_FILE_RANGE_WRITE, ignored where
 * unsupported) so that a later sync finds less to wait for. status[i] gets
 * 0 or -errno per file (-ENOENT, -ELOOP, -EIO, -ENOSPC, ...; with SYNCFS
 * the one result for every file). Returns 0, the first failure in index
 * order, -EINVAL for no or several modes, -ENOTSUP for SYNCFS off Linux,
 * -ENOMEM (status untouched). Fault-injection site SYNC fires once per file
 * fsync'ed, or once per syncfs; never for WRITEBACK.
 */
int32_t fm_sync_batch(int32_t dirfd, const char *names, uint32_t n, uint32_t flags,
                      uint32_t threads, int32_t *status);

/*
 * Group commit, step 2: publishes n complete files, srcs[i] (under
 * src_dirfd) as dsts[i] (under dst_dirfd), both packed NUL-terminated
 * arrays, one rename at a time (fm_publish's renameat2 RENAME_NOREPLACE
 * with FM_F_NOREPLACE, else renameat; fault-injection site RENAME per
 * name). status[i] gets 0, -EEXIST (the name was taken: another writer
 * won) or another -errno; a src that was not published is unlinked. Then,
 * with FM_F_FSYNC, every distinct directory that received a name is
 * fsync'ed once, on up to `threads` threads. Returns 0, the first failure
 * other than -EEXIST in index order, else a directory fsync's failure (its
 * names are published but may not survive a power loss), or -ENOMEM
 * (nothing done, status untouched).
 */
int32_t fm_publish_batch(int32_t src_dirfd, const char *srcs, int32_t dst_dirfd, const char *dsts,
                         uint32_t n, uint32_t flags, uint32_t threads, int32_t *status);

/* *magic gets the f_type of the filesystem holding fd (fstatfs; EXT4
 * 0xEF53, XFS 0x58465342, TMPFS 0x01021994, BTRFS 0x9123683E...),
 * untouched on error. Returns 0 or -errno (-EBADF). */
int32_t fm_fs_magic(int32_t fd, uint64_t *magic);

/* Removes dirfd/path and everything under it, making directories writable
 * (u+rwx) where needed; never chmods a file, never follows a symlink (a
 * symlink at path is unlinked itself) nor descends into another filesystem.
 * Entries removed meanwhile by a concurrent remover are not errors. Returns
 * 0, -ENOENT if path does not exist, -EBUSY for a mount point (path itself or
 * one below it: nothing of the mounted filesystem is deleted), -ESTALE, or
 * the first other -errno. */
int32_t fm_remove_tree(int32_t dirfd, const char *path);

/* 1 if a reflink works in this directory's filesystem, 0 if not, -errno if
 * the probe itself failed. Creates and removes two temp files in dirfd. */
int32_t fm_probe_reflink(int32_t dirfd);

/* Mounts an overlay at target: lowerdir (read-only), upperdir, workdir, with
 * extra mount flags MS_NOSUID | MS_NODEV. Returns 0, -EPERM without
 * CAP_SYS_ADMIN, -ENOTSUP off Linux, -errno otherwise. */
int32_t fm_mount_overlay(const char *lowerdir, const char *upperdir, const char *workdir,
                         const char *target);

/* umount2(target, detach ? MNT_DETACH : 0). Returns 0 or -errno. */
int32_t fm_umount(const char *target, int32_t detach);

/* macOS: clonefile(src, dst, CLONE_NOFOLLOW) of a whole tree. -ENOTSUP
 * elsewhere. */
int32_t fm_clone_tree(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst);

/*
 * Decodes one REAPI v2 Directory message (untrusted bytes) and validates it
 * as fastmat.tree.node_py.build_node does, in the same order, so that the
 * first problem found is the same one. On success *out gets a malloc'ed
 * struct fm_dir (free it with fm_dir_free) and *err is untouched; on any
 * failure *out is untouched.
 *
 * Wire format: varints of at most 10 bytes (bits past 64 dropped, as upb
 * does), tags of at most 5 bytes, lengths within their enclosing message,
 * strings valid UTF-8 (every occurrence), unknown fields and known fields
 * with another wire type skipped (types 0, 1, 2, 5). Groups (types 3 and 4)
 * are refused: proto3 has none, upb would skip unknown ones. A singular
 * field given twice: the last scalar wins, messages merge (protobuf's rules).
 * Every nested message is decoded, ignored ones too (NodeProperties of the
 * Directory and its symlinks, NodeProperty), as upb decodes them.
 *
 * Returns 0, -EINVAL when the message is refused (*err says why: code, the
 * entry and what is wrong with it), -ENOMEM.
 */
int32_t fm_dir_decode(const uint8_t *buf, uint64_t len, const struct fm_dir_opts *opts,
                      struct fm_dir **out, struct fm_dir_error *err);

/* Frees what fm_dir_decode returned (NULL is fine). */
void fm_dir_free(struct fm_dir *dir);

/* Tests only: the next `count` calls at `site` fail with `err` (a negative
 * errno) without doing the syscall. count 0 clears the site. Thread-safe. */
void fm_inject(uint32_t site, int32_t err, uint32_t count);
