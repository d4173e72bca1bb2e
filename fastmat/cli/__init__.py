"""The ``fastmat`` command (``fastmat.cli:main``): argument parsing and output
(:mod:`.main`), the verbs (:mod:`.verbs`), terminal progress bars (:mod:`.progress`)."""

from fastmat.cli.main import main, parse_size

__all__ = ["main", "parse_size"]
