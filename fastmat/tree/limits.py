"""Bounds on a tree (invariant 10): what a hostile ``Directory`` tree may not exceed."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "TreeLimits"]


@dataclass(frozen=True)
class TreeLimits:
    """Bounds on a tree, applied after DAG expansion (counts include every instance).

    ``max_depth``: directory nesting below the root (the root is depth 0).
    ``max_entries_per_dir``: files + directories + symlinks of one directory.
    ``max_total_entries``: files + directories + symlinks of the whole tree.
    ``max_name_bytes`` / ``max_symlink_target_bytes``: UTF-8 bytes (NAME_MAX,
    PATH_MAX - 1 on Linux). ``max_path_bytes``: UTF-8 bytes of the longest
    dest-relative path of any entry (PATH_MAX - 1: the executor's ``openat2``
    fails beyond it); a reused ``Directory`` counts at its deepest place.
    ``max_directory_bytes``: one ``Directory`` message.
    """

    max_depth: int = 256
    max_entries_per_dir: int = 1_000_000
    max_total_entries: int = 10_000_000
    max_name_bytes: int = 255
    max_symlink_target_bytes: int = 4095
    max_path_bytes: int = 4095
    max_directory_bytes: int = 64 << 20


DEFAULT_LIMITS = TreeLimits()
