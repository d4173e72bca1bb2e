"""Filesystem protocols shared by the CAS and the directory cache: lock files and
single-flight (:mod:`.locks`), flock-owned temp dirs swept when their owner is dead
(:mod:`.owned`), and deletion off the caller's thread (:mod:`.trash`)."""
