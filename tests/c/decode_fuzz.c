/*
 * decode_fuzz.c - fm_dir_decode under AddressSanitizer and UBSan.
 *
 * Built by tests/test_decode_sanitized.py with csrc/fm_decode.c alone and
 * -fsanitize=address,undefined -fno-sanitize-recover=all, so a read past the
 * input, a leak, an overflow or a misaligned access aborts the run. Every file
 * of the corpus directory is copied into an exactly-sized malloc'ed buffer (a
 * byte past it is a redzone) and decoded with several limit sets: whole, at
 * every prefix, and after `iterations` random mutations (bytes flipped, set,
 * inserted, cut, a slice repeated). An accepted message's block is checked
 * against its header; a refusal's byte ranges against the input.
 *
 * usage: decode_fuzz CORPUS_DIR ITERATIONS SEED
 * prints: files F calls C accepted A refused R
 */
#include <stdint.h> /* before fastmat.h, which cffi reads as it is */

#include "fastmat.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INPUT_CAP (1 << 20)

static uint64_t state;
static unsigned long n_calls, n_accepted, n_refused;

static uint64_t rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static void fail(const char *what)
{
    fprintf(stderr, "decode_fuzz: %s\n", what);
    abort();
}

static size_t count_nul(const char *p, uint64_t n)
{
    size_t c = 0;
    for (uint64_t i = 0; i < n; i++)
        c += p[i] == 0;
    return c;
}

static void in_block(const struct fm_dir *d, uint64_t off, uint64_t len)
{
    if (off > d->size || len > d->size - off)
        fail("a range past the block");
}

static void check_block(const struct fm_dir *d)
{
    const char *b = (const char *)d;
    uint64_t n = d->n_files + d->n_symlinks;
    in_block(d, d->names, d->names_len);
    in_block(d, d->srcs, d->srcs_len);
    in_block(d, d->blobs, d->blobs_len);
    in_block(d, d->execs, d->execs_len);
    in_block(d, d->child_names, d->child_names_len);
    in_block(d, d->child_keys, d->child_keys_len);
    in_block(d, d->modes, 4 * n);
    in_block(d, d->ops, n);
    if (d->has_mtimes)
        in_block(d, d->mtimes, 8 * n);
    if (d->child_keys + d->child_keys_len != d->size)
        fail("the block does not end with the child keys");
    if (count_nul(b + d->names, d->names_len) != n || count_nul(b + d->srcs, d->srcs_len) != n ||
        count_nul(b + d->blobs, d->blobs_len) != d->n_blobs ||
        count_nul(b + d->execs, d->execs_len) != d->n_execs ||
        count_nul(b + d->child_names, d->child_names_len) != d->n_dirs ||
        count_nul(b + d->child_keys, d->child_keys_len) != d->n_dirs)
        fail("a string list does not hold its count");
    for (uint64_t i = 0; i < n; i++) {
        uint8_t op = (uint8_t)b[d->ops + i];
        if (op < FM_OP_LINK || op > FM_OP_COPY)
            fail("an unknown op");
    }
}

static void decode(const uint8_t *src, size_t len)
{
    static const struct fm_dir_opts opts[] = {
        {1000000, 255, 4095, "blobs/", "exec/"},
        {3, 5, 3, "blobs/", "exec/"},
        {0, 0, 0, "", ""},
        {-1, -1, -1, "b/", "e/"},
        {INT64_MAX, INT64_MAX, INT64_MAX, "b/", "e/"},
    };
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        fail("out of memory");
    memcpy(buf, src, len);
    for (size_t k = 0; k < sizeof(opts) / sizeof(opts[0]); k++) {
        struct fm_dir *out = NULL;
        struct fm_dir_error err;
        int32_t rc = fm_dir_decode(len ? buf : NULL, len, &opts[k], &out, &err);
        n_calls++;
        if (rc == 0) {
            n_accepted++;
            check_block(out);
            fm_dir_free(out);
        } else if (rc == -EINVAL) {
            n_refused++;
            if (err.name_off + err.name_len > len || err.str_off + err.str_len > len ||
                err.offset > len)
                fail("a refusal's range past the input");
        } else {
            fail("neither accepted nor refused");
        }
    }
    free(buf);
}

static size_t mutate(uint8_t *m, size_t len, size_t cap)
{
    int rounds = 1 + (int)(rnd() % 4);
    for (int j = 0; j < rounds; j++) {
        size_t at = len ? rnd() % len : 0, k;
        switch (rnd() % 5) {
        case 0: /* a byte flipped */
            if (len)
                m[at] ^= (uint8_t)(1 + rnd() % 255);
            break;
        case 1: /* a byte set, often to a continuation byte */
            if (len)
                m[at] = (uint8_t)(rnd() % 4 == 0 ? 0x80 | rnd() : rnd());
            break;
        case 2: /* up to 8 random bytes inserted */
            k = 1 + rnd() % 8;
            if (len + k <= cap) {
                memmove(m + at + k, m + at, len - at);
                for (size_t q = 0; q < k; q++)
                    m[at + q] = (uint8_t)rnd();
                len += k;
            }
            break;
        case 3: /* a cut */
            if (at < len) {
                k = 1 + rnd() % (len - at);
                memmove(m + at, m + at + k, len - at - k);
                len -= k;
            }
            break;
        default: /* a slice repeated */
            if (at < len) {
                k = 1 + rnd() % (len - at);
                if (len + k <= cap) {
                    memmove(m + at + k, m + at, len - at);
                    len += k;
                }
            }
        }
    }
    return len;
}

int main(int argc, char **argv)
{
    static uint8_t data[INPUT_CAP], mutant[2 * INPUT_CAP];
    if (argc != 4) {
        fprintf(stderr, "usage: decode_fuzz CORPUS_DIR ITERATIONS SEED\n");
        return 2;
    }
    long iterations = atol(argv[2]);
    state = strtoull(argv[3], NULL, 10) | 1;
    DIR *dir = opendir(argv[1]);
    if (dir == NULL) {
        perror(argv[1]);
        return 2;
    }
    unsigned long files = 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", argv[1], de->d_name);
        FILE *f = fopen(path, "rb");
        if (f == NULL) {
            perror(path);
            return 2;
        }
        size_t len = fread(data, 1, sizeof(data), f);
        fclose(f);
        files++;
        for (size_t cut = 0; cut <= len; cut++)
            decode(data, cut);
        for (long i = 0; i < iterations; i++) {
            memcpy(mutant, data, len);
            decode(mutant, mutate(mutant, len, sizeof(mutant)));
        }
    }
    closedir(dir);
    printf("files %lu calls %lu accepted %lu refused %lu\n", files, n_calls, n_accepted, n_refused);
    return 0;
}
