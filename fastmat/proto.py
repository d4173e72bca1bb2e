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
_STRING, _BYTES, _INT64, _INT32, _UINT32, _BOOL, _MSG = (
    _T.TYPE_STRING,
    _T.TYPE_BYTES,
    _T.TYPE_INT64,
    _T.TYPE_INT32,
    _T.TYPE_UINT32,
    _T.TYPE_BOOL,
    _T.TYPE_MESSAGE,
)
_REPEATED = "repeated"

# (field name, number, type[, message type name][, "repeated"])
_Field = tuple[Any, ...]

_WKT: dict[str, list[_Field]] = {
    "Timestamp": [("seconds", 1, _INT64), ("nanos", 2, _INT32)],
    "UInt32Value": [("value", 1, _UINT32)],
}
_RPC: dict[str, list[_Field]] = {
    "Status": [("code", 1, _INT32), ("message", 2, _STRING)],
}
_BYTESTREAM: dict[str, list[_Field]] = {
    "ReadRequest": [
        ("resource_name", 1, _STRING),
        ("read_offset", 2, _INT64),
        ("read_limit", 3, _INT64),
    ],
    "ReadResponse": [("data", 10, _BYTES)],
    "WriteRequest": [
        ("resource_name", 1, _STRING),
        ("write_offset", 2, _INT64),
        ("finish_write", 3, _BOOL),
        ("data", 10, _BYTES),
    ],
    "WriteResponse": [("committed_size", 1, _INT64)],
}
_TS = ".google.protobuf.Timestamp"
_U32 = ".google.protobuf.UInt32Value"
_STATUS = ".google.rpc.Status"
_V2 = ".build.bazel.remote.execution.v2."
_REAPI: dict[str, list[_Field]] = {
    "Digest": [("hash", 1, _STRING), ("size_bytes", 2, _INT64)],
    "NodeProperty": [("name", 1, _STRING), ("value", 2, _STRING)],
    "NodeProperties": [
        ("properties", 1, _MSG, _V2 + "NodeProperty", _REPEATED),
        ("mtime", 2, _MSG, _TS),
        ("unix_mode", 3, _MSG, _U32),
    ],
    "FileNode": [
        ("name", 1, _STRING),
        ("digest", 2, _MSG, _V2 + "Digest"),
        ("is_executable", 4, _BOOL),
        ("node_properties", 6, _MSG, _V2 + "NodeProperties"),
    ],
    "DirectoryNode": [("name", 1, _STRING), ("digest", 2, _MSG, _V2 + "Digest")],
    "SymlinkNode": [
        ("name", 1, _STRING),
        ("target", 2, _STRING),
        ("node_properties", 4, _MSG, _V2 + "NodeProperties"),
    ],
    "Directory": [
        ("files", 1, _MSG, _V2 + "FileNode", _REPEATED),
        ("directories", 2, _MSG, _V2 + "DirectoryNode", _REPEATED),
        ("symlinks", 3, _MSG, _V2 + "SymlinkNode", _REPEATED),
        ("node_properties", 5, _MSG, _V2 + "NodeProperties"),
    ],
    "Tree": [
        ("root", 1, _MSG, _V2 + "Directory"),
        ("children", 2, _MSG, _V2 + "Directory", _REPEATED),
    ],
    "FindMissingBlobsRequest": [
        ("instance_name", 1, _STRING),
        ("blob_digests", 2, _MSG, _V2 + "Digest", _REPEATED),
        ("digest_function", 3, _INT32),
    ],
    "FindMissingBlobsResponse": [("missing_blob_digests", 2, _MSG, _V2 + "Digest", _REPEATED)],
    "BatchUpdateBlobsRequestEntry": [
        ("digest", 1, _MSG, _V2 + "Digest"),
        ("data", 2, _BYTES),
        ("compressor", 3, _INT32),
    ],
    "BatchUpdateBlobsRequest": [
        ("instance_name", 1, _STRING),
        ("requests", 2, _MSG, _V2 + "BatchUpdateBlobsRequestEntry", _REPEATED),
        ("digest_function", 5, _INT32),
    ],
    "BatchUpdateBlobsResponseEntry": [
        ("digest", 1, _MSG, _V2 + "Digest"),
        ("status", 2, _MSG, _STATUS),
    ],
    "BatchUpdateBlobsResponse": [
        ("responses", 1, _MSG, _V2 + "BatchUpdateBlobsResponseEntry", _REPEATED),
    ],
    "BatchReadBlobsRequest": [
        ("instance_name", 1, _STRING),
        ("digests", 2, _MSG, _V2 + "Digest", _REPEATED),
        ("acceptable_compressors", 3, _INT32, None, _REPEATED),
        ("digest_function", 4, _INT32),
    ],
    "BatchReadBlobsResponseEntry": [
        ("digest", 1, _MSG, _V2 + "Digest"),
        ("data", 2, _BYTES),
        ("status", 3, _MSG, _STATUS),
        ("compressor", 4, _INT32),
    ],
    "BatchReadBlobsResponse": [
        ("responses", 1, _MSG, _V2 + "BatchReadBlobsResponseEntry", _REPEATED),
    ],
    "GetTreeRequest": [
        ("instance_name", 1, _STRING),
        ("root_digest", 2, _MSG, _V2 + "Digest"),
        ("page_size", 3, _INT32),
        ("page_token", 4, _STRING),
        ("digest_function", 5, _INT32),
    ],
    "GetTreeResponse": [
        ("directories", 1, _MSG, _V2 + "Directory", _REPEATED),
        ("next_page_token", 2, _STRING),
    ],
    "GetCapabilitiesRequest": [("instance_name", 1, _STRING)],
    "CacheCapabilities": [
        ("digest_functions", 1, _INT32, None, _REPEATED),
        ("max_batch_total_size_bytes", 4, _INT64),
    ],
    "ServerCapabilities": [("cache_capabilities", 1, _MSG, _V2 + "CacheCapabilities")],
}

_FILES: list[tuple[str, str, dict[str, list[_Field]]]] = [
    ("fastmat/wkt.proto", "google.protobuf", _WKT),
    ("fastmat/rpc.proto", "google.rpc", _RPC),
    ("fastmat/bytestream.proto", "google.bytestream", _BYTESTREAM),
    ("fastmat/reapi.proto", "build.bazel.remote.execution.v2", _REAPI),
]

_pool = descriptor_pool.DescriptorPool()


def _build() -> dict[str, Any]:
    classes: dict[str, Any] = {}
    deps: list[str] = []
    for fname, package, messages in _FILES:
        fdp = descriptor_pb2.FileDescriptorProto(name=fname, package=package, syntax="proto3")
        fdp.dependency.extend(deps)
        for mname, fields in messages.items():
            mdp = fdp.message_type.add(name=mname)
            for spec in fields:
                name, number, ftype = spec[0], spec[1], spec[2]
                type_name = spec[3] if len(spec) > 3 else None
                repeated = len(spec) > 4 and spec[4] == _REPEATED
                fd = mdp.field.add(name=name, number=number, type=ftype)
                fd.label = _T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL
                if type_name:
                    fd.type_name = type_name
        _pool.Add(fdp)
        deps.append(fname)
        for mname in messages:
            desc = _pool.FindMessageTypeByName(f"{package}.{mname}")
            classes[mname] = message_factory.GetMessageClass(desc)
    return classes


_C = _build()

Timestamp: Any = _C["Timestamp"]
UInt32Value: Any = _C["UInt32Value"]
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

__all__ = ["DecodeError"]  # DecodeError: raised for undecodable bytes
