"""The worker's configuration, and the few decisions made from it at start-up: which
user actions run as, the bot id, and how the local CAS is opened.

``open_cas`` is the one place ``--cas-max-bytes`` reaches ``LocalCAS``: the CAS then
evicts its least recently used unpinned blobs in the background (fastmat.cas.evict);
an action's staging pins the blobs it links, so eviction never breaks a running one.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastmat.errors import FastmatError

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = [
    "ConfigError",
    "WorkerConfig",
    "check_reachable",
    "open_cas",
    "parse_platform",
    "resolve_user",
]

DEFAULT_RUN_AS = "nobody"


class ConfigError(FastmatError, ValueError):
    """The worker cannot run with this configuration (the message says why)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``fastmat worker`` takes (see ``fastmat worker --help``).

    ``server``: the Bots (and by default CAS) server, ``grpc://host:port``;
    ``cas_server``: another server for the CAS, if any. ``jobs``: leases at once.
    ``run_as``: user name or uid for actions (None: ``nobody`` when started as root,
    else the worker's own user). ``platform``: (key, value) properties advertised and
    required of leases. ``poll_s``: the longest UpdateBotSession long poll;
    ``heartbeat_s``: how often a busy worker reports (and learns of cancellations);
    ``drain_timeout_s``: how long SIGTERM waits for running actions before returning
    them to the server; ``default_timeout_s``: an action's timeout when it sets none
    (0: none).
    """

    server: str
    cas: Path
    work: Path
    instance: str = ""
    cas_server: str | None = None
    cache: Path | None = None
    cache_max_bytes: int = 10 << 30
    overlay: bool | None = None
    jobs: int = 1
    run_as: str | None = None
    platform: tuple[tuple[str, str], ...] = ()
    cas_max_bytes: int | None = None
    json_log: Path | None = None
    bot_id: str | None = None
    fsync: bool = True
    threads: int = 0
    poll_s: float = 30.0
    heartbeat_s: float = 2.0
    drain_timeout_s: float = 60.0
    default_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, not {self.jobs}")
        if self.poll_s < 5 or self.heartbeat_s <= 0:
            raise ConfigError("the long poll must be >= 5 s and the heartbeat > 0")

    def resolved_bot_id(self) -> str:
        """``--bot-id``, else ``<hostname>-<8 hex digits of the work directory>``: stable
        across restarts, so a restarted worker replaces its dead predecessor's session
        (the server re-queues that session's leases at once)."""
        if self.bot_id:
            return self.bot_id
        tag = hashlib.sha256(str(self.work.absolute()).encode()).hexdigest()[:8]
        return f"{socket.gethostname()}-{tag}"


def parse_platform(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` items as (key, value) pairs, sorted; a key may repeat."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--platform wants KEY=VALUE, not {item!r}")
        out.append((key, value))
    return tuple(sorted(set(out)))


def resolve_user(run_as: str | None) -> tuple[int, int] | None:
    """(uid, gid) actions run as, or None to run them as the worker's own user.

    As root the default is ``nobody``: a hardlinked input is a CAS inode, and only an
    action that is neither root nor the CAS's owner cannot change it. ``--run-as root``
    is refused (use overlay workspaces instead); a non-root worker can only run actions
    as itself.
    """
    euid = os.geteuid()
    if run_as is None:
        if euid != 0:
            return None
        run_as = DEFAULT_RUN_AS
    try:
        ent = pwd.getpwuid(int(run_as)) if run_as.isdigit() else pwd.getpwnam(run_as)
    except (KeyError, ValueError):
        raise ConfigError(f"--run-as {run_as!r}: no such user") from None
    if ent.pw_uid == 0:
        raise ConfigError(
            "--run-as root: actions running as root can write through hardlinked inputs "
            "into the CAS; pick an unprivileged user"
        )
    if euid != 0:
        if ent.pw_uid != euid:
            raise ConfigError(f"--run-as {run_as!r} needs a worker started as root")
        return None
    return ent.pw_uid, ent.pw_gid


def check_reachable(path: Path, user: tuple[int, int] | None) -> None:
    """``ConfigError`` unless ``user`` may traverse every directory down to ``path``
    (its actions run in directories under it)."""
    if user is None:
        return
    uid, gid = user
    p = path.absolute()
    for d in [*reversed(p.parents), p]:
        st = d.stat()
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise ConfigError(
                f"--work {path}: actions run as uid {uid} cannot reach it: "
                f"{d} is mode {st.st_mode & 0o7777:o}; pick a directory every user may traverse"
            )


def open_cas(path: Path, *, max_bytes: int | None, fsync: bool) -> LocalCAS:
    """The worker's local CAS, with a byte budget when ``max_bytes`` is given."""
    from fastmat.cas import LocalCAS

    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"--cas-max-bytes must be positive, not {max_bytes}")
    return LocalCAS(path, fsync=fsync, max_bytes=max_bytes)
