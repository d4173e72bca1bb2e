"""The worker's wire messages: REAPI v2 execution messages and the Remote Workers API.

Built from descriptors into :mod:`fastmat.proto`'s pool (so they nest its ``Digest``,
``Directory``, ``Tree``, ``Status``, ``Timestamp``, ``Duration`` and ``Any``), with the
field numbers of the public ``build/bazel/remote/execution/v2/remote_execution.proto``,
``google/devtools/remoteworkers/v1test2/{bots,worker}.proto`` and
``google/rpc/error_details.proto`` (cross-checked against BuildGrid 0.9.1's generated
modules). Only the fields the worker reads or writes are declared. Nested message
names are flattened (``Platform.Property`` is ``PlatformProperty``); enums travel as
int32, with their values below.
"""

from __future__ import annotations

from typing import Any

from fastmat import proto
from fastmat.proto import BOOL, BYTES, INT32, MSG, REPEATED, STRING

_V2 = ".build.bazel.remote.execution.v2."
_RW = ".google.devtools.remoteworkers.v1test2."
_TS = ".google.protobuf.Timestamp"
_DURATION = ".google.protobuf.Duration"
_ANY = ".google.protobuf.Any"

_EXEC: dict[str, list[proto.Field]] = {
    "PlatformProperty": [("name", 1, STRING), ("value", 2, STRING)],
    "Platform": [("properties", 1, MSG, _V2 + "PlatformProperty", REPEATED)],
    "Action": [
        ("command_digest", 1, MSG, _V2 + "Digest"),
        ("input_root_digest", 2, MSG, _V2 + "Digest"),
        ("timeout", 6, MSG, _DURATION),
        ("do_not_cache", 7, BOOL),
        ("salt", 9, BYTES),
        ("platform", 10, MSG, _V2 + "Platform"),
    ],
    "EnvironmentVariable": [("name", 1, STRING), ("value", 2, STRING)],
    "Command": [
        ("arguments", 1, STRING, None, REPEATED),
        ("environment_variables", 2, MSG, _V2 + "EnvironmentVariable", REPEATED),
        ("output_files", 3, STRING, None, REPEATED),
        ("output_directories", 4, STRING, None, REPEATED),
        ("platform", 5, MSG, _V2 + "Platform"),
        ("working_directory", 6, STRING),
        ("output_paths", 7, STRING, None, REPEATED),
        ("output_node_properties", 8, STRING, None, REPEATED),
        ("output_directory_format", 9, INT32),
    ],
    "OutputFile": [
        ("path", 1, STRING),
        ("digest", 2, MSG, _V2 + "Digest"),
        ("is_executable", 4, BOOL),
        ("contents", 5, BYTES),
        ("node_properties", 7, MSG, _V2 + "NodeProperties"),
    ],
    "OutputSymlink": [
        ("path", 1, STRING),
        ("target", 2, STRING),
        ("node_properties", 4, MSG, _V2 + "NodeProperties"),
    ],
    "OutputDirectory": [
        ("path", 1, STRING),
        ("tree_digest", 3, MSG, _V2 + "Digest"),
        ("is_topologically_sorted", 4, BOOL),
        ("root_directory_digest", 5, MSG, _V2 + "Digest"),
    ],
    "ExecutedActionMetadata": [
        ("worker", 1, STRING),
        ("queued_timestamp", 2, MSG, _TS),
        ("worker_start_timestamp", 3, MSG, _TS),
        ("worker_completed_timestamp", 4, MSG, _TS),
        ("input_fetch_start_timestamp", 5, MSG, _TS),
        ("input_fetch_completed_timestamp", 6, MSG, _TS),
        ("execution_start_timestamp", 7, MSG, _TS),
        ("execution_completed_timestamp", 8, MSG, _TS),
        ("output_upload_start_timestamp", 9, MSG, _TS),
        ("output_upload_completed_timestamp", 10, MSG, _TS),
        ("auxiliary_metadata", 11, MSG, _ANY, REPEATED),
        ("virtual_execution_duration", 12, MSG, _DURATION),
    ],
    "ActionResult": [
        ("output_files", 2, MSG, _V2 + "OutputFile", REPEATED),
        ("output_directories", 3, MSG, _V2 + "OutputDirectory", REPEATED),
        ("exit_code", 4, INT32),
        ("stdout_raw", 5, BYTES),
        ("stdout_digest", 6, MSG, _V2 + "Digest"),
        ("stderr_raw", 7, BYTES),
        ("stderr_digest", 8, MSG, _V2 + "Digest"),
        ("execution_metadata", 9, MSG, _V2 + "ExecutedActionMetadata"),
        ("output_file_symlinks", 10, MSG, _V2 + "OutputSymlink", REPEATED),
        ("output_directory_symlinks", 11, MSG, _V2 + "OutputSymlink", REPEATED),
        ("output_symlinks", 12, MSG, _V2 + "OutputSymlink", REPEATED),
    ],
}

_ERROR_DETAILS: dict[str, list[proto.Field]] = {
    "PreconditionFailureViolation": [
        ("type", 1, STRING),
        ("subject", 2, STRING),
        ("description", 3, STRING),
    ],
    "PreconditionFailure": [
        ("violations", 1, MSG, ".google.rpc.PreconditionFailureViolation", REPEATED),
    ],
}

_BOTS: dict[str, list[proto.Field]] = {
    "DeviceProperty": [("key", 1, STRING), ("value", 2, STRING)],
    "Device": [("handle", 1, STRING), ("properties", 2, MSG, _RW + "DeviceProperty", REPEATED)],
    "WorkerProperty": [("key", 1, STRING), ("value", 2, STRING)],
    "WorkerConfig": [("key", 1, STRING), ("value", 2, STRING)],
    "Worker": [
        ("devices", 1, MSG, _RW + "Device", REPEATED),
        ("properties", 2, MSG, _RW + "WorkerProperty", REPEATED),
        ("configs", 3, MSG, _RW + "WorkerConfig", REPEATED),
    ],
    "Lease": [
        ("assignment", 1, STRING),
        ("state", 2, INT32),
        ("status", 3, MSG, ".google.rpc.Status"),
        ("requirements", 4, MSG, _RW + "Worker"),
        ("expire_time", 5, MSG, _TS),
        ("inline_assignment", 6, MSG, _ANY),
        ("id", 7, STRING),
        ("payload", 8, MSG, _ANY),
        ("result", 9, MSG, _ANY),
    ],
    "BotSession": [
        ("name", 1, STRING),
        ("bot_id", 2, STRING),
        ("status", 3, INT32),
        ("worker", 4, MSG, _RW + "Worker"),
        ("leases", 5, MSG, _RW + "Lease", REPEATED),
        ("expire_time", 6, MSG, _TS),
        ("version", 7, STRING),
    ],
    "CreateBotSessionRequest": [
        ("parent", 1, STRING),
        ("bot_session", 2, MSG, _RW + "BotSession"),
    ],
    "UpdateBotSessionRequest": [
        ("name", 1, STRING),
        ("bot_session", 2, MSG, _RW + "BotSession"),
    ],
}

_C = {
    **proto.define("fastmat/worker_exec.proto", "build.bazel.remote.execution.v2", _EXEC),
    **proto.define("fastmat/worker_rpc.proto", "google.rpc", _ERROR_DETAILS),
    **proto.define("fastmat/worker_bots.proto", "google.devtools.remoteworkers.v1test2", _BOTS),
}

Platform: Any = _C["Platform"]
Action: Any = _C["Action"]
Command: Any = _C["Command"]
OutputFile: Any = _C["OutputFile"]
OutputSymlink: Any = _C["OutputSymlink"]
OutputDirectory: Any = _C["OutputDirectory"]
ExecutedActionMetadata: Any = _C["ExecutedActionMetadata"]
ActionResult: Any = _C["ActionResult"]
PreconditionFailure: Any = _C["PreconditionFailure"]
Worker: Any = _C["Worker"]
Lease: Any = _C["Lease"]
BotSession: Any = _C["BotSession"]
CreateBotSessionRequest: Any = _C["CreateBotSessionRequest"]
UpdateBotSessionRequest: Any = _C["UpdateBotSessionRequest"]

# google.devtools.remoteworkers.v1test2.LeaseState
LEASE_PENDING, LEASE_ACTIVE, LEASE_COMPLETED, LEASE_CANCELLED = 1, 2, 4, 5
# google.devtools.remoteworkers.v1test2.BotStatus
BOT_OK, BOT_UNHEALTHY, BOT_HOST_REBOOTING, BOT_TERMINATING = 1, 2, 3, 4
# build.bazel.remote.execution.v2.Command.OutputDirectoryFormat
TREE_ONLY, DIRECTORY_ONLY, TREE_AND_DIRECTORY = 0, 1, 2

TYPE_URL_PREFIX = "type.googleapis.com/"


def type_url(cls: Any) -> str:
    """The ``Any.type_url`` of messages of class ``cls``."""
    return TYPE_URL_PREFIX + str(cls.DESCRIPTOR.full_name)


def pack(msg: Any) -> Any:
    """``msg`` in a ``google.protobuf.Any``."""
    return proto.AnyMessage(
        type_url=TYPE_URL_PREFIX + msg.DESCRIPTOR.full_name,
        value=msg.SerializeToString(deterministic=True),
    )


def full_name(any_msg: Any) -> str:
    """The full message name an ``Any`` holds (its type URL after the last ``/``)."""
    url: str = any_msg.type_url
    return url.rsplit("/", 1)[-1]
