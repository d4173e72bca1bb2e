/*
 * fm_mount.c - overlay mounts (Linux) and whole-tree clones (macOS).
 */
#include "fm_internal.h"

#include <stdio.h>
#include <string.h>
#ifdef __linux__
#include <sys/mount.h>
#endif /* __linux__ */

/* Overlay options are comma separated and ':' separates lower layers; a path
 * containing either (or '\\', the escape) would be misparsed. */
static int overlay_safe(const char *s)
{
    return strpbrk(s, ",:\\") == NULL;
}

int32_t fm_mount_overlay(const char *lowerdir, const char *upperdir, const char *workdir,
                         const char *target)
{
#ifdef __linux__
    char opts[3 * 4096 + 64];
    if (!overlay_safe(lowerdir) || !overlay_safe(upperdir) || !overlay_safe(workdir))
        return -EINVAL;
    int n = snprintf(opts, sizeof(opts), "lowerdir=%s,upperdir=%s,workdir=%s", lowerdir, upperdir,
                     workdir);
    if (n < 0 || (size_t)n >= sizeof(opts))
        return -ENAMETOOLONG;
    return fm__mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, opts);
#else
    (void)lowerdir;
    (void)upperdir;
    (void)workdir;
    (void)target;
    return -ENOTSUP;
#endif /* __linux__ */
}

int32_t fm_umount(const char *target, int32_t detach)
{
#ifdef __linux__
    return fm__umount2(target, detach ? MNT_DETACH : 0);
#else
    (void)target;
    (void)detach;
    return -ENOTSUP;
#endif /* __linux__ */
}

int32_t fm_clone_tree(int32_t src_dirfd, const char *src, int32_t dst_dirfd, const char *dst)
{
    /* clonefile(2) copies a whole hierarchy; elsewhere this is -ENOTSUP. */
    return fm__clonefileat(src_dirfd, src, dst_dirfd, dst);
}
