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
  action log; :mod:`.proto`: the execution and Remote Workers API messages;
  :mod:`.forking`: gRPC's fork handlers, off.
"""

# First: switches gRPC's fork handlers off before grpc is imported (see .forking).
from fastmat.worker import forking  # noqa: F401, I001

from fastmat.worker.bot import Worker, WorkerError, run_until_signalled
from fastmat.worker.config import ConfigError, WorkerConfig, parse_platform
from fastmat.worker.staging import FastmatStager, Staged, Stager

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
