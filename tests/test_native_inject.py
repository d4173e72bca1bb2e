"""fm_inject.c: the next `count` calls at a site fail with the injected errno."""

from __future__ import annotations

import errno
from pathlib import Path

from fastmat import _binding as nb
from tests.helpers import raises_errno


def test_injected_clears_on_exit(cas: Path, tmp_path: Path) -> None:
    with nb.injected("copy", -errno.ENOSPC), raises_errno(errno.ENOSPC):
        nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / "c1", 0o444)
    nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / "c1", 0o444)
    assert (tmp_path / "c1").read_bytes() == b"alpha\n"


def test_inject_count_is_exact(cas: Path, tmp_path: Path) -> None:
    nb.inject("copy", errno.ENOSPC, 2)  # a positive errno is negated
    try:
        for i in range(2):
            with raises_errno(errno.ENOSPC):
                nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / f"c{i}", 0o444)
        nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / "c2", 0o444)
    finally:
        nb.inject("copy", 0, 0)
