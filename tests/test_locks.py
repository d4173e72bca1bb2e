"""Lock files shared by threads and processes (fastmat.fs.locks) and the fetch locks
(fastmat.remote.flight): portability, permissions and bounded waits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# A fresh interpreter without os.O_PATH (as on macOS) imports every module and uses
# the fetch locks and a CAS.
_NO_O_PATH = """
import os, sys
del os.O_PATH
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.remote.flight import FetchLocks
with LocalCAS(sys.argv[1]) as cas:
    d = cas.put(b"portable")
    locks = FetchLocks(cas.root / "locks")
    token = locks.try_lock(d)
    assert token is not None
    locks.unlock(d, token)
    locks.close()
print("ok")
"""


def test_nothing_needs_o_path(tmp_path: Path) -> None:
    """macOS has no os.O_PATH: the fetch locks used it unguarded (issue 10, item 10)."""
    res = subprocess.run(
        [sys.executable, "-c", _NO_O_PATH, str(tmp_path / "cas")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr
