"""REAPI v2 wire messages (protobuf), built from descriptors at import.

Field numbers are those of the public ``remote_execution.proto``,
``google/bytestream/bytestream.proto``, ``google/rpc/status.proto`` and the
well-known types, so the bytes are wire-compatible with any REAPI server.
Only the fields fastmat reads or writes are declared; unknown fields from a
server are kept and ignored by protobuf. Message names of nested types are
flattened (``BatchReadBlobsResponse.Response`` is ``BatchReadBlobsResponseEntry``),
which the wire format never sees.

This is the one module where message classes are dynamically typed (``Any``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_T = descriptor_pb2.FieldDescriptorProto
# Field types for message specs (enums travel as int32: the same varint on the wire).
STRING, BYTES, INT64, INT32, UINT32, BOOL, MSG = (
    _T.TYPE_STRING,
    _T.TYPE_BYTES,
    _T.TYPE_INT64,
    _T.TYPE_INT32,
    _T.TYPE_UINT32,
    _T.TYPE_BOOL,
    _T.TYPE_MESSAGE,
)
REPEATED = "repeated"

# (field name, number, type[, message type name][, "repeated"])
Field = tuple[Any, ...]

_WKT: dict[str, list[Field]] = {
    "Timestamp": [("seconds", 1, INT64), ("nanos", 2, INT32)],
    "Duration": [("seconds", 1, INT64), ("nanos", 2, INT32)],
    "UInt32Value": [("value", 1, UINT32)],
    "Any": [("type_url", 1, STRING), ("value", 2, BYTES)],
}
_RPC: dict[str, list[Field]] = {
    "Status": [
        ("code", 1, INT32),
        ("message", 2, STRING),
        ("details", 3, MSG, ".google.protobuf.Any", REPEATED),
    ],
}
_BYTESTREAM: dict[str, list[Field]] = {
    "ReadRequest": [
        ("resource_name", 1, STRING),
        ("read_offset", 2, INT64),
        ("read_limit", 3, INT64),
    ],
    "ReadResponse": [("data", 10, BYTES)],
    "WriteRequest": [
        ("resource_name", 1, STRING),
        ("write_offset", 2, INT64),
        ("finish_write", 3, BOOL),
        ("data", 10, BYTES),
    ],
    "WriteResponse": [("committed_size", 1, INT64)],
}
_TS = ".google.protobuf.Timestamp"
_U32 = ".google.protobuf.UInt32Value"
_STATUS = ".google.rpc.Status"
_V2 = ".build.bazel.remote.execution.v2."
_REAPI: dict[str, list[Field]] = {
    "Digest": [("hash", 1, STRING), ("size_bytes", 2, INT64)],
    "NodeProperty": [("name", 1, STRING), ("value", 2, STRING)],
    "NodeProperties": [
        ("properties", 1, MSG, _V2 + "NodeProperty", REPEATED),
        ("mtime", 2, MSG, _TS),
        ("unix_mode", 3, MSG, _U32),
    ],
    "FileNode": [
        ("name", 1, STRING),
        ("digest", 2, MSG, _V2 + "Digest"),
        ("is_executable", 4, BOOL),
        ("node_properties", 6, MSG, _V2 + "NodeProperties"),
    ],
    "DirectoryNode": [("name", 1, STRING), ("digest", 2, MSG, _V2 + "Digest")],
    "SymlinkNode": [
        ("name", 1, STRING),
        ("target", 2, STRING),
        ("node_properties", 4, MSG, _V2 + "NodeProperties"),
    ],
    "Directory": [
        ("files", 1, MSG, _V2 + "FileNode", REPEATED),
        ("directories", 2, MSG, _V2 + "DirectoryNode", REPEATED),
        ("symlinks", 3, MSG, _V2 + "SymlinkNode", REPEATED),
        ("node_properties", 5, MSG, _V2 + "NodeProperties"),
    ],
    "Tree": [
        ("root", 1, MSG, _V2 + "Directory"),
        ("children", 2, MSG, _V2 + "Directory", REPEATED),
    ],
    "FindMissingBlobsRequest": [
        ("instance_name", 1, STRING),
        ("blob_digests", 2, MSG, _V2 + "Digest", REPEATED),
        ("digest_function", 3, INT32),
    ],
    "FindMissingBlobsResponse": [("missing_blob_digests", 2, MSG, _V2 + "Digest", REPEATED)],
    "BatchUpdateBlobsRequestEntry": [
        ("digest", 1, MSG, _V2 + "Digest"),
        ("data", 2, BYTES),
        ("compressor", 3, INT32),
    ],
    "BatchUpdateBlobsRequest": [
        ("instance_name", 1, STRING),
        ("requests", 2, MSG, _V2 + "BatchUpdateBlobsRequestEntry", REPEATED),
        ("digest_function", 5, INT32),
    ],
    "BatchUpdateBlobsResponseEntry": [
        ("digest", 1, MSG, _V2 + "Digest"),
        ("status", 2, MSG, _STATUS),
    ],
    "BatchUpdateBlobsResponse": [
        ("responses", 1, MSG, _V2 + "BatchUpdateBlobsResponseEntry", REPEATED),
    ],
    "BatchReadBlobsRequest": [
        ("instance_name", 1, STRING),
        ("digests", 2, MSG, _V2 + "Digest", REPEATED),
        ("acceptable_compressors", 3, INT32, None, REPEATED),
        ("digest_function", 4, INT32),
    ],
    "BatchReadBlobsResponseEntry": [
        ("digest", 1, MSG, _V2 + "Digest"),
        ("data", 2, BYTES),
        ("status", 3, MSG, _STATUS),
        ("compressor", 4, INT32),
    ],
    "BatchReadBlobsResponse": [
        ("responses", 1, MSG, _V2 + "BatchReadBlobsResponseEntry", REPEATED),
    ],
    "GetTreeRequest": [
        ("instance_name", 1, STRING),
        ("root_digest", 2, MSG, _V2 + "Digest"),
        ("page_size", 3, INT32),
        ("page_token", 4, STRING),
        ("digest_function", 5, INT32),
    ],
    "GetTreeResponse": [
        ("directories", 1, MSG, _V2 + "Directory", REPEATED),
        ("next_page_token", 2, STRING),
    ],
    "GetCapabilitiesRequest": [("instance_name", 1, STRING)],
    "CacheCapabilities": [
        ("digest_functions", 1, INT32, None, REPEATED),
        ("max_batch_total_size_bytes", 4, INT64),
    ],
    "ServerCapabilities": [("cache_capabilities", 1, MSG, _V2 + "CacheCapabilities")],
}

_FILES: list[tuple[str, str, dict[str, list[Field]]]] = [
    ("fastmat/wkt.proto", "google.protobuf", _WKT),
    ("fastmat/rpc.proto", "google.rpc", _RPC),
    ("fastmat/bytestream.proto", "google.bytestream", _BYTESTREAM),
    ("fastmat/reapi.proto", "build.bazel.remote.execution.v2", _REAPI),
]

_pool = descriptor_pool.DescriptorPool()
_deps: list[str] = []


def define(fname: str, package: str, messages: dict[str, list[Field]]) -> dict[str, Any]:
    """Adds the message specs ``messages`` (name -> fields) as file ``fname`` of
    ``package`` to this module's descriptor pool, depending on every file added before,
    and returns their classes by name. Other modules (the worker's messages) extend the
    pool this way, so their messages can nest this module's ones."""
    fdp = descriptor_pb2.FileDescriptorProto(name=fname, package=package, syntax="proto3")
    fdp.dependency.extend(_deps)
    for mname, fields in messages.items():
        mdp = fdp.message_type.add(name=mname)
        for spec in fields:
            name, number, ftype = spec[0], spec[1], spec[2]
            type_name = spec[3] if len(spec) > 3 else None
            repeated = len(spec) > 4 and spec[4] == REPEATED
            fd = mdp.field.add(name=name, number=number, type=ftype)
            fd.label = _T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL
            if type_name:
                fd.type_name = type_name
    _pool.Add(fdp)
    _deps.append(fname)
    return {
        mname: message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{package}.{mname}"))
        for mname in messages
    }


def _build() -> dict[str, Any]:
    classes: dict[str, Any] = {}
    for fname, package, messages in _FILES:
        classes.update(define(fname, package, messages))
    return classes


_C = _build()

Timestamp: Any = _C["Timestamp"]
Duration: Any = _C["Duration"]
UInt32Value: Any = _C["UInt32Value"]
AnyMessage: Any = _C["Any"]  # google.protobuf.Any (type_url + value, no Pack helpers)
Status: Any = _C["Status"]
ReadRequest: Any = _C["ReadRequest"]
ReadResponse: Any = _C["ReadResponse"]
WriteRequest: Any = _C["WriteRequest"]
WriteResponse: Any = _C["WriteResponse"]
Digest: Any = _C["Digest"]
NodeProperty: Any = _C["NodeProperty"]
NodeProperties: Any = _C["NodeProperties"]
FileNode: Any = _C["FileNode"]
DirectoryNode: Any = _C["DirectoryNode"]
SymlinkNode: Any = _C["SymlinkNode"]
Directory: Any = _C["Directory"]
Tree: Any = _C["Tree"]
FindMissingBlobsRequest: Any = _C["FindMissingBlobsRequest"]
FindMissingBlobsResponse: Any = _C["FindMissingBlobsResponse"]
BatchUpdateBlobsRequestEntry: Any = _C["BatchUpdateBlobsRequestEntry"]
BatchUpdateBlobsRequest: Any = _C["BatchUpdateBlobsRequest"]
BatchUpdateBlobsResponseEntry: Any = _C["BatchUpdateBlobsResponseEntry"]
BatchUpdateBlobsResponse: Any = _C["BatchUpdateBlobsResponse"]
BatchReadBlobsRequest: Any = _C["BatchReadBlobsRequest"]
BatchReadBlobsResponseEntry: Any = _C["BatchReadBlobsResponseEntry"]
BatchReadBlobsResponse: Any = _C["BatchReadBlobsResponse"]
GetTreeRequest: Any = _C["GetTreeRequest"]
GetTreeResponse: Any = _C["GetTreeResponse"]
GetCapabilitiesRequest: Any = _C["GetCapabilitiesRequest"]
CacheCapabilities: Any = _C["CacheCapabilities"]
ServerCapabilities: Any = _C["ServerCapabilities"]

__all__ = [  # DecodeError: raised for undecodable bytes
    "BOOL",
    "BYTES",
    "INT32",
    "INT64",
    "MSG",
    "REPEATED",
    "STRING",
    "UINT32",
    "DecodeError",
    "Field",
    "define",
]
