"""``fastmat bench``: fastmat against the floor and the obvious alternatives in one run.

:mod:`.run` drives it (config, warm-up, interleaved runs, medians, ratios);
:mod:`.shapes` generates the standing tree shapes; :mod:`.methods` holds what is
compared; :mod:`.report` renders the table and plot; :mod:`.seed` uploads the trees
to a REAPI server for the remote method.
"""

from fastmat.bench.run import BenchConfig, run_bench, selected_methods, selected_shapes

__all__ = ["BenchConfig", "run_bench", "selected_methods", "selected_shapes"]
