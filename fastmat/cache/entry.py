"""A cache entry on disk: its sidecar (the replay plan, its size and a damage sample),
its identity, and the :class:`Damaged` signal a failed hit-time check raises.

An entry ``entries/<hash>-<size>/`` is a materialized tree; ``entries/<hash>-<size>.plan``
(this module's format) lets a hit replay it without a readdir+stat walk: the same flat
``PlanArrays`` the executor consumes, with every file turned into a LINK whose source is
its path inside the entry, symlinks kept verbatim. It also carries the entry's size (from
the digests, never a stat walk) and a small sample of the entry's files as they were when
it was built (inode, size, mode, mtime): a hit re-checks that sample with a few ``lstat``
calls, so a file that was deleted, replaced or rewritten in place is noticed cheaply
(a damaged file outside the sample is still caught by the replay when it is missing).
An EMLINK rotation at a hit replaces an entry file by a copy (same bytes, mode and mtime,
another inode): the hit refreshes the sample (:func:`refresh_samples`) and rewrites the
sidecar (:func:`rewrite`).

The entry's identity is a random ``id`` in its sidecar, made at construction: a hit
compares it with the one it indexed (:func:`read_ident`), so an entry evicted and
rebuilt by another process is told from the one this process knew. (The directory's
inode is no identity: ext4 gives the rebuilt directory the old one's inode again.)

Format: ``FMCE2\\n``, one JSON header line (id, counts, lengths, sha256 of the payload),
then the raw arrays back to back in native byte order. ``FMCE1`` sidecars (no id) are
refused: their entries are discarded and rebuilt.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import stat
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.digest import Digest

if TYPE_CHECKING:
    from fastmat.tree import Plan

MAGIC = b"FMCE2\n"
SAMPLE_FILES = 8  # files re-checked with lstat at every hit


class SidecarError(Exception):
    """A sidecar is missing, torn, or from another format/byte order."""


class Damaged(Exception):
    """An entry failed a hit-time check; ``stale`` if it is merely gone (evicted by
    another process) rather than damaged."""

    def __init__(self, why: str, *, stale: bool = False) -> None:
        super().__init__(why)
        self.stale = stale


def stat_at(dirfd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``dirfd/name``; None if absent."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def sidecar_name(key: str) -> str:
    """The sidecar of entry ``key`` beside it in ``entries/``."""
    return f"{key}.plan"


def touch(entries_fd: int, key: str) -> None:
    """Marks entry ``key``'s sidecar used now: a reopened cache orders its LRU by these."""
    with contextlib.suppress(OSError):
        os.utime(sidecar_name(key), dir_fd=entries_fd, follow_symlinks=False)


def _open_sidecar(entries_fd: int, key: str) -> int:
    try:
        return os.open(
            sidecar_name(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=entries_fd
        )
    except FileNotFoundError:
        raise SidecarError("missing") from None


def load(entries_fd: int, key: str) -> Replay:
    """The replay stored in entry ``key``'s sidecar; ``SidecarError`` if it is not intact."""
    with os.fdopen(_open_sidecar(entries_fd, key), "rb") as f:
        return decode(f.read())


def read_head(entries_fd: int, key: str) -> tuple[bytes, int]:
    """The start of entry ``key``'s sidecar, its header line included, and the sidecar's
    mtime; ``SidecarError`` if it is missing."""
    with os.fdopen(_open_sidecar(entries_fd, key), "rb") as f:
        head = f.read(1 << 16)
        if b"\n" not in head[len(MAGIC) :]:
            head += f.read()
        return head, os.fstat(f.fileno()).st_mtime_ns


def read_ident(entries_fd: int, key: str) -> str | None:
    """The id in entry ``key``'s sidecar (its header only); None if there is no intact one."""
    try:
        return read_totals(read_head(entries_fd, key)[0])[3]
    except (OSError, SidecarError):
        return None


@dataclass(frozen=True)
class Sample:
    """One entry file as it was built: a hit compares ``lstat`` against it."""

    path: str
    ino: int
    size: int
    mode: int
    mtime_ns: int


@dataclass
class Replay:
    """What a hit needs: the entry-relative replay plan, its totals, its sample and the
    entry's identity (``ident``, random per construction)."""

    root: Digest
    arrays: _binding.PlanArrays
    bytes: int
    files: int
    dirs: int
    symlinks: int
    samples: tuple[Sample, ...]
    ident: str


def _split(blob: bytes) -> list[bytes]:
    return blob.split(b"\0")[:-1]


def from_plan(plan: Plan, root: Digest, tree_dirfd: int) -> Replay:
    """The replay of a freshly built entry (open at ``tree_dirfd``) from its plan."""
    a = plan.arrays
    dir_names = _split(a.dir_names)
    dir_path: list[bytes] = [b""] * len(dir_names)
    for d in range(1, len(dir_names)):
        parent = dir_path[a.dir_parent[d]]
        dir_path[d] = parent + b"/" + dir_names[d] if parent else dir_names[d]
    names = _split(a.names)
    srcs = _split(a.srcs)
    ops = bytearray(a.op)
    modes = array.array("I", a.mode)
    out: list[bytes] = []
    files: list[int] = []
    for i, name in enumerate(names):
        if ops[i] == _binding.FM_OP_SYMLINK:
            out.append(srcs[i])
            continue
        base = dir_path[a.entry_dir[i]]
        out.append(base + b"/" + name if base else name)
        ops[i] = _binding.FM_OP_LINK
        modes[i] &= 0o7555  # EXDEV copies of entry files are read-only too
        files.append(i)
    arrays = _binding.PlanArrays(
        dir_parent=array.array("i", a.dir_parent),
        dir_names=a.dir_names,
        op=bytes(ops),
        entry_dir=array.array("i", a.entry_dir),
        mode=modes,
        mtime_ns=None,
        names=a.names,
        srcs=b"".join(s + b"\0" for s in out),
        dir_mode=a.dir_mode,
    )
    step = max(1, len(files) // SAMPLE_FILES)
    picked = sorted({*files[::step][:SAMPLE_FILES], *files[-1:]})
    samples = []
    for i in picked:
        path = os.fsdecode(out[i])
        st = os.lstat(path, dir_fd=tree_dirfd)
        samples.append(Sample(path, st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns))
    return Replay(
        root,
        arrays,
        int(plan.n_bytes),
        int(plan.n_files),
        len(dir_names),
        int(plan.n_symlinks),
        tuple(samples),
        secrets.token_hex(8),
    )


def refresh_samples(replay: Replay, entry_dirfd: int, rotated: set[str]) -> bool:
    """After an EMLINK rotation replaced the entry files ``rotated`` (entry-relative
    paths) by copies: takes the new inode of each sampled one that is still the same
    regular file otherwise (size, mode, mtime: what a rotation keeps). Returns whether
    a sample changed."""
    out = []
    for s in replay.samples:
        if s.path in rotated:
            with contextlib.suppress(OSError):
                st = os.lstat(s.path, dir_fd=entry_dirfd)
                if (st.st_size, st.st_mode, st.st_mtime_ns) == (s.size, s.mode, s.mtime_ns):
                    s = Sample(s.path, st.st_ino, s.size, s.mode, s.mtime_ns)  # noqa: PLW2901
        out.append(s)
    changed = tuple(out) != replay.samples
    replay.samples = tuple(out)
    return changed


def rewrite(
    entries_fd: int,
    key: str,
    entry_dirfd: int,
    *,
    ident: str,
    rotated: set[str],
    tmp_fd: int,
    fsync: bool,
) -> Replay | None:
    """Refreshes the samples of entry ``key``'s sidecar after the rotation of
    ``rotated`` (:func:`refresh_samples`), if it still is entry ``ident``: read, updated
    and renamed over (from a temp in ``tmp_fd``) under an flock of the entry directory,
    so two processes refreshing at once keep both changes. Returns the replay now on
    disk (None if there is no intact one for ``ident``). The caller pins the entry."""
    fcntl.flock(entry_dirfd, fcntl.LOCK_EX)
    try:
        try:
            r = load(entries_fd, key)
        except SidecarError:
            return None
        if r.ident != ident:
            return None
        if not refresh_samples(r, entry_dirfd, rotated):
            return r
        tmp = f"side.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444, dir_fd=tmp_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode(r))
                if fsync:
                    os.fsync(f.fileno())
            os.rename(tmp, sidecar_name(key), src_dir_fd=tmp_fd, dst_dir_fd=entries_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=tmp_fd)
            raise
        return r
    finally:
        fcntl.flock(entry_dirfd, fcntl.LOCK_UN)


def check_samples(replay: Replay, entry_dirfd: int) -> str | None:
    """None if every sampled file is as built, else why not (for the log)."""
    for s in replay.samples:
        try:
            st = os.lstat(s.path, dir_fd=entry_dirfd)
        except FileNotFoundError:
            return f"{s.path}: missing"
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222:
            return f"{s.path}: mode {st.st_mode:o}"
        if (st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns) != (
            s.ino,
            s.size,
            s.mode,
            s.mtime_ns,
        ):
            return f"{s.path}: changed"
    return None


def _fields(r: Replay) -> list[tuple[str, bytes]]:
    a = r.arrays
    return [
        ("dir_parent", a.dir_parent.tobytes()),
        ("dir_names", a.dir_names),
        ("op", a.op),
        ("entry_dir", a.entry_dir.tobytes()),
        ("mode", a.mode.tobytes()),
        ("names", a.names),
        ("srcs", a.srcs),
    ]


def encode(r: Replay) -> bytes:
    """The sidecar bytes of ``r``."""
    fields = _fields(r)
    payload = b"".join(b for _, b in fields)
    header = {
        "id": r.ident,
        "root": str(r.root),
        "bytes": r.bytes,
        "files": r.files,
        "dirs": r.dirs,
        "symlinks": r.symlinks,
        "dir_mode": r.arrays.dir_mode,
        "byteorder": sys.byteorder,
        "lens": [[k, len(b)] for k, b in fields],
        "sha256": hashlib.sha256(payload).hexdigest(),
        "samples": [[s.path, s.ino, s.size, s.mode, s.mtime_ns] for s in r.samples],
    }
    return MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def _header(data: bytes) -> tuple[dict[str, object], int]:
    if not data.startswith(MAGIC):
        raise SidecarError("bad magic")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise SidecarError("torn header")
    try:
        header = json.loads(data[len(MAGIC) : end])
    except ValueError as e:
        raise SidecarError(f"bad header: {e}") from None
    if not isinstance(header, dict) or header.get("byteorder") != sys.byteorder:
        raise SidecarError("foreign header")
    return header, end + 1


def read_totals(data: bytes) -> tuple[Digest, int, int, str]:
    """(root, bytes, files, id) from a sidecar's header alone (adoption at open)."""
    h, _ = _header(data)
    try:
        return Digest.parse(str(h["root"])), _int(h, "bytes"), _int(h, "files"), _ident(h)
    except (KeyError, ValueError) as e:
        raise SidecarError(f"bad header: {e}") from None


def _ident(h: dict[str, object]) -> str:
    v = h.get("id")
    if not isinstance(v, str) or not v:
        raise SidecarError("bad header field 'id'")
    return v


def _int(h: dict[str, object], key: str) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise SidecarError(f"bad header field {key!r}")
    return v


def decode(data: bytes) -> Replay:
    """The replay stored in ``data``; ``SidecarError`` if it is not intact."""
    h, off = _header(data)
    payload = data[off:]
    if hashlib.sha256(payload).hexdigest() != h.get("sha256"):
        raise SidecarError("payload checksum mismatch")
    try:
        parts: dict[str, bytes] = {}
        pos = 0
        lens = h["lens"]
        samples_raw = h["samples"]
        if not isinstance(lens, list) or not isinstance(samples_raw, list):
            raise SidecarError("bad header lists")
        for k, n in lens:
            parts[str(k)] = payload[pos : pos + int(n)]
            pos += int(n)
        arrays = _binding.PlanArrays(
            dir_parent=array.array("i", parts["dir_parent"]),
            dir_names=parts["dir_names"],
            op=parts["op"],
            entry_dir=array.array("i", parts["entry_dir"]),
            mode=array.array("I", parts["mode"]),
            mtime_ns=None,
            names=parts["names"],
            srcs=parts["srcs"],
            dir_mode=_int(h, "dir_mode"),
        )
        samples = tuple(
            Sample(str(p), int(i), int(z), int(m), int(t)) for p, i, z, m, t in samples_raw
        )
        return Replay(
            Digest.parse(str(h["root"])),
            arrays,
            _int(h, "bytes"),
            _int(h, "files"),
            _int(h, "dirs"),
            _int(h, "symlinks"),
            samples,
            _ident(h),
        )
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise SidecarError(f"bad sidecar: {e}") from None
