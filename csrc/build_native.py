"""cffi out-of-line API-mode build of ``fastmat._native`` from ``csrc/``.

setuptools runs this through ``setup.py``'s ``cffi_modules``; the header is
read relative to this file (so sdists and isolated builds work), the sources
are named relative to the project root (setuptools refuses absolute paths).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = sorted(p.name for p in HERE.glob("fm_*.c"))


def _rel(path: Path) -> str:
    """A path relative to the current directory when it lies below it (setuptools)."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows): keep it absolute
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef(
    (HERE / "fastmat.h").read_text(encoding="utf-8")
    # Platform constants the binding needs, valued by the C compiler.
    + "\n#define AT_FDCWD ...\n"
)
ffibuilder.set_source(
    "fastmat._native",
    '#include <fcntl.h>\n#include "fastmat.h"\n',
    sources=[_rel(HERE / name) for name in SOURCES],
    include_dirs=[_rel(HERE)],
    extra_compile_args=[
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fvisibility=hidden",
        "-pthread",
    ],
    extra_link_args=["-pthread"],
    define_macros=[("_GNU_SOURCE", "1")] if sys.platform.startswith("linux") else [],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT / "build"), verbose=True)
