"""REAPI ``Directory`` trees: validation and bounds (:mod:`.limits`, :mod:`.node`), the
process-wide cache of validated nodes (:mod:`.nodecache`), loading a tree into the flat
:class:`Plan` the executor runs (:mod:`.load`, :mod:`.plan`), and storing a local
directory as a tree (:mod:`.ingest`)."""

from fastmat.tree.ingest import ingest_tree
from fastmat.tree.limits import DEFAULT_LIMITS, TreeLimits
from fastmat.tree.load import Fetcher, load_plan
from fastmat.tree.plan import Plan

__all__ = ["DEFAULT_LIMITS", "Fetcher", "Plan", "TreeLimits", "ingest_tree", "load_plan"]
