/*
 * fm_probe.c - version, capabilities, the reflink probe, the filesystem type.
 */
#include "fm_internal.h"

#include <string.h>
#include <unistd.h>

uint32_t fm_abi_version(void)
{
    return FM_ABI_VERSION;
}

uint32_t fm_capabilities(void)
{
    uint32_t caps = 0;
#ifdef __linux__
    caps |= FM_CAP_FICLONE | FM_CAP_OVERLAY;
    /* Probed at run time: kernels before 5.6 lack openat2 (ENOSYS). */
    int fd = fm__openat_beneath(AT_FDCWD, ".");
    if (fd >= 0) {
        fm__close(fd);
        caps |= FM_CAP_OPENAT2;
    }
#endif /* __linux__ */
#ifdef __APPLE__
    caps |= FM_CAP_CLONEFILE;
#endif /* __APPLE__ */
    int64_t off_in = 0, off_out = 0;
    if (fm__copy_file_range(-1, &off_in, -1, &off_out, 0) != -ENOSYS)
        caps |= FM_CAP_COPY_FILE_RANGE;
    return caps;
}

int32_t fm_probe_reflink(int32_t dirfd)
{
    char a[FM_TMPNAME_MAX], b[FM_TMPNAME_MAX];
    char block[4096];
    int src = -1, dst = -1;
    int32_t rc;

    fm__tmpname(a);
    fm__tmpname(b);
    src = fm__openat(dirfd, a, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
    if (src < 0)
        return src;
    memset(block, 'f', sizeof(block));
    int64_t n = fm__write(src, block, sizeof(block));
    if (n < 0) {
        rc = (int32_t)n;
        goto out;
    }
    dst = fm__clone_create(src, dirfd, b);
    if (dst >= 0) {
        rc = 1;
        fm__close(dst);
        fm__unlinkat(dirfd, b, 0);
    } else if (dst == -ENOTSUP || dst == -EXDEV) {
        rc = 0;
    } else {
        rc = dst;
    }
out:
    fm__close(src);
    fm__unlinkat(dirfd, a, 0);
    return rc;
}

int32_t fm_fs_magic(int32_t fd, uint64_t *magic)
{
    uint64_t m = 0;
    int rc = fm__fs_magic(fd, &m);
    if (rc == 0)
        *magic = m;
    return rc;
}
