"""The version of fastmat (read by the build, the command and the bench)."""

__version__ = "0.1.0"
