"""Open after fork: a LocalCAS or DirectoryCache used in a forked child raises a clear
FastmatError instead of hanging on a lock another thread held at the fork or acting on
the parent's scratch (issue 10, item 10); ``close`` in the child leaves the parent's
instance working."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.errors import FastmatError
from tests.cache_helpers import BASIC, ingest, snapshot
from tests.helpers import in_child, lock_held_by_a_thread


def _outcomes(calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """What each call did in this (child) process: the error type and a message hint."""
    signal.alarm(10)  # a call that hangs kills the child: the parent sees ChildError
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "ran"
        except FastmatError as e:
            out[name] = "refused" if "open it after fork" in str(e) else f"other: {e}"
        except Exception as e:  # reported to the parent as data
            out[name] = f"{type(e).__name__}: {e}"
    signal.alarm(0)
    return out


def test_a_forked_child_cannot_use_the_parents_instances(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas") as cas, DirectoryCache(cas, tmp_path / "cache") as cache:
        root = ingest(cas, tmp_path / "src", BASIC)
        cache.materialize(root, tmp_path / "d0")
        blob = cas.put(b"in the parent")
        (tmp_path / "f").write_bytes(b"file")
        calls: dict[str, Callable[[], object]] = {
            "cas.put": lambda: cas.put(b"in the child"),
            "cas.read": lambda: cas.read(blob),
            "cas.path": lambda: cas.path(blob),
            "cas.contains": lambda: blob in cas,
            "cas.missing": lambda: cas.missing([blob]),
            "cas.put_file": lambda: cas.put_file(tmp_path / "f"),
            "cas.put_stream": lambda: cas.put_stream([b"x"], None),
            "cas.executable_path": lambda: cas.executable_path(blob),
            "cas.verify": cas.verify,
            "cas.counters": lambda: cas.counters,
            "cas.root_fd": lambda: cas.root_fd,
            "cache.materialize": lambda: cache.materialize(root, tmp_path / "child"),
            "cache.stats": cache.stats,
            "cache.entry_path": lambda: cache.entry_path(root),
            "cache.can_overlay": cache.can_overlay,
        }

        def child() -> tuple[dict[str, str], str]:
            seen = _outcomes(calls)
            cache.close()  # closes the child's copies only
            cas.close()
            return seen, "closed"

        seen, closed = in_child(child)
        assert seen == dict.fromkeys(calls, "refused")
        assert closed == "closed"
        assert not (tmp_path / "child").exists()
        # the parent's instances are untouched by the child's close
        assert cas.read(blob) == b"in the parent"
        assert cache.materialize(root, tmp_path / "d1").hit
        assert snapshot(tmp_path / "d1") == snapshot(tmp_path / "src")
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    assert os.listdir(tmp_path / "cas" / "tmp") == []


def test_fork_while_a_variant_lock_is_held_refuses_instead_of_hanging(tmp_path: Path) -> None:
    """A thread holds a blob's single-flight lock at the instant another thread forks:
    in the child that in-process lock is held forever, so the child must not use it."""
    with LocalCAS(tmp_path / "cas") as cas:
        d = cas.put(b"#!/bin/sh\necho hi\n")
        with lock_held_by_a_thread(cas._locks, f"{d.key}.exec"):
            seen = in_child(_outcomes, {"executable_path": lambda: cas.executable_path(d)})
        assert seen == {"executable_path": "refused"}
        assert cas.executable_path(d).read_bytes() == b"#!/bin/sh\necho hi\n"


def test_an_instance_opened_in_the_child_works_there(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas") as cas:
        d = cas.put(b"shared")

        def child() -> bytes:
            with LocalCAS(tmp_path / "cas") as mine:
                return mine.read(d) + mine.read(mine.put(b" too"))

        assert in_child(child) == b"shared too"
        assert cas.read(Digest.of(b" too")) == b" too"
