"""The only module that imports the compiled core: typed wrappers, errno -> OSError.

Every C function returns 0 or -errno; :func:`check` turns a failure into
``OSError(err, os.strerror(err), path, None, path2)``, which Python maps to
``FileNotFoundError``, ``FileExistsError``... by itself. cffi releases the GIL
for every call, so all of these run in parallel from several threads.
"""

from __future__ import annotations

import array
import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from fastmat.errors import NativeBuildError

try:
    # `x as x`: re-exported on purpose (tests reach the raw C calls through here)
    from fastmat._native import ffi as ffi  # noqa: PLC0414
    from fastmat._native import lib as lib  # noqa: PLC0414
except ImportError as exc:  # pragma: no cover - depends on the install
    raise NativeBuildError(
        f"fastmat's compiled core (fastmat._native) cannot be imported ({exc}); "
        "reinstall fastmat (pip install --force-reinstall fastmat, or "
        "pip install -e . in a checkout) to rebuild it"
    ) from exc

#: The ABI of csrc/fastmat.h this module was written against.
ABI_VERSION = 8

if lib.fm_abi_version() != ABI_VERSION:  # pragma: no cover - a stale build
    raise NativeBuildError(
        f"fastmat's compiled core is stale: it reports ABI {lib.fm_abi_version()}, "
        f"this fastmat needs ABI {ABI_VERSION}; reinstall fastmat to rebuild it "
        "(pip install -e . in a checkout)"
    )

AT_FDCWD: int = lib.AT_FDCWD

CAPS: int = int(lib.fm_capabilities())
HAS_FICLONE = bool(CAPS & lib.FM_CAP_FICLONE)
HAS_CLONEFILE = bool(CAPS & lib.FM_CAP_CLONEFILE)
HAS_COPY_FILE_RANGE = bool(CAPS & lib.FM_CAP_COPY_FILE_RANGE)
HAS_OPENAT2 = bool(CAPS & lib.FM_CAP_OPENAT2)
HAS_OVERLAY = bool(CAPS & lib.FM_CAP_OVERLAY)

FM_OP_LINK: int = lib.FM_OP_LINK
FM_OP_SYMLINK: int = lib.FM_OP_SYMLINK
FM_OP_EMPTY: int = lib.FM_OP_EMPTY
FM_OP_COPY: int = lib.FM_OP_COPY

FM_HOW_NONE: int = lib.FM_HOW_NONE
FM_HOW_LINK: int = lib.FM_HOW_LINK
FM_HOW_REFLINK: int = lib.FM_HOW_REFLINK
FM_HOW_COPY: int = lib.FM_HOW_COPY
FM_HOW_SYMLINK: int = lib.FM_HOW_SYMLINK
FM_HOW_CREATE: int = lib.FM_HOW_CREATE
FM_HOW_METHOD_MASK: int = lib.FM_HOW_METHOD_MASK
FM_HOW_ROTATED: int = lib.FM_HOW_ROTATED
FM_HOW_XDEV: int = lib.FM_HOW_XDEV
FM_HOW_DENIED: int = lib.FM_HOW_DENIED

Site = Literal["link", "reflink", "copy", "mkdir", "symlink", "rename", "sync"]
_SITES: dict[str, int] = {
    "link": lib.FM_SITE_LINK,
    "reflink": lib.FM_SITE_REFLINK,
    "copy": lib.FM_SITE_COPY,
    "mkdir": lib.FM_SITE_MKDIR,
    "symlink": lib.FM_SITE_SYMLINK,
    "rename": lib.FM_SITE_RENAME,
    "sync": lib.FM_SITE_SYNC,
}

SyncMode = Literal["fsync", "syncfs", "writeback"]
_SYNC_MODES: dict[str, int] = {
    "fsync": lib.FM_SYNC_FSYNC,
    "syncfs": lib.FM_SYNC_SYNCFS,
    "writeback": lib.FM_SYNC_WRITEBACK,
}

StrPath = str | os.PathLike[str]


def _b(path: StrPath) -> bytes:
    return os.fsencode(path)


def _s(path: StrPath) -> str:
    return os.fsdecode(path)


def check(rc: int, path: StrPath | None = None, path2: StrPath | None = None) -> None:
    """Raises ``OSError(-rc, ...)`` (with the paths) when rc is a negative errno."""
    if rc < 0:
        err = -rc
        p1 = None if path is None else _s(path)
        p2 = None if path2 is None else _s(path2)
        raise OSError(err, os.strerror(err), p1, None, p2)


def link(src_dirfd: int, src: StrPath, dst_dirfd: int, dst: StrPath) -> None:
    """Hard-links src to dst (linkat without following): EEXIST, ENOENT, EXDEV, EMLINK..."""
    check(lib.fm_link(src_dirfd, _b(src), dst_dirfd, _b(dst)), src, dst)


def reflink(src_dirfd: int, src: StrPath, dst_dirfd: int, dst: StrPath, mode: int) -> None:
    """A new inode dst sharing src's extents, with exactly `mode`; ENOTSUP where impossible."""
    check(lib.fm_reflink(src_dirfd, _b(src), dst_dirfd, _b(dst), mode), src, dst)


def copy(src_dirfd: int, src: StrPath, dst_dirfd: int, dst: StrPath, mode: int) -> None:
    """A new inode dst with src's bytes and exactly `mode` (dst must not exist)."""
    check(lib.fm_copy(src_dirfd, _b(src), dst_dirfd, _b(dst), mode), src, dst)


def private_copy(
    src_dirfd: int,
    src: StrPath,
    dst_dirfd: int,
    dst: StrPath,
    mode: int,
    *,
    fsync: bool = True,
    noreplace: bool = True,
    reflink: bool | None = None,
) -> str:
    """The durable recipe (temp, reflink-or-copy, fchmod, fsync, rename).

    Returns ``"reflink"`` or ``"copy"``. ``reflink=None`` tries a reflink then
    copies, ``True`` only reflinks (ENOTSUP otherwise), ``False`` only copies.
    Raises ``FileExistsError`` when `noreplace` and dst exists.
    """
    flags = (lib.FM_F_FSYNC if fsync else 0) | (lib.FM_F_NOREPLACE if noreplace else 0)
    if reflink is True:
        flags |= lib.FM_F_REFLINK_FORCE
    elif reflink is False:
        flags |= lib.FM_F_NO_REFLINK
    how = ffi.new("uint8_t *")
    check(lib.fm_private_copy(src_dirfd, _b(src), dst_dirfd, _b(dst), mode, flags, how), src, dst)
    return "reflink" if how[0] == FM_HOW_REFLINK else "copy"


def durable_write(
    dst_dirfd: int,
    dst: StrPath,
    data: bytes,
    mode: int,
    *,
    fsync: bool = True,
    noreplace: bool = True,
) -> None:
    """Writes data to dst via a temp + rename; FileExistsError when `noreplace` and taken."""
    flags = (lib.FM_F_FSYNC if fsync else 0) | (lib.FM_F_NOREPLACE if noreplace else 0)
    buf = ffi.from_buffer("uint8_t[]", data)
    check(lib.fm_durable_write(dst_dirfd, _b(dst), buf, len(data), mode, flags), dst)


def publish(
    src_dirfd: int,
    src: StrPath,
    dst_dirfd: int,
    dst: StrPath,
    *,
    noreplace: bool = True,
    fsync: bool = False,
) -> None:
    """Renames a complete file into place (RENAME_NOREPLACE when `noreplace`)."""
    flags = (lib.FM_F_FSYNC if fsync else 0) | (lib.FM_F_NOREPLACE if noreplace else 0)
    check(lib.fm_publish(src_dirfd, _b(src), dst_dirfd, _b(dst), flags), src, dst)


def _packed(names: list[bytes]) -> bytes:
    if any(b"\0" in n for n in names):
        raise ValueError("a name holds a NUL byte")
    return b"".join(n + b"\0" for n in names)


def sync_batch(
    dirfd: int, names: list[bytes], mode: SyncMode, *, threads: int = 0
) -> array.array[int]:
    """Group commit, step 1 (``fm_sync_batch``): ``"fsync"`` every file on a pool of
    ``threads``, one ``"syncfs"`` of the filesystem, or only start every file's
    ``"writeback"``. Returns the per-file status (0 or -errno); never raises for a
    file's failure (the caller decides what is published)."""
    status = array.array("i", bytes(4 * len(names)))
    if not names:
        return status
    rc = lib.fm_sync_batch(
        dirfd,
        _packed(names),
        len(names),
        _SYNC_MODES[mode],
        threads,
        ffi.from_buffer("int32_t[]", status, require_writable=True),
    )
    if rc in (-errno.ENOMEM, -errno.EINVAL, -errno.ENOTSUP) and not any(status):
        check(rc)
    return status


def publish_batch(
    src_dirfd: int,
    srcs: list[bytes],
    dst_dirfd: int,
    dsts: list[bytes],
    *,
    noreplace: bool = True,
    fsync: bool = True,
    threads: int = 0,
) -> tuple[int, array.array[int]]:
    """Group commit, step 2 (``fm_publish_batch``): renames ``srcs[i]`` to ``dsts[i]``,
    then fsyncs each directory that got a name once. Returns (rc, status per name):
    status 0, -EEXIST (taken: the temp was unlinked) or -errno; rc 0, the first
    failure other than -EEXIST, else a directory fsync's failure."""
    if len(srcs) != len(dsts):
        raise ValueError("srcs and dsts differ in length")
    status = array.array("i", bytes(4 * len(srcs)))
    if not srcs:
        return 0, status
    flags = (lib.FM_F_FSYNC if fsync else 0) | (lib.FM_F_NOREPLACE if noreplace else 0)
    rc = lib.fm_publish_batch(
        src_dirfd,
        _packed(srcs),
        dst_dirfd,
        _packed(dsts),
        len(srcs),
        flags,
        threads,
        ffi.from_buffer("int32_t[]", status, require_writable=True),
    )
    if rc == -errno.ENOMEM:
        check(rc)
    return int(rc), status


def fs_magic(fd: int) -> int:
    """The ``f_type`` of the filesystem holding ``fd`` (fstatfs)."""
    out = ffi.new("uint64_t *")
    check(lib.fm_fs_magic(fd, out))
    return int(out[0])


def remove_tree(path: StrPath, dirfd: int = AT_FDCWD) -> None:
    """Removes path and everything below it, never following a symlink nor chmod'ing a file.

    FileNotFoundError if path does not exist; OSError(EBUSY) for a mount point.
    """
    check(lib.fm_remove_tree(dirfd, _b(path)), path)


def probe_reflink(dirpath: StrPath) -> bool:
    """Whether a reflink works in this directory's filesystem (creates two temp files)."""
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rc = lib.fm_probe_reflink(fd)
    finally:
        os.close(fd)
    check(rc, dirpath)
    return bool(rc)


def mount_overlay(lower: StrPath, upper: StrPath, work: StrPath, target: StrPath) -> None:
    """Mounts an overlay (nosuid, nodev) at target; PermissionError without CAP_SYS_ADMIN."""
    check(lib.fm_mount_overlay(_b(lower), _b(upper), _b(work), _b(target)), target, lower)


def umount(target: StrPath, detach: bool = False) -> None:
    """umount2(target, MNT_DETACH if detach)."""
    check(lib.fm_umount(_b(target), 1 if detach else 0), target)


def clone_tree(src_dirfd: int, src: StrPath, dst_dirfd: int, dst: StrPath) -> None:
    """macOS clonefile(2) of a whole tree; OSError(ENOTSUP) elsewhere."""
    check(lib.fm_clone_tree(src_dirfd, _b(src), dst_dirfd, _b(dst)), src, dst)


@dataclass
class PlanArrays:
    """A flat plan in the layout of ``struct fm_plan`` (see csrc/fastmat.h)."""

    dir_parent: array.array[int]  # 'i'; dir_parent[0] == -1
    dir_names: bytes  # n_dirs NUL-terminated names, b"\0" first (the root)
    op: bytes  # FM_OP_* per entry
    entry_dir: array.array[int]  # 'i'
    mode: array.array[int]  # 'I'
    mtime_ns: array.array[int] | None  # 'q' or None; < 0 leaves the mtime
    names: bytes  # n_entries NUL-terminated
    srcs: bytes  # n_entries NUL-terminated (path under src_dirfd / target / b"")
    dir_mode: int = 0o755

    @property
    def n_dirs(self) -> int:
        return len(self.dir_parent)

    @property
    def n_entries(self) -> int:
        return len(self.op)


class ExecControl:
    """Shared with the executor while it runs (``exec_plan(ctl=...)``), from any thread:
    ``cancel()`` stops it between chunks (entries never started stay -ECANCELED);
    ``done`` is the number of entries finished so far (updated chunk by chunk)."""

    def __init__(self) -> None:
        self.c = ffi.new("struct fm_exec_ctl *")

    def cancel(self) -> None:
        self.c.cancel = 1

    @property
    def cancelled(self) -> bool:
        return bool(self.c.cancel)

    @property
    def done(self) -> int:
        return int(self.c.done)


@dataclass
class ExecResult:
    rc: int  # 0 or the first -errno (directories first, then entries, in plan order)
    status: array.array[int]  # 'i' per entry: 0, -errno, or -ECANCELED (never attempted)
    how: bytes  # FM_HOW_* per entry
    dir_status: array.array[int]  # 'i' per directory


def _malformed(why: str) -> OSError:
    return OSError(errno.EINVAL, f"malformed plan: {why}")


def _typed(arr: array.array[int], code: str, n: int, what: str) -> None:
    if arr.itemsize != array.array(code).itemsize:
        raise _malformed(f"{what} must be array('{code}')")
    if len(arr) != n:
        raise _malformed(f"{what} has {len(arr)} items for {n}")


class _CPlan:
    """A ``struct fm_plan`` pointing into a PlanArrays (kept alive with it)."""

    def __init__(self, plan: PlanArrays) -> None:
        nd, ne = plan.n_dirs, plan.n_entries
        if nd < 1:
            raise _malformed("no root directory")
        _typed(plan.dir_parent, "i", nd, "dir_parent")
        _typed(plan.entry_dir, "i", ne, "entry_dir")
        _typed(plan.mode, "I", ne, "mode")
        if plan.mtime_ns is not None:
            _typed(plan.mtime_ns, "q", ne, "mtime_ns")
        for what, buf, n in (
            ("dir_names", plan.dir_names, nd),
            ("names", plan.names, ne),
            ("srcs", plan.srcs, ne),
        ):
            if buf.count(0) != n or (n and buf[-1] != 0):
                raise _malformed(f"{what} holds {buf.count(0)} NUL-terminated strings for {n}")
        self.keep = [
            ffi.from_buffer("int32_t[]", plan.dir_parent),
            ffi.from_buffer("char[]", plan.dir_names),
            ffi.from_buffer("uint8_t[]", plan.op) if ne else ffi.NULL,
            ffi.from_buffer("int32_t[]", plan.entry_dir) if ne else ffi.NULL,
            ffi.from_buffer("uint32_t[]", plan.mode) if ne else ffi.NULL,
            ffi.from_buffer("int64_t[]", plan.mtime_ns)
            if plan.mtime_ns is not None and ne
            else ffi.NULL,
            ffi.from_buffer("char[]", plan.names) if ne else ffi.NULL,
            ffi.from_buffer("char[]", plan.srcs) if ne else ffi.NULL,
        ]
        c = ffi.new("struct fm_plan *")
        c.n_dirs = nd
        c.dir_parent, c.dir_names = self.keep[0], self.keep[1]
        c.dir_mode = plan.dir_mode
        c.n_entries = ne
        c.op, c.entry_dir, c.mode, c.mtime_ns, c.names, c.srcs = self.keep[2:]
        self.c = c
        if lib.fm_plan_check(c) < 0:
            raise _malformed(
                "a parent after its child, an index out of range, a directory's entries "
                "not contiguous, a bad op or mode, or a name that is not one component"
            )


def exec_plan(
    dest_dirfd: int,
    src_dirfd: int,
    plan: PlanArrays,
    *,
    threads: int = 0,
    max_inflight: int = 64,
    dirs_exist: bool = False,
    keep_going: bool = False,
    tmp_dirfd: int = -1,
    check_srcs: bool = False,
    ctl: ExecControl | None = None,
) -> ExecResult:
    """Runs the plan on the C pool. Per-item failures are in the result, never raised.

    ``check_srcs`` (FM_EXEC_CHECK_SRCS): every LINK / COPY src must be a regular
    file under ``src_dirfd`` before anything is created; otherwise nothing is, each
    failing entry's status says why (-ENOENT absent, -ELOOP symlink, -EISDIR,
    -EINVAL other), all else stays -ECANCELED. After the entries, every LINK is
    checked to have made a regular file (-ELOOP for a symlink, -EINVAL otherwise:
    its src was swapped after any check). ``ctl`` (an :class:`ExecControl`) counts
    the entries done and can stop it between chunks: entries never started stay
    -ECANCELED, rc -ECANCELED.
    Raises ``OSError(EINVAL)`` for a malformed plan (nothing is done then).
    """
    cplan = _CPlan(plan)
    ne, nd = plan.n_entries, plan.n_dirs
    opts = ffi.new("struct fm_exec_opts *")
    opts.threads = threads
    opts.max_inflight = max_inflight
    opts.flags = (
        (lib.FM_EXEC_DIRS_EXIST if dirs_exist else 0)
        | (lib.FM_EXEC_KEEP_GOING if keep_going else 0)
        | (lib.FM_EXEC_CHECK_SRCS if check_srcs else 0)
    )
    opts.tmp_dirfd = tmp_dirfd
    opts.ctl = ctl.c if ctl is not None else ffi.NULL
    status = array.array("i", bytes(4 * ne))
    how = bytearray(ne)
    dir_status = array.array("i", bytes(4 * nd))
    rc = lib.fm_plan_exec(
        dest_dirfd,
        src_dirfd,
        cplan.c,
        opts,
        ffi.from_buffer("int32_t[]", status, require_writable=True) if ne else ffi.NULL,
        ffi.from_buffer("uint8_t[]", how, require_writable=True) if ne else ffi.NULL,
        ffi.from_buffer("int32_t[]", dir_status, require_writable=True),
    )
    return ExecResult(int(rc), status, bytes(how), dir_status)


def floor_exec(dest_dirfd: int, src_dirfd: int, plan: PlanArrays, threads: int) -> int:
    """The benchmark floor (mkdirat + linkat only); returns the elapsed nanoseconds."""
    cplan = _CPlan(plan)
    elapsed = ffi.new("uint64_t *")
    check(lib.fm_floor_exec(dest_dirfd, src_dirfd, cplan.c, threads, elapsed))
    return int(elapsed[0])


# ---- Directory messages (fm_dir_decode) ----

DIR_FILES: int = lib.FM_DIR_FILES
DIR_DIRS: int = lib.FM_DIR_DIRS
DIR_SYMLINKS: int = lib.FM_DIR_SYMLINKS
DIR_E_TRUNCATED: int = lib.FM_DIR_E_TRUNCATED
DIR_E_VARINT: int = lib.FM_DIR_E_VARINT
DIR_E_TAG: int = lib.FM_DIR_E_TAG
DIR_E_WIRETYPE: int = lib.FM_DIR_E_WIRETYPE
DIR_E_GROUP: int = lib.FM_DIR_E_GROUP
DIR_E_UTF8: int = lib.FM_DIR_E_UTF8
DIR_E_SIZE: int = lib.FM_DIR_E_SIZE
DIR_E_WIRE_MAX: int = lib.FM_DIR_E_WIRE_MAX
DIR_E_UNSORTED: int = lib.FM_DIR_E_UNSORTED
DIR_E_TOO_MANY: int = lib.FM_DIR_E_TOO_MANY
DIR_E_RESERVED: int = lib.FM_DIR_E_RESERVED
DIR_E_SLASH: int = lib.FM_DIR_E_SLASH
DIR_E_LONG: int = lib.FM_DIR_E_LONG
DIR_E_DUPLICATE: int = lib.FM_DIR_E_DUPLICATE
DIR_E_HASH: int = lib.FM_DIR_E_HASH
DIR_E_DIGEST: int = lib.FM_DIR_E_DIGEST
DIR_E_MODE: int = lib.FM_DIR_E_MODE
DIR_E_MTIME: int = lib.FM_DIR_E_MTIME
DIR_E_TARGET: int = lib.FM_DIR_E_TARGET

# struct fm_dir: every field a uint64_t (csrc/fastmat.h), read in one unpack.
_DIR_HEADER = struct.Struct(f"={ffi.sizeof('struct fm_dir') // 8}Q")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class DirectoryRefused(Exception):
    """``fm_dir_decode`` refused a message. ``code`` is a ``DIR_E_*``; codes up to
    ``DIR_E_WIRE_MAX`` are wire-format refusals (``offset``: where). Otherwise the
    entry is ``index`` of list ``which`` (``DIR_FILES`` / ``DIR_DIRS`` /
    ``DIR_SYMLINKS``), ``name`` its name, ``text`` the other string the code names
    (the next name, the hash, the target) and ``nums`` the numbers (size, mode,
    mtime seconds and nanoseconds); strings are the message's UTF-8 bytes."""

    def __init__(
        self,
        code: int,
        *,
        which: int,
        index: int,
        name: bytes,
        text: bytes,
        nums: tuple[int, int],
        offset: int,
    ) -> None:
        super().__init__(code, which, index, name, text, nums, offset)
        self.code = code
        self.which = which
        self.index = index
        self.name = name
        self.text = text
        self.nums = nums
        self.offset = offset


@dataclass(slots=True)
class DecodedDirectory:
    """``struct fm_dir`` as Python values (entries: the files, then the symlinks)."""

    n_files: int
    n_symlinks: int
    ops: bytes  # FM_OP_* per entry
    names: bytes  # NUL-terminated each
    srcs: bytes  # NUL-terminated each: CAS path, b"" (EMPTY) or symlink target
    modes: array.array[int]  # 'I'
    mtimes: array.array[int] | None  # 'q' (-1: none), None when no file has one
    child_names: list[bytes]
    child_keys: list[str]  # "<hash>-<size>" per directory
    blobs: list[bytes]  # the blob path each file with bytes reads
    exec_keys: list[str]  # "<hash>-<size>" of each file linked from the exec area
    n_bytes: int
    longest_name: int


def _int64(v: int) -> int:
    return max(_INT64_MIN, min(_INT64_MAX, v))


class DirectoryDecoder:
    """``fm_dir_decode`` with fixed limits and CAS area prefixes (one C struct)."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_name_bytes: int,
        max_target_bytes: int,
        blob_prefix: str,
        exec_prefix: str,
    ) -> None:
        self._prefixes = (
            ffi.new("char[]", blob_prefix.encode()),
            ffi.new("char[]", exec_prefix.encode()),
        )
        c = ffi.new("struct fm_dir_opts *")
        c.max_entries = _int64(max_entries)
        c.max_name_bytes = _int64(max_name_bytes)
        c.max_target_bytes = _int64(max_target_bytes)
        c.blob_prefix, c.exec_prefix = self._prefixes
        self._c = c

    def decode(self, data: bytes) -> DecodedDirectory:
        """Decodes and validates one Directory message; raises
        :class:`DirectoryRefused` (or ``OSError(ENOMEM)``)."""
        out = ffi.new("struct fm_dir **")
        err = ffi.new("struct fm_dir_error *")
        rc = lib.fm_dir_decode(ffi.from_buffer("uint8_t[]", data), len(data), self._c, out, err)
        if rc == -errno.EINVAL:
            raise DirectoryRefused(
                int(err.code),
                which=int(err.list),
                index=int(err.index),
                name=data[err.name_off : err.name_off + err.name_len],
                text=data[err.str_off : err.str_off + err.str_len],
                nums=(int(err.num[0]), int(err.num[1])),
                offset=int(err.offset),
            )
        check(rc)  # -ENOMEM
        blk = out[0]
        try:
            raw = ffi.buffer(blk, blk.size)[:]
        finally:
            lib.fm_dir_free(blk)
        (
            _,
            nf,
            ns,
            nd,
            nb,
            nx,
            longest,
            bytes_lo,
            bytes_hi,
            has_mtimes,
            mt,
            md,
            op,
            nm,
            nm_len,
            sr,
            sr_len,
            bl,
            bl_len,
            ex,
            ex_len,
            cn,
            cn_len,
            ck,
            ck_len,
        ) = _DIR_HEADER.unpack_from(raw)
        n = nf + ns
        view = memoryview(raw)
        modes = array.array("I")
        modes.frombytes(view[md : md + 4 * n])
        mtimes = None
        if has_mtimes:
            mtimes = array.array("q")
            mtimes.frombytes(view[mt : mt + 8 * n])
        return DecodedDirectory(
            n_files=nf,
            n_symlinks=ns,
            ops=raw[op : op + n],
            names=raw[nm : nm + nm_len],
            srcs=raw[sr : sr + sr_len],
            modes=modes,
            mtimes=mtimes,
            child_names=raw[cn : cn + cn_len].split(b"\0", nd)[:nd],
            child_keys=raw[ck : ck + ck_len].decode("ascii").split("\0", nd)[:nd],
            blobs=raw[bl : bl + bl_len].split(b"\0", nb)[:nb],
            exec_keys=raw[ex : ex + ex_len].decode("ascii").split("\0", nx)[:nx],
            n_bytes=bytes_lo | bytes_hi << 64,
            longest_name=longest,
        )


def inject(site: Site, err: int, count: int) -> None:
    """Tests only: the next `count` calls at `site` fail with `err` (negative errno); 0 clears."""
    if err > 0:
        err = -err
    lib.fm_inject(_SITES[site], err, count)


@contextmanager
def injected(site: Site, err: int, count: int = 1 << 30) -> Iterator[None]:
    """``inject`` for the duration of a with-block; the site is cleared on exit."""
    inject(site, err, count)
    try:
        yield
    finally:
        inject(site, 0, 0)
