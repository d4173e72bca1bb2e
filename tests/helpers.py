"""Test helpers shared by every test module (``from tests.helpers import ...``).

- :func:`as_nobody` runs a function in a forked child that dropped root to
  uid/gid 65534, for every "permission denied" assertion (root bypasses DAC).
  The child can only reach paths that "other" may traverse: tmp_path's parents
  are 0700 root-owned, so chmod what the child needs (see :func:`open_to_all`).
- :func:`can_mount` probes whether this process can mount an overlay here.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

NOBODY = 65534

T = TypeVar("T")


class ChildError(RuntimeError):
    """The child of :func:`as_nobody` failed in a way that could not be pickled."""


def as_nobody(fn: Callable[..., T], *args: object) -> T:
    """Runs ``fn(*args)`` in a forked child as uid/gid 65534 and returns its result.

    An exception raised by fn is re-raised here (same type and message; OSError
    keeps errno and filename). The result must be picklable.
    """
    return in_child(fn, *args, as_uid=NOBODY)


def in_child(fn: Callable[..., T], *args: object, as_uid: int | None = None) -> T:
    """Runs ``fn(*args)`` in a forked child (optionally as uid/gid `as_uid`), like as_nobody.

    For tests that change process-wide state (umask, rlimits) or drop privileges.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(rfd)
            try:
                if as_uid is not None:
                    os.setgroups([])
                    os.setgid(as_uid)
                    os.setuid(as_uid)
                payload = pickle.dumps((True, fn(*args)))
            except BaseException as exc:  # everything goes back to the parent
                try:
                    payload = pickle.dumps((False, exc))
                except Exception:  # an unpicklable exception
                    payload = pickle.dumps((False, ChildError(f"{type(exc).__name__}: {exc}")))
            with os.fdopen(wfd, "wb") as w:
                w.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ChildError(f"child died without a result (wait status {status})")
    ok, value = pickle.loads(data)  # noqa: S301 - our own child's bytes
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def open_to_all(path: str | os.PathLike[str]) -> None:
    """Makes path and each of its parents traversable by "other" (o+x), for as_nobody."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        mode = d.stat().st_mode
        if not mode & 0o001:
            d.chmod((mode & 0o7777) | 0o001)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


@functools.cache
def mount_problem() -> str | None:
    """None if an overlay can be mounted here (as the tests do), else the reason."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to mount"
    if shutil.which("mount") is None:
        return "no mount(8) on PATH"
    base = Path(tempfile.mkdtemp(prefix="fastmat-mount-probe-"))
    try:
        for sub in ("lower", "upper", "work", "merged"):
            (base / sub).mkdir()
        (base / "lower" / "f").write_text("x")
        opts = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}"
        res = _run("mount", "-t", "overlay", "overlay", "-o", opts, str(base / "merged"))
        if res.returncode != 0:
            return f"cannot mount overlay here: {res.stderr.strip() or res.returncode}"
        _run("umount", str(base / "merged"))
        return None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def can_mount() -> bool:
    """Whether this process can mount (an overlay, in the temp directory's filesystem)."""
    return mount_problem() is None


def run_cmd(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Runs a system tool, capturing its output (never raises on failure)."""
    return _run(*cmd)
