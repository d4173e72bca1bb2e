"""``fastmat worker``: a Remote Workers API bot (the Bots service BuildGrid serves) that
stages each action's inputs with fastmat.

- :mod:`.bot`: ``Worker``, the session loop, lease slots, draining, signals;
- :mod:`.session`: the Bots calls and what BuildGrid 0.9.1 means by them;
- :mod:`.lease`: one lease from payload to result (``ExecutedActionMetadata`` stamped);
- :mod:`.staging`: input roots via the directory cache or ``materialize``;
- :mod:`.process`: running the command (user, process group, timeout, clean env);
- :mod:`.outputs`: outputs into the local CAS, ``ActionResult``, ``Tree``, uploads;
- :mod:`.paths`: the Command's paths, handled relative to directory fds;
- :mod:`.config`: ``WorkerConfig`` and start-up decisions; :mod:`.log`: the JSON-lines
  action log; :mod:`.proto`: the execution and Remote Workers API messages.
"""

import os
import sys

# The worker forks actions (as another user) while gRPC threads run. gRPC's fork
# handlers then crash the children now and then (gcc "segfaults" in Bazel builds);
# they are off when this is set before grpc is first imported. Worker() refuses to
# run if grpc was imported earlier with them on (see bot.fork_handlers_on).
GRPC_LOADED_BEFORE = "grpc" in sys.modules
GRPC_FORK_ENV = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")  # as grpc read it, if loaded
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from fastmat.worker.bot import Worker, WorkerError, run_until_signalled  # noqa: E402
from fastmat.worker.config import ConfigError, WorkerConfig, parse_platform  # noqa: E402
from fastmat.worker.staging import FastmatStager, Staged, Stager  # noqa: E402

__all__ = [
    "ConfigError",
    "FastmatStager",
    "Staged",
    "Stager",
    "Worker",
    "WorkerConfig",
    "WorkerError",
    "parse_platform",
    "run_until_signalled",
]
