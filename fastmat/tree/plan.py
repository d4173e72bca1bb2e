"""The flat materialization plan built from validated nodes.

:func:`expand` lays the nodes (:mod:`fastmat.tree.node`) out breadth first --
parents before children, each directory's entries contiguous -- into the
``PlanArrays`` the C executor runs. No per-file Python object is kept: paths
for error messages are rebuilt from the arrays (:meth:`Plan.path_of_entry`).
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Sequence
from dataclasses import replace

from fastmat._binding import PlanArrays
from fastmat.cas import layout
from fastmat.digest import Digest
from fastmat.tree.node import OP_COPY, OP_LINK, OP_SYMLINK, Node

__all__ = ["Plan", "expand"]


class Plan:
    """A validated tree, flat: what ``materialize`` and the directory cache execute."""

    __slots__ = (
        "arrays",
        "blobs",
        "exec_digests",
        "n_bytes",
        "n_dirs",
        "n_files",
        "n_symlinks",
        "root",
    )

    def __init__(
        self,
        root: Digest,
        arrays: PlanArrays,
        *,
        exec_digests: list[Digest],
        n_files: int,
        n_bytes: int,
        blobs: bytes,
    ) -> None:
        self.root = root
        self.arrays = arrays
        self.exec_digests = exec_digests  # distinct digests linked from exec/
        self.blobs = blobs  # distinct ``blobs/..`` relpaths read, NUL-separated (see blob_list)
        self.n_files = n_files
        self.n_bytes = n_bytes  # file bytes, every instance counted
        self.n_dirs = len(arrays.dir_parent)  # the root included
        self.n_symlinks = arrays.op.count(OP_SYMLINK)

    def path_of_dir(self, d: int) -> str:
        """The dest-relative path of directory ``d`` ("" for the root)."""
        names = self.arrays.dir_names.split(b"\0")
        parts = []
        while d > 0:
            parts.append(names[d].decode())
            d = self.arrays.dir_parent[d]
        return "/".join(reversed(parts))

    def path_of_entry(self, i: int) -> str:
        """The dest-relative path of entry ``i``."""
        base = self.path_of_dir(self.arrays.entry_dir[i])
        name = self.arrays.names.split(b"\0")[i].decode()
        return f"{base}/{name}" if base else name

    def paths_of_entries(self, entries: Sequence[int]) -> list[str]:
        """The dest-relative paths of ``entries``, in one pass over the arrays (linear:
        :meth:`path_of_entry` reads every name, fine for one error message only)."""
        a = self.arrays
        names = a.names.split(b"\0")
        dir_names = a.dir_names.split(b"\0")
        dirs: dict[int, str] = {0: ""}

        def dir_path(d: int) -> str:
            todo = []
            while d not in dirs:
                todo.append(d)
                d = a.dir_parent[d]
            for t in reversed(todo):
                parent = dirs[a.dir_parent[t]]
                name = dir_names[t].decode()
                dirs[t] = f"{parent}/{name}" if parent else name
            return dirs[todo[0]] if todo else dirs[d]

        out = []
        for i in entries:
            base = dir_path(a.entry_dir[i])
            name = names[i].decode()
            out.append(f"{base}/{name}" if base else name)
        return out

    def blob_list(self) -> list[bytes]:
        """The distinct ``blobs/..`` relpaths the plan reads (executables: the plain blob)."""
        return self.blobs.split(b"\0") if self.blobs else []

    def entry_of_blob(self, blob: bytes) -> int:
        """The first entry reading ``blobs/..`` relpath ``blob`` (itself or its exec variant)."""
        srcs = self.arrays.srcs.split(b"\0")
        variant = layout.variant_of(blob)
        return next(i for i, s in enumerate(srcs) if s in (blob, variant))

    def with_private_executables(self, variants: Collection[bytes]) -> Plan:
        """This plan with every LINK of an ``exec/..`` name in ``variants`` turned into a
        COPY of its plain blob (a private inode with the entry's 0555 mode): how a
        read-only CAS that lacks the variants still serves the tree (issue 12)."""
        a = self.arrays
        srcs = a.srcs.split(b"\0")[: a.n_entries]
        op = bytearray(a.op)
        for i, src in enumerate(srcs):
            if op[i] == OP_LINK and src in variants:
                op[i] = OP_COPY
                srcs[i] = layout.plain_of(src)
        arrays = replace(a, op=bytes(op), srcs=b"".join(x + b"\0" for x in srcs))
        return Plan(
            self.root,
            arrays,
            exec_digests=[
                d for d in self.exec_digests if layout.rel(layout.EXEC, d).encode() not in variants
            ],
            n_files=self.n_files,
            n_bytes=self.n_bytes,
            blobs=self.blobs,
        )

    def blob_srcs(self) -> dict[bytes, int]:
        """Distinct CAS blobs the plan reads (``blobs/..`` relpaths) -> first entry index.

        Executable entries map to their plain blob (the variant is made from it).
        """
        srcs = self.arrays.srcs.split(b"\0")
        out: dict[bytes, int] = {}
        for i, (op, src) in enumerate(zip(self.arrays.op, srcs, strict=False)):
            if op in (OP_LINK, OP_COPY) and src not in out:
                out[src] = i
        return {layout.plain_of(s): i for s, i in out.items()}


def expand(nodes: dict[str, Node], root: Digest) -> Plan:
    """Lays the (validated, bounded) nodes out breadth first into one ``PlanArrays``."""
    inst = [root.key]
    parents = array("i", [-1])
    dir_names = [b""]
    ops: list[bytes] = []
    names: list[bytes] = []
    srcs: list[bytes] = []
    modes = array("I")
    entry_dir = array("i")
    mtimes = array("q") if any(n.mtimes is not None for n in nodes.values()) else None
    n_files = n_bytes = 0
    d = 0
    while d < len(inst):
        node = nodes[inst[d]]
        if node.n:
            ops.append(node.ops)
            names.append(node.names)
            srcs.append(node.srcs)
            modes.extend(node.modes)
            entry_dir.extend(array("i", [d]) * node.n)
            if mtimes is not None:
                mtimes.extend(node.mtimes or array("q", [-1]) * node.n)
            n_files += node.n_files
            n_bytes += node.n_bytes
        for name, child in node.children:
            inst.append(child)
            parents.append(d)
            dir_names.append(name)
        d += 1
    exec_digests = sorted({x for n in nodes.values() for x in n.exec_digests}, key=str)
    blobs = b"\0".join(dict.fromkeys(b for n in nodes.values() for b in n.blobs))
    arrays = PlanArrays(
        dir_parent=parents,
        dir_names=b"\0".join(dir_names) + b"\0",
        op=b"".join(ops),
        entry_dir=entry_dir,
        mode=modes,
        mtime_ns=mtimes,
        names=b"".join(names),
        srcs=b"".join(srcs),
    )
    return Plan(
        root, arrays, exec_digests=exec_digests, n_files=n_files, n_bytes=n_bytes, blobs=blobs
    )
