"""Typed stub of the cffi-compiled C core (built from csrc/ by csrc/build_native.py).

Only ``fastmat._binding`` imports it; ``Any`` is allowed here and nowhere else.
"""

from typing import Any

ffi: Any
lib: Any
