"""Trees and checks shared by the directory-cache tests (test_cache*, test_workspace)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.tree import ingest_tree

# rel path -> bytes (file), ("x", bytes) (executable), ("l", target) (symlink), None (empty dir)
Value: TypeAlias = bytes | tuple[str, bytes | str] | None
Spec = dict[str, Value]
SpecIn = Mapping[str, Value]
Snapshot = dict[str, tuple[object, ...]]

BASIC: Spec = {
    "a.txt": b"alpha\n",
    "empty": b"",
    "bin/tool": ("x", b"#!/bin/sh\necho tool\n"),
    "src/lib/deep/x.c": b"int x;\n",
    "src/lib/y.h": b"#define Y 1\n" * 100,
    "src/link-to-a": ("l", "../a.txt"),
    "dangling": ("l", "does/not/exist"),
    "dirlink": ("l", "src/lib"),
    "outputs": None,
}


def write_tree(base: Path, spec: SpecIn) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for rel, v in spec.items():
        p = base / rel
        if v is None:
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(v, bytes):
            p.write_bytes(v)
            p.chmod(0o644)
        elif v[0] == "x":
            assert isinstance(v[1], bytes)
            p.write_bytes(v[1])
            p.chmod(0o755)
        else:
            os.symlink(v[1], p)
    return base


def shape(n_files: int, seed: int, *, per_dir: int = 40, size: int = 64) -> Spec:
    """``n_files`` distinct files spread over nested directories (every 7th executable)."""
    spec: Spec = {}
    for i in range(n_files):
        d = f"d{i // per_dir % 5}/s{i // per_dir}"
        data = f"tree {seed} file {i}\n".encode().ljust(size, b".")
        spec[f"{d}/f{i}.txt"] = ("x", data) if i % 7 == 3 else data
    return spec


def ingest(cas: LocalCAS, base: Path, spec: SpecIn) -> Digest:
    return ingest_tree(cas, write_tree(base, spec))


def snapshot(root: Path) -> Snapshot:
    """rel path -> ("d",) | ("f", bytes, executable) | ("l", target), lstat-wise."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d",)
            else:
                out[rel] = ("f", p.read_bytes(), bool(st.st_mode & 0o111))
    return out


def modes_problems(root: Path) -> list[str]:
    """Every directory must be 0755 (writable), every regular file read-only."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            m = (Path(dirpath) / name).lstat().st_mode
            if stat.S_ISDIR(m) and stat.S_IMODE(m) != 0o755:
                bad.append(f"dir {name} {stat.S_IMODE(m):o}")
        for name in filenames:
            m = (Path(dirpath) / name).lstat().st_mode
            if stat.S_ISREG(m) and m & 0o222:
                bad.append(f"file {name} {stat.S_IMODE(m):o}")
    return bad


def mounted(path: Path) -> bool:
    """Whether anything is mounted at or below ``path`` (from /proc/self/mountinfo)."""
    p = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return any(m == p or m.startswith(p + "/") for m in points)


def leftovers(cache_dir: Path) -> list[str]:
    """Anything in tmp/ (besides live instance dirs' owner files), trash/ or mounts/."""
    out = [f"trash/{p.name}" for p in (cache_dir / "trash").iterdir()]
    if (cache_dir / "mounts").is_dir():
        out += [f"mounts/{p.name}" for p in (cache_dir / "mounts").iterdir()]
    for inst in (cache_dir / "tmp").iterdir():
        out += [f"tmp/{inst.name}/{p.name}" for p in inst.iterdir() if p.name != "owner.lock"]
    return out


def wide(cas: LocalCAS, n: int) -> Digest:
    """One directory of ``n`` small distinct files."""
    d = proto.Directory()
    for i in range(n):
        blob = cas.put(f"wide {i}\n".encode())
        f = d.files.add(name=f"f{i:06d}")
        f.digest.hash, f.digest.size_bytes = blob.hash, blob.size_bytes
    return cas.put(d.SerializeToString())
