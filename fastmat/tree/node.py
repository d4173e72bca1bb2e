"""Validating one ``Directory`` message and packing it into a :class:`Node`.

A :class:`Node` is the packed form of one distinct ``Directory`` digest: its
entries (files, then symlinks) as ready-to-join byte strings and arrays, and
its subdirectories. :func:`decode_node` makes one from the message's bytes in
one call to the C core (``fm_dir_decode``: the wire format read, every rule
checked, the CAS paths spelled); this is the per-file hot path of loading a
tree, and the decisions it enforces are listed in :mod:`fastmat.tree.load`.

The rules are written out in Python in :mod:`fastmat.tree.node_py`
(``build_node`` over a upb-decoded message): the reference the C code is
tested against (``tests/test_native_decode.py``), never used to load a tree.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.cas import layout
from fastmat.digest import Digest

if TYPE_CHECKING:
    from fastmat.tree.limits import TreeLimits

__all__ = [
    "OP_COPY",
    "OP_EMPTY",
    "OP_LINK",
    "OP_SYMLINK",
    "BadNode",
    "Node",
    "UndecodableNode",
    "decode_node",
]

# FM_OP_* from csrc/fastmat.h (repeated here: the reference needs no C core).
OP_LINK, OP_SYMLINK, OP_EMPTY, OP_COPY = 1, 2, 3, 4
_LISTS = ("files", "directories", "symlinks")
_KINDS = ("file", "directory", "symlink")
# Wire-format refusals: what the C core found, for the InvalidTreeError message.
_WIRE = {
    _binding.DIR_E_TRUNCATED: "a field runs past the end of its message",
    _binding.DIR_E_VARINT: "a varint over 10 bytes, or a length over 5 bytes",
    _binding.DIR_E_TAG: "a malformed tag (field number 0, or over 5 bytes)",
    _binding.DIR_E_WIRETYPE: "wire type 6 or 7",
    _binding.DIR_E_GROUP: "a group (wire type 3 or 4; proto3 has none)",
    _binding.DIR_E_UTF8: "a string field that is not valid UTF-8",
    _binding.DIR_E_SIZE: "2 GiB or larger",
}


class BadNode(Exception):
    """A ``Directory`` failed validation; ``name`` is the offending entry ("" = itself)."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.name = name


class UndecodableNode(BadNode):
    """The bytes are not a ``Directory`` message (``message`` says why)."""


@dataclass(slots=True)
class Node:
    """One distinct ``Directory``, validated and packed."""

    n: int  # entries: files + symlinks
    ops: bytes
    names: bytes  # NUL-terminated each
    srcs: bytes  # NUL-terminated each: CAS relpath, symlink target, or b""
    modes: array[int]
    mtimes: array[int] | None
    children: list[tuple[bytes, str]]  # (name, "hash-size" key)
    n_files: int
    n_bytes: int
    exec_digests: list[Digest]
    blobs: list[bytes]  # the ``blobs/..`` relpaths its files read (exec: the plain blob)
    longest_name: int  # UTF-8 bytes of its longest entry name (directories too); 0: empty


@functools.lru_cache(maxsize=16)
def _decoder(limits: TreeLimits) -> _binding.DirectoryDecoder:
    return _binding.DirectoryDecoder(
        max_entries=limits.max_entries_per_dir,
        max_name_bytes=limits.max_name_bytes,
        max_target_bytes=limits.max_symlink_target_bytes,
        blob_prefix=layout.BLOBS_PREFIX,
        exec_prefix=layout.EXEC_PREFIX,
    )


def refusal(e: _binding.DirectoryRefused, limits: TreeLimits) -> BadNode:
    """The :class:`BadNode` for a refusal: the reference's message, word for word."""
    code = e.code
    if code <= _binding.DIR_E_WIRE_MAX:
        return UndecodableNode(f"{_WIRE.get(code, f'code {code}')} (byte {e.offset})")
    name, text, what = e.name.decode(), e.text.decode(), _KINDS[e.which]
    if code == _binding.DIR_E_UNSORTED:
        message = f"{_LISTS[e.which]} not sorted by name ({name!r} before {text!r})"
    elif code == _binding.DIR_E_TOO_MANY:
        message = f"more than max_entries_per_dir ({limits.max_entries_per_dir}) entries"
    elif code == _binding.DIR_E_RESERVED:
        message = f"name {name!r} is not a path component"
    elif code == _binding.DIR_E_SLASH:
        message = f"name {name!r} contains '/' or NUL"
    elif code == _binding.DIR_E_LONG:
        message = f"name longer than max_name_bytes ({limits.max_name_bytes})"
    elif code == _binding.DIR_E_DUPLICATE:
        message = f"duplicate name {name!r} (files, directories, symlinks)"
    elif code == _binding.DIR_E_HASH:
        message = f"{what} digest hash {text!r} is not 64 lowercase hex digits"
    elif code == _binding.DIR_E_DIGEST:
        message = f"{what} digest {text}/{e.nums[0]} is impossible"
    elif code == _binding.DIR_E_MODE:
        message = f"unix_mode {e.nums[0]:#o} has bits outside 0o7777"
    elif code == _binding.DIR_E_MTIME:
        sec, nanos = e.nums
        message = f"mtime {sec}s {nanos}ns out of range (0 to 2**63 - 1 ns)"
    elif code == _binding.DIR_E_TARGET:
        message = f"symlink target {text[:80]!r} is empty, has NUL or is too long"
    else:  # pragma: no cover - a code this module does not know: a stale build
        message = f"refused by the C core (code {code})"
    return BadNode(message, name)


def decode_node(data: bytes, limits: TreeLimits) -> Node:
    """Decodes, validates and packs one ``Directory`` message (its bytes).

    Raises :class:`UndecodableNode` when the bytes are no ``Directory`` message,
    :class:`BadNode` when one breaks a rule (names, order, duplicates, hashes,
    sizes, NodeProperties, symlink targets, ``limits``).
    """
    try:
        d = _decoder(limits).decode(data)
    except _binding.DirectoryRefused as e:
        raise refusal(e, limits) from None
    return Node(
        n=d.n_files + d.n_symlinks,
        ops=d.ops,
        names=d.names,
        srcs=d.srcs,
        modes=d.modes,
        mtimes=d.mtimes,
        children=list(zip(d.child_names, d.child_keys, strict=True)),
        n_files=d.n_files,
        n_bytes=d.n_bytes,
        exec_digests=[Digest(k[:64], int(k[65:])) for k in d.exec_keys],
        blobs=d.blobs,
        longest_name=d.longest_name,
    )
