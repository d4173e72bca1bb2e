"""The remote side: a REAPI v2 client (:mod:`.client`, over :mod:`.channel`, with
:mod:`.upload`), and fetching into the local CAS (:mod:`.fetch`: ``RemoteFetcher``;
:mod:`.flight`: single-flight across threads and processes; :mod:`.pipeline`: linking
files while their blobs arrive). Importing this package imports grpc; ``import fastmat``
does not (``fastmat.RemoteCAS`` loads it on first use)."""

from fastmat.remote.client import RemoteCAS, split_get_tree_response
from fastmat.remote.fetch import RemoteFetcher
from fastmat.remote.stats import FetchStats, RemoteStats

__all__ = ["FetchStats", "RemoteCAS", "RemoteFetcher", "RemoteStats", "split_get_tree_response"]
