"""The protobuf wire format by hand, for tests of the Directory decoder.

:func:`field` and friends encode what upb's serializer never writes (a singular
field twice, unknown fields of every wire type, a known field with the wrong
wire type, overlong varints, groups); :func:`find_group` says where the first
group of a ``Directory`` message is, walking the message as a decoder does
(known submessages entered, everything else skipped), for a documented
difference between the C core and upb: the C core refuses every group, upb
skips an unknown one.
"""

from __future__ import annotations

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

# message -> {field number: the submessage a LEN field of that number holds}
SUBMESSAGES: dict[str, dict[int, str]] = {
    "Directory": {1: "FileNode", 2: "DirectoryNode", 3: "SymlinkNode", 5: "NodeProperties"},
    "FileNode": {2: "Digest", 6: "NodeProperties"},
    "DirectoryNode": {2: "Digest"},
    "SymlinkNode": {4: "NodeProperties"},
    "NodeProperties": {1: "NodeProperty", 2: "Timestamp", 3: "UInt32Value"},
    "NodeProperty": {},
    "Digest": {},
    "Timestamp": {},
    "UInt32Value": {},
}


def varint(n: int, pad: int = 0) -> bytes:
    """``n`` (two's complement below 0) as a varint, ``pad`` continuation bytes longer
    than needed (an overlong but valid encoding while it stays within 10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            break
        out.append(b | 0x80)
    if pad:
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


def tag(num: int, wt: int) -> bytes:
    return varint(num << 3 | wt)


def field(num: int, wt: int, payload: bytes = b"", pad: int = 0) -> bytes:
    """One field: LEN payloads get their length (``pad`` bytes longer than needed),
    others go as given (a varint's bytes, 8 or 4 fixed bytes, nothing for a group
    tag)."""
    if wt == LEN:
        return tag(num, wt) + varint(len(payload), pad) + payload
    return tag(num, wt) + payload


def string(num: int, s: str | bytes) -> bytes:
    return field(num, LEN, s.encode() if isinstance(s, str) else s)


def number(num: int, n: int) -> bytes:
    return field(num, VARINT, varint(n))


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); ValueError when malformed (as the C core's rules)."""
    v = 0
    for i in range(10):
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return v & ((1 << 64) - 1), pos
    raise ValueError("varint over 10 bytes")


def varint_bytes(data: bytes, pos: int) -> int:
    """How many bytes the varint at ``pos`` takes (ValueError when malformed)."""
    return read_varint(data, pos)[1] - pos


def find_group(data: bytes, message: str = "Directory") -> int | None:
    """The offset of the first group tag (wire type 3 or 4) a decoder reads in
    ``data``, or None. Meant for bytes upb accepted (up to the group at least)."""
    return _find(data, 0, len(data), message)


def _find(data: bytes, pos: int, end: int, message: str) -> int | None:
    subs = SUBMESSAGES[message]
    while pos < end:
        at = pos
        key, pos = read_varint(data, pos)
        num, wt = key >> 3, key & 7
        if wt in (SGROUP, EGROUP):
            return at
        if wt == VARINT:
            _, pos = read_varint(data, pos)
        elif wt == I64:
            pos += 8
        elif wt == I32:
            pos += 4
        elif wt == LEN:
            n, pos = read_varint(data, pos)
            if num in subs:
                found = _find(data, pos, pos + n, subs[num])
                if found is not None:
                    return found
            pos += n
        else:
            raise ValueError(f"wire type {wt}")
    return None
