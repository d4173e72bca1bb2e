/*
 * fm_decode.c - one REAPI v2 Directory message decoded, validated and packed
 * for the tree loader (fm_dir_decode). The bytes are untrusted (invariant
 * 10): a small reader of the protobuf wire format checks every read against
 * the end of its enclosing message, then the entries are validated by the
 * rules of fastmat/tree/node_py.py's build_node, in its order, and packed
 * into one malloc'ed block. Three passes over the entries, no per-entry
 * allocation; nothing is called but libc's memory functions.
 */
#include "fm_internal.h"

#include <stdlib.h>
#include <string.h>

#define HASH_LEN 64
#define MAX_MESSAGE 0x7ffffffe /* upb refuses lengths of INT32_MAX and more */
#define NS_PER_S 1000000000LL

/* The empty blob's SHA-256: the only hash a size-0 digest may carry. */
static const char empty_hash[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

enum src { SRC_NONE, SRC_BLOB, SRC_EXEC };

/* One entry of a list: byte ranges of the message and decoded values. */
struct ent {
    uint32_t name_off, name_len;
    uint32_t hash_off, hash_len;     /* files, directories: digest.hash */
    uint32_t target_off, target_len; /* symlinks */
    int64_t size;                    /* digest.size_bytes */
    int64_t sec;                     /* files: node_properties.mtime.seconds */
    int32_t nanos;                   /* files: node_properties.mtime.nanos */
    uint32_t mode;                   /* files: node_properties.unix_mode.value */
    uint8_t exec, has_props, has_mode, has_mtime;
    /* set by check_files */
    uint8_t op, src;
    uint32_t out_mode;
    int64_t mtime_ns;
};

struct list {
    struct ent *v;
    size_t n, stored, cap; /* n entries seen, the first `stored` of them kept */
    struct ent last;       /* the previous entry: the order check */
    int64_t unsorted;      /* the first i with name(i) > name(i + 1), or -1 */
    struct ent bad, next;  /* those two entries */
};

struct dec {
    const uint8_t *buf;
    const struct fm_dir_opts *opts;
    struct fm_dir_error *err;
    struct list l[3];
    size_t total; /* entries of the three lists */
    size_t keep;  /* entries are kept while total <= keep (max_entries) */
};

/* A reader of the bytes [p, end) of one message. */
struct rd {
    const uint8_t *p, *end;
};

/* One field: its tag and its payload (wire type 0: v; 2: sub). */
struct field {
    uint32_t num, wt;
    uint64_t v;
    struct rd sub;
};

static int refuse_wire(struct dec *d, const uint8_t *at, uint32_t code)
{
    memset(d->err, 0, sizeof(*d->err));
    d->err->code = code;
    d->err->offset = (uint64_t)(at - d->buf);
    return -EINVAL;
}

/* Refuses entry `index` of list `list` (e may be NULL: no entry). */
static int refuse(struct dec *d, uint32_t code, uint32_t list, size_t index, const struct ent *e,
                  uint32_t str_off, uint32_t str_len, int64_t n0, int64_t n1)
{
    struct fm_dir_error *err = d->err;
    memset(err, 0, sizeof(*err));
    err->code = code;
    err->list = list;
    err->index = index;
    if (e != NULL) {
        err->name_off = e->name_off;
        err->name_len = e->name_len;
    }
    err->str_off = str_off;
    err->str_len = str_len;
    err->num[0] = n0;
    err->num[1] = n1;
    return -EINVAL;
}

/* ---- the wire format ---- */

/* At most 10 bytes; bits past the 64th are dropped (as upb does). */
static int varint(struct dec *d, struct rd *r, uint64_t *out)
{
    const uint8_t *at = r->p;
    uint64_t v = 0;
    for (unsigned i = 0; i < 10; i++) {
        if (r->p == r->end)
            return refuse_wire(d, at, FM_DIR_E_TRUNCATED);
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return refuse_wire(d, at, FM_DIR_E_VARINT);
}

static int fixed(struct dec *d, struct rd *r, size_t n)
{
    if ((size_t)(r->end - r->p) < n)
        return refuse_wire(d, r->p, FM_DIR_E_TRUNCATED);
    r->p += n;
    return 0;
}

/* Reads the next field of r, its payload included. */
static int next(struct dec *d, struct rd *r, struct field *f)
{
    const uint8_t *at = r->p;
    uint64_t tag;
    int rc = varint(d, r, &tag);
    if (rc < 0)
        return rc;
    if (r->p - at > 5 || tag > UINT32_MAX)
        return refuse_wire(d, at, FM_DIR_E_TAG);
    f->num = (uint32_t)(tag >> 3);
    f->wt = (uint32_t)(tag & 7);
    if (f->wt == 3 || f->wt == 4)
        return refuse_wire(d, at, FM_DIR_E_GROUP);
    if (f->num == 0)
        return refuse_wire(d, at, FM_DIR_E_TAG);
    switch (f->wt) {
    case 0:
        return varint(d, r, &f->v);
    case 1:
        return fixed(d, r, 8);
    case 2:
        at = r->p;
        rc = varint(d, r, &f->v);
        if (rc < 0)
            return rc;
        if (r->p - at > 5) /* upb reads a length in at most 5 bytes */
            return refuse_wire(d, at, FM_DIR_E_VARINT);
        if (f->v > (uint64_t)(r->end - r->p))
            return refuse_wire(d, at, FM_DIR_E_TRUNCATED);
        f->sub.p = r->p;
        f->sub.end = r->p + f->v;
        r->p = f->sub.end;
        return 0;
    case 5:
        return fixed(d, r, 4);
    default:
        return refuse_wire(d, at, FM_DIR_E_WIRETYPE);
    }
}

/* Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF). */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        while (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i == n)
            break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c < 0xc2) {
            return 0;
        } else if (c < 0xe0) {
            if (n - i < 2 || (s[i + 1] & 0xc0) != 0x80)
                return 0;
            i += 2;
        } else if (c < 0xf0) {
            if (n - i < 3 || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80)
                return 0;
            if ((c == 0xe0 && s[i + 1] < 0xa0) || (c == 0xed && s[i + 1] > 0x9f))
                return 0;
            i += 3;
        } else if (c < 0xf5) {
            if (n - i < 4 || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80 ||
                (s[i + 3] & 0xc0) != 0x80)
                return 0;
            if ((c == 0xf0 && s[i + 1] < 0x90) || (c == 0xf4 && s[i + 1] > 0x8f))
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* A string field's payload: valid UTF-8, then its range. */
static int text(struct dec *d, const struct field *f, uint32_t *off, uint32_t *len)
{
    size_t n = (size_t)(f->sub.end - f->sub.p);
    if (!utf8_valid(f->sub.p, n))
        return refuse_wire(d, f->sub.p, FM_DIR_E_UTF8);
    *off = (uint32_t)(f->sub.p - d->buf);
    *len = (uint32_t)n;
    return 0;
}

/* ---- the messages: every field decoded into e (merged, as protobuf does) ---- */

static int digest(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc == 0 && f.num == 1 && f.wt == 2)
            rc = text(d, &f, &e->hash_off, &e->hash_len);
        else if (rc == 0 && f.num == 2 && f.wt == 0)
            e->size = (int64_t)f.v;
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int timestamp(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc < 0)
            return rc;
        if (f.num == 1 && f.wt == 0)
            e->sec = (int64_t)f.v;
        else if (f.num == 2 && f.wt == 0)
            e->nanos = (int32_t)(uint32_t)f.v;
    }
    return 0;
}

static int uint32_value(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc < 0)
            return rc;
        if (f.num == 1 && f.wt == 0)
            e->mode = (uint32_t)f.v;
    }
    return 0;
}

/* NodeProperty: two strings, decoded for their UTF-8 check only. */
static int property(struct dec *d, struct rd r)
{
    struct field f;
    uint32_t off, len;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc == 0 && (f.num == 1 || f.num == 2) && f.wt == 2)
            rc = text(d, &f, &off, &len);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int properties(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc == 0 && f.num == 1 && f.wt == 2) {
            rc = property(d, f.sub);
        } else if (rc == 0 && f.num == 2 && f.wt == 2) {
            e->has_mtime = 1;
            rc = timestamp(d, f.sub, e);
        } else if (rc == 0 && f.num == 3 && f.wt == 2) {
            e->has_mode = 1;
            rc = uint32_value(d, f.sub, e);
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int file_node(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc == 0 && f.num == 1 && f.wt == 2) {
            rc = text(d, &f, &e->name_off, &e->name_len);
        } else if (rc == 0 && f.num == 2 && f.wt == 2) {
            rc = digest(d, f.sub, e);
        } else if (rc == 0 && f.num == 4 && f.wt == 0) {
            e->exec = f.v != 0;
        } else if (rc == 0 && f.num == 6 && f.wt == 2) {
            e->has_props = 1;
            rc = properties(d, f.sub, e);
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int directory_node(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc == 0 && f.num == 1 && f.wt == 2)
            rc = text(d, &f, &e->name_off, &e->name_len);
        else if (rc == 0 && f.num == 2 && f.wt == 2)
            rc = digest(d, f.sub, e);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int symlink_node(struct dec *d, struct rd r, struct ent *e)
{
    struct field f;
    struct ent ignored = {0}; /* a symlink's NodeProperties mean nothing here */
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc == 0 && f.num == 1 && f.wt == 2)
            rc = text(d, &f, &e->name_off, &e->name_len);
        else if (rc == 0 && f.num == 2 && f.wt == 2)
            rc = text(d, &f, &e->target_off, &e->target_len);
        else if (rc == 0 && f.num == 4 && f.wt == 2)
            rc = properties(d, f.sub, &ignored);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Byte order of two entries' names: UTF-8 byte order is code point order. */
static int name_cmp(const struct dec *d, const struct ent *a, const struct ent *b)
{
    size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
    int c = n ? memcmp(d->buf + a->name_off, d->buf + b->name_off, n) : 0;
    if (c != 0)
        return c;
    return (a->name_len > b->name_len) - (a->name_len < b->name_len);
}

/* Appends e to list `which`: the order check on every entry, kept while the
 * entries are within max_entries (beyond it the message is refused). */
static int add(struct dec *d, int which, const struct ent *e)
{
    struct list *l = &d->l[which];
    if (l->n > 0 && l->unsorted < 0 && name_cmp(d, &l->last, e) > 0) {
        l->unsorted = (int64_t)l->n - 1;
        l->bad = l->last;
        l->next = *e;
    }
    l->last = *e;
    l->n++;
    if (++d->total > d->keep)
        return 0;
    if (l->stored == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        if (cap > SIZE_MAX / sizeof(*l->v))
            return -ENOMEM;
        struct ent *v = realloc(l->v, cap * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->stored++] = *e;
    return 0;
}

static int directory(struct dec *d, struct rd r)
{
    struct field f;
    struct ent ignored = {0}; /* the Directory's own NodeProperties: ignored */
    while (r.p < r.end) {
        int rc = next(d, &r, &f);
        if (rc < 0)
            return rc;
        if (f.wt != 2 || f.num == 4 || f.num > 5)
            continue;
        struct ent e = {0};
        if (f.num == 1)
            rc = file_node(d, f.sub, &e);
        else if (f.num == 2)
            rc = directory_node(d, f.sub, &e);
        else if (f.num == 3)
            rc = symlink_node(d, f.sub, &e);
        else
            rc = properties(d, f.sub, &ignored);
        if (rc == 0 && f.num <= 3)
            rc = add(d, (int)f.num - 1, &e);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* ---- validation, in build_node's order ---- */

static int name_problem(const struct dec *d, const struct ent *e)
{
    const uint8_t *s = d->buf + e->name_off;
    size_t n = e->name_len;
    if (n == 0 || (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
        return FM_DIR_E_RESERVED;
    if (memchr(s, '/', n) != NULL || memchr(s, '\0', n) != NULL)
        return FM_DIR_E_SLASH;
    if ((int64_t)n > d->opts->max_name_bytes)
        return FM_DIR_E_LONG;
    return 0;
}

/* Whether a name equal to e's is in the sorted list l. */
static int in_list(const struct dec *d, const struct list *l, const struct ent *e)
{
    size_t lo = 0, hi = l->stored;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = name_cmp(d, &l->v[mid], e);
        if (c == 0)
            return 1;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static int hex64(const struct dec *d, const struct ent *e)
{
    if (e->hash_len != HASH_LEN)
        return 0;
    const uint8_t *h = d->buf + e->hash_off;
    for (size_t i = 0; i < HASH_LEN; i++)
        if (!((h[i] >= '0' && h[i] <= '9') || (h[i] >= 'a' && h[i] <= 'f')))
            return 0;
    return 1;
}

/* A validated hash's digest is impossible: size < 0, or 0 for another blob. */
static int impossible(const struct dec *d, const struct ent *e)
{
    return e->size < 0 || (e->size == 0 && memcmp(d->buf + e->hash_off, empty_hash, HASH_LEN));
}

/* Names: order, count, each one a path component, no duplicate. */
static int check_names(struct dec *d)
{
    for (uint32_t k = 0; k < 3; k++) {
        const struct list *l = &d->l[k];
        if (l->unsorted >= 0)
            return refuse(d, FM_DIR_E_UNSORTED, k, (size_t)l->unsorted, &l->bad, l->next.name_off,
                          l->next.name_len, 0, 0);
    }
    if (d->opts->max_entries < 0 || d->total > (uint64_t)d->opts->max_entries)
        return refuse(d, FM_DIR_E_TOO_MANY, 0, 0, NULL, 0, 0, 0, 0);
    for (uint32_t k = 0; k < 3; k++) {
        const struct list *l = &d->l[k];
        for (size_t i = 0; i < l->n; i++) {
            int code = name_problem(d, &l->v[i]);
            if (code)
                return refuse(d, (uint32_t)code, k, i, &l->v[i], 0, 0, 0, 0);
        }
    }
    /* Sorted lists: an earlier equal name is the previous one, or in an
     * earlier list. */
    for (uint32_t k = 0; k < 3; k++) {
        const struct list *l = &d->l[k];
        for (size_t i = 0; i < l->n; i++) {
            const struct ent *e = &l->v[i];
            int dup = i > 0 && name_cmp(d, &l->v[i - 1], e) == 0;
            for (uint32_t j = 0; j < k && !dup; j++)
                dup = in_list(d, &d->l[j], e);
            if (dup)
                return refuse(d, FM_DIR_E_DUPLICATE, k, i, e, 0, 0, 0, 0);
        }
    }
    return 0;
}

/* Files: hashes, then each file's digest and NodeProperties; sets op, src,
 * out_mode and mtime_ns. */
static int check_files(struct dec *d, int *has_mtimes)
{
    struct list *l = &d->l[FM_DIR_FILES];
    for (size_t i = 0; i < l->n; i++) {
        const struct ent *e = &l->v[i];
        if (!hex64(d, e))
            return refuse(d, FM_DIR_E_HASH, FM_DIR_FILES, i, e, e->hash_off, e->hash_len, 0, 0);
    }
    for (size_t i = 0; i < l->n; i++) {
        struct ent *e = &l->v[i];
        if (impossible(d, e))
            return refuse(d, FM_DIR_E_DIGEST, FM_DIR_FILES, i, e, e->hash_off, e->hash_len, e->size,
                          0);
        e->mtime_ns = -1;
        if (e->has_props && (e->has_mode || e->has_mtime)) {
            uint32_t mode = e->has_mode ? e->mode : e->exec ? 0555 : 0444;
            if (mode > 07777)
                return refuse(d, FM_DIR_E_MODE, FM_DIR_FILES, i, e, 0, 0, mode, 0);
            if (e->has_mtime) {
                if (e->sec < 0 || e->nanos < 0 || e->nanos >= NS_PER_S ||
                    e->sec > INT64_MAX / NS_PER_S ||
                    (uint64_t)e->sec * NS_PER_S + (uint64_t)e->nanos > INT64_MAX)
                    return refuse(d, FM_DIR_E_MTIME, FM_DIR_FILES, i, e, 0, 0, e->sec, e->nanos);
                e->mtime_ns = e->sec * NS_PER_S + e->nanos;
                *has_mtimes = 1;
            }
            e->op = e->size ? FM_OP_COPY : FM_OP_EMPTY;
            e->src = e->size ? SRC_BLOB : SRC_NONE;
            e->out_mode = mode & 0777; /* setuid / setgid / sticky dropped */
        } else if (e->size == 0) {
            e->op = FM_OP_EMPTY;
            e->src = SRC_NONE;
            e->out_mode = e->exec ? 0555 : 0444;
        } else {
            e->op = FM_OP_LINK;
            e->src = e->exec ? SRC_EXEC : SRC_BLOB;
            e->out_mode = e->exec ? 0555 : 0444;
        }
    }
    return 0;
}

static int check_symlinks(struct dec *d)
{
    const struct list *l = &d->l[FM_DIR_SYMLINKS];
    for (size_t i = 0; i < l->n; i++) {
        const struct ent *e = &l->v[i];
        if (e->target_len == 0 || memchr(d->buf + e->target_off, '\0', e->target_len) != NULL ||
            (int64_t)e->target_len > d->opts->max_target_bytes)
            return refuse(d, FM_DIR_E_TARGET, FM_DIR_SYMLINKS, i, e, e->target_off, e->target_len,
                          0, 0);
    }
    return 0;
}

static int check_dirs(struct dec *d)
{
    const struct list *l = &d->l[FM_DIR_DIRS];
    for (size_t i = 0; i < l->n; i++) {
        const struct ent *e = &l->v[i];
        if (!hex64(d, e))
            return refuse(d, FM_DIR_E_HASH, FM_DIR_DIRS, i, e, e->hash_off, e->hash_len, 0, 0);
    }
    for (size_t i = 0; i < l->n; i++) {
        const struct ent *e = &l->v[i];
        if (impossible(d, e))
            return refuse(d, FM_DIR_E_DIGEST, FM_DIR_DIRS, i, e, e->hash_off, e->hash_len, e->size,
                          0);
    }
    return 0;
}

/* ---- packing ---- */

static size_t digits(uint64_t v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

/* "<hash>-<size>\0"; returns the end. */
static char *put_key(const struct dec *d, char *p, const struct ent *e)
{
    memcpy(p, d->buf + e->hash_off, HASH_LEN);
    p += HASH_LEN;
    *p++ = '-';
    uint64_t v = (uint64_t)e->size;
    size_t n = digits(v);
    for (size_t i = n; i-- > 0; v /= 10)
        p[i] = (char)('0' + v % 10);
    p[n] = '\0';
    return p + n + 1;
}

static size_t key_len(const struct ent *e)
{
    return HASH_LEN + 1 + digits((uint64_t)e->size) + 1;
}

/* "<prefix><hh>/<hash>-<size>\0" (fastmat.cas.layout's blob_rel / exec_rel). */
static char *put_path(const struct dec *d, char *p, const char *prefix, size_t plen,
                      const struct ent *e)
{
    memcpy(p, prefix, plen);
    p += plen;
    memcpy(p, d->buf + e->hash_off, 2);
    p[2] = '/';
    return put_key(d, p + 3, e);
}

static char *put_str(char *p, const uint8_t *s, size_t n)
{
    if (n)
        memcpy(p, s, n);
    p[n] = '\0';
    return p + n + 1;
}

static int pack(struct dec *d, int has_mtimes, struct fm_dir **out)
{
    const struct list *files = &d->l[FM_DIR_FILES], *dirs = &d->l[FM_DIR_DIRS];
    const struct list *syms = &d->l[FM_DIR_SYMLINKS];
    const char *bp = d->opts->blob_prefix ? d->opts->blob_prefix : "";
    const char *xp = d->opts->exec_prefix ? d->opts->exec_prefix : "";
    size_t bplen = strlen(bp), xplen = strlen(xp);
    struct fm_dir h = {0};
    uint64_t n = files->n + syms->n, longest = 0;

    h.n_files = files->n;
    h.n_symlinks = syms->n;
    h.n_dirs = dirs->n;
    h.has_mtimes = (uint64_t)has_mtimes;
    for (size_t i = 0; i < files->n; i++) {
        const struct ent *e = &files->v[i];
        size_t key = key_len(e);
        h.names_len += e->name_len + 1;
        h.srcs_len += e->src == SRC_NONE ? 1 : (e->src == SRC_EXEC ? xplen : bplen) + 3 + key;
        if (e->size > 0) {
            h.n_blobs++;
            h.blobs_len += bplen + 3 + key;
        }
        if (e->src == SRC_EXEC) {
            h.n_execs++;
            h.execs_len += key;
        }
        uint64_t lo = h.n_bytes_lo + (uint64_t)e->size;
        h.n_bytes_hi += lo < h.n_bytes_lo;
        h.n_bytes_lo = lo;
        longest = e->name_len > longest ? e->name_len : longest;
    }
    for (size_t i = 0; i < syms->n; i++) {
        const struct ent *e = &syms->v[i];
        h.names_len += e->name_len + 1;
        h.srcs_len += e->target_len + 1;
        longest = e->name_len > longest ? e->name_len : longest;
    }
    for (size_t i = 0; i < dirs->n; i++) {
        const struct ent *e = &dirs->v[i];
        h.child_names_len += e->name_len + 1;
        h.child_keys_len += key_len(e);
        longest = e->name_len > longest ? e->name_len : longest;
    }
    h.longest_name = longest;
    h.mtimes = sizeof(h);
    h.modes = h.mtimes + (has_mtimes ? 8 * n : 0);
    h.ops = h.modes + 4 * n;
    h.names = h.ops + n;
    h.srcs = h.names + h.names_len;
    h.blobs = h.srcs + h.srcs_len;
    h.execs = h.blobs + h.blobs_len;
    h.child_names = h.execs + h.execs_len;
    h.child_keys = h.child_names + h.child_names_len;
    h.size = h.child_keys + h.child_keys_len;
    if (h.size > SIZE_MAX)
        return -ENOMEM;
    char *blk = malloc((size_t)h.size);
    if (blk == NULL)
        return -ENOMEM;
    memcpy(blk, &h, sizeof(h));

    int64_t *mtimes = has_mtimes ? (int64_t *)(blk + h.mtimes) : NULL;
    uint32_t *modes = (uint32_t *)(blk + h.modes);
    uint8_t *ops = (uint8_t *)(blk + h.ops);
    char *names = blk + h.names, *srcs = blk + h.srcs, *blobs = blk + h.blobs;
    char *execs = blk + h.execs;
    for (size_t i = 0; i < files->n; i++) {
        const struct ent *e = &files->v[i];
        ops[i] = e->op;
        modes[i] = e->out_mode;
        if (mtimes)
            mtimes[i] = e->mtime_ns;
        names = put_str(names, d->buf + e->name_off, e->name_len);
        if (e->src == SRC_NONE)
            *srcs++ = '\0';
        else if (e->src == SRC_EXEC)
            srcs = put_path(d, srcs, xp, xplen, e);
        else
            srcs = put_path(d, srcs, bp, bplen, e);
        if (e->size > 0)
            blobs = put_path(d, blobs, bp, bplen, e);
        if (e->src == SRC_EXEC)
            execs = put_key(d, execs, e);
    }
    for (size_t i = 0; i < syms->n; i++) {
        const struct ent *e = &syms->v[i];
        size_t j = files->n + i;
        ops[j] = FM_OP_SYMLINK;
        modes[j] = 0777;
        if (mtimes)
            mtimes[j] = -1;
        names = put_str(names, d->buf + e->name_off, e->name_len);
        srcs = put_str(srcs, d->buf + e->target_off, e->target_len);
    }
    char *child_names = blk + h.child_names, *child_keys = blk + h.child_keys;
    for (size_t i = 0; i < dirs->n; i++) {
        const struct ent *e = &dirs->v[i];
        child_names = put_str(child_names, d->buf + e->name_off, e->name_len);
        child_keys = put_key(d, child_keys, e);
    }
    *out = (struct fm_dir *)blk;
    return 0;
}

int32_t fm_dir_decode(const uint8_t *buf, uint64_t len, const struct fm_dir_opts *opts,
                      struct fm_dir **out, struct fm_dir_error *err)
{
    struct dec d = {.buf = buf, .opts = opts, .err = err};
    int has_mtimes = 0;
    int rc;

    for (int k = 0; k < 3; k++)
        d.l[k].unsorted = -1;
    d.keep = opts->max_entries < 0 ? 0 : (uint64_t)opts->max_entries;
    if (len > MAX_MESSAGE)
        return refuse_wire(&d, buf, FM_DIR_E_SIZE);
    rc = len ? directory(&d, (struct rd){buf, buf + len}) : 0;
    if (rc == 0)
        rc = check_names(&d);
    if (rc == 0)
        rc = check_files(&d, &has_mtimes);
    if (rc == 0)
        rc = check_symlinks(&d);
    if (rc == 0)
        rc = check_dirs(&d);
    if (rc == 0)
        rc = pack(&d, has_mtimes, out);
    for (int k = 0; k < 3; k++)
        free(d.l[k].v);
    return rc;
}

void fm_dir_free(struct fm_dir *dir)
{
    free(dir);
}
