"""``LocalCAS.verify()``: checks every blob and variant, quarantines the damaged.

Works on the layout alone (:mod:`fastmat.cas.layout`): a CAS root and its fd. The
quarantine is also what tells a directory cache which inodes verify found bad: a
cache entry hard-links CAS inodes, so a quarantined inode may still be linked there
(:func:`quarantine_stamp`, :func:`quarantined`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fastmat import _binding
from fastmat.cas import layout
from fastmat.control import ProgressFn, Reporter
from fastmat.digest import Digest, InvalidDigestError, hash_fd
from fastmat.errors import naming

log = logging.getLogger("fastmat")

_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_KINDS = {layout.BLOBS: "blob", layout.EXEC: "exec"}


class DamagedBlob(NamedTuple):
    digest: Digest
    reason: str
    kind: str  # "blob" or "exec"


@dataclass
class VerifyReport:
    """The result of ``LocalCAS.verify()``; every damaged file is already in quarantine,
    unless the verify only reported (``quarantining`` False: a read-only CAS)."""

    blobs_checked: int = 0
    exec_checked: int = 0
    bytes_checked: int = 0
    damaged: list[DamagedBlob] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # foreign names, quarantined too
    quarantined: list[Path] = field(default_factory=list)
    duration_s: float = 0.0
    quarantining: bool = True  # False: damage reported, left in place

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.unexpected


def verify_cas(
    root: Path, root_fd: int, *, progress: ProgressFn | None = None, quarantine: bool = True
) -> VerifyReport:
    """Checks every blob and variant (type, mode, size, hash); moves each damaged
    one to ``quarantine/`` (it then reads as missing; not with ``quarantine=False``,
    which writes nothing) and reports it. ``progress`` is
    told the bytes checked of the total the names announce ("verify", at a bounded
    rate; counting them costs one more listing of the shards, made only then); it may
    raise to stop the verify between two files."""
    report = VerifyReport(quarantining=quarantine)
    t0 = time.monotonic()
    reporter = None
    if progress is not None:
        reporter = Reporter(progress, "verify", _announced_bytes(root_fd), "bytes")
    q_fd = -1
    try:
        if quarantine:
            with naming("opening the quarantine", root / layout.QUARANTINE):
                q_fd = os.open(layout.QUARANTINE, _DIR, dir_fd=root_fd)
        for area in layout.AREAS:
            for hh in layout.SHARDS:
                with naming("verifying", root / area / hh):
                    dir_fd = os.open(f"{area}/{hh}", _DIR, dir_fd=root_fd)
                    try:
                        _verify_dir(root, dir_fd, hh, area, q_fd=q_fd, report=report)
                    finally:
                        os.close(dir_fd)
                if reporter is not None:
                    reporter.set(report.bytes_checked)
    finally:
        if q_fd >= 0:
            os.close(q_fd)
    if reporter is not None:
        reporter.finish()
    report.duration_s = time.monotonic() - t0
    log.info(
        "CAS %s verified: %d blobs, %d exec variants, %d bytes, %d damaged%s, %d unexpected",
        root,
        report.blobs_checked,
        report.exec_checked,
        report.bytes_checked,
        len(report.damaged),
        "".join(f" [{b.kind} {b.digest}: {b.reason}]" for b in report.damaged),
        len(report.unexpected),
    )
    return report


def _announced_bytes(root_fd: int) -> int:
    """The sizes the blob and variant names announce, summed (one listing per shard)."""
    total = 0
    for area in layout.AREAS:
        for hh in layout.SHARDS:
            fd = os.open(f"{area}/{hh}", _DIR, dir_fd=root_fd)
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        size = e.name.rpartition("-")[2]
                        total += int(size) if size.isdigit() else 0
            finally:
                os.close(fd)
    return total


def _verify_dir(
    root: Path, dir_fd: int, hh: str, area: str, *, q_fd: int, report: VerifyReport
) -> None:
    kind = _KINDS[area]
    mode = layout.MODES[area]
    with os.scandir(dir_fd) as it:
        names = [e.name for e in it]
    for name in names:
        try:
            h, _, size = name.rpartition("-")
            d = Digest(h, int(size)) if size.isdigit() and h[:2] == hh else None
        except InvalidDigestError:
            d = None
        reason, ino = _check_file(dir_fd, name, d, mode)
        if ino is None:
            continue  # vanished meanwhile
        if d is None:
            report.unexpected.append(f"{kind}/{hh}/{name}")
        else:
            if kind == "blob":
                report.blobs_checked += 1
            else:
                report.exec_checked += 1
            report.bytes_checked += d.size_bytes
            if reason is None:
                continue
            report.damaged.append(DamagedBlob(d, reason, kind))
        if q_fd < 0:
            continue  # report only: moving is a write
        qname = f"{kind}.{name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(name, qname, src_dir_fd=dir_fd, dst_dir_fd=q_fd)
        except FileNotFoundError:
            continue  # another verifier quarantined it first
        report.quarantined.append(root / layout.QUARANTINE / qname)
        moved = os.stat(qname, dir_fd=q_fd, follow_symlinks=False)
        # A good copy may have replaced the damaged one between check and rename.
        replaced = d is not None and (moved.st_dev, moved.st_ino) != ino
        if replaced and _check_file(q_fd, qname, d, mode)[0] is None:
            with contextlib.suppress(FileExistsError):
                _binding.publish(q_fd, qname, dir_fd, name, noreplace=True)
                report.quarantined.pop()


def _check_file(
    dir_fd: int, name: str, d: Digest | None, mode: int
) -> tuple[str | None, tuple[int, int] | None]:
    """(reason it is damaged or None, (dev, ino) checked or None if it vanished)."""
    try:
        fd = os.open(name, _RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return "a symlink, not a regular file", (st.st_dev, st.st_ino)
    try:
        st = os.fstat(fd)
        ino = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file", ino
        if d is None:
            return None, ino
        reasons = []
        if stat.S_IMODE(st.st_mode) != mode:
            reasons.append(f"mode {stat.S_IMODE(st.st_mode):#o}, expected {mode:#o}")
        if st.st_size != d.size_bytes:
            reasons.append(f"size {st.st_size}, expected {d.size_bytes} (truncated or grown)")
        elif hash_fd(fd) != d:
            reasons.append("content does not hash to its name (written or replaced)")
        return ("; ".join(reasons) or None), ino
    finally:
        os.close(fd)


class Quarantined(NamedTuple):
    """One file in ``quarantine/``: what it was, and its inode's link count (more than
    one: something outside the quarantine still links it, a cache entry maybe)."""

    name: str
    digest: Digest | None
    ino: tuple[int, int]  # (st_dev, st_ino)
    nlink: int


def quarantine_stamp(root_fd: int) -> tuple[int, int, int, int]:
    """A cheap fingerprint of ``quarantine/`` (one stat): changes when verify moves a
    file in (mtime and ctime, at the filesystem's timestamp granularity)."""
    st = os.stat(layout.QUARANTINE, dir_fd=root_fd, follow_symlinks=False)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


def quarantined(root_fd: int) -> list[Quarantined]:
    """Every file verify moved to ``quarantine/``, with its inode."""
    q_fd = os.open(layout.QUARANTINE, _DIR, dir_fd=root_fd)
    try:
        with os.scandir(q_fd) as it:
            names = [e.name for e in it]
        out = []
        for name in names:
            try:
                st = os.stat(name, dir_fd=q_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append(
                Quarantined(name, _quarantined_digest(name), (st.st_dev, st.st_ino), st.st_nlink)
            )
        return out
    finally:
        os.close(q_fd)


def _quarantined_digest(name: str) -> Digest | None:
    """The digest in a quarantine name ``<kind>.<hash>-<size>.<pid>.<rand>``."""
    parts = name.split(".")
    if len(parts) != 4:
        return None
    h, _, size = parts[1].rpartition("-")
    try:
        return Digest(h, int(size)) if size.isdigit() else None
    except InvalidDigestError:
        return None
