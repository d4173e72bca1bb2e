"""gRPC's fork handlers and the worker, which forks while gRPC threads run.

The worker forks to run each action as another user. With gRPC's fork handlers on
(grpcio's default), Bazel's compiles through the worker failed with "gcc:
Segmentation fault" now and then, reproducibly. The handlers are off when
``GRPC_ENABLE_FORK_SUPPORT`` is false as grpc is first imported: importing this module
(``fastmat.worker`` does, first) sets it unless it is set, and records whether grpc
had already been imported, for :func:`fork_handlers_on`.
"""

from __future__ import annotations

import os
import sys

__all__ = ["fork_handlers_on"]

_FALSE = frozenset({"0", "false", "no", "off"})

GRPC_LOADED_BEFORE = "grpc" in sys.modules
GRPC_FORK_ENV = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")  # as grpc read it, if loaded
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def fork_handlers_on(
    grpc_loaded_before: bool = GRPC_LOADED_BEFORE, env_value: str | None = GRPC_FORK_ENV
) -> bool:
    """Whether gRPC's fork handlers are active, given whether grpc was imported before
    this module and the value ``GRPC_ENABLE_FORK_SUPPORT`` had then: explicitly set, it
    decides; unset, grpcio's default (on) holds if grpc was already loaded."""
    if env_value is not None:
        return env_value.strip().lower() not in _FALSE
    return grpc_loaded_before
