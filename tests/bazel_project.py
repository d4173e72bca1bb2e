"""Real Bazel builds for the worker's end-to-end tests and benchmark, offline.

Debian's ``bazel-bootstrap`` (4.2.3) builds without network when the repositories its
built-in WORKSPACE names are overridden: ``@rules_cc`` / ``@rules_java`` by small local
repositories forwarding to the native rules (Debian's ``bazel-rules-cc`` is too new
for 4.2.3), ``@remote_coverage_tools`` by a no-op (test rules depend on it), and
``@platforms`` by Debian's ``bazel-platforms`` (``--override_repository`` wants absolute
paths there: it does not expand ``%workspace%``).

Projects:

- ``brotli``: Brotli 1.2.1's C sources (from its PyPI sdist, downloaded once into
  ``~/.cache/fastmat-e2e``, sha256-checked) as three ``cc_library`` targets and the
  ``brotli`` tool, plus a genrule chain that runs the built tool: compress a generated
  input, decompress it, compare;
- ``shared_tree``: ``n`` genrules reading the same generated tree of ``files`` files
  (one input root, staged once and mounted by each action with the directory cache);
- ``checks``: a failing genrule, a test that times out, a genrule that tries to write
  its input, and sleeping genrules to interrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

BROTLI_VERSION = "1.2.1"
BROTLI_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
PLATFORMS = Path("/usr/share/bazel/tools/platforms")
CACHE = Path(os.environ.get("FASTMAT_E2E_CACHE", Path.home() / ".cache" / "fastmat-e2e"))


def bazel_problem() -> str | None:
    """None if Debian's offline Bazel can run here, else why not."""
    if shutil.which("bazel") is None:
        return "bazel is not installed (apt-get install bazel-bootstrap)"
    if not (PLATFORMS / "WORKSPACE").exists():
        return f"no @platforms at {PLATFORMS} (apt-get install bazel-platforms)"
    return None


def brotli_sdist() -> Path:
    """The Brotli sdist, downloaded with pip once (cached) and checked."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"brotli-{BROTLI_VERSION}.tar.gz"
    if not path.exists():
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--disable-pip-version-check", f"brotli=={BROTLI_VERSION}", "-d", str(CACHE)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"pip download brotli=={BROTLI_VERSION} failed: {res.stderr}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != BROTLI_SHA256:
        path.unlink()
        raise RuntimeError(f"{path}: sha256 {digest}, expected {BROTLI_SHA256}")
    return path


_RULES_CC = "\n".join(
    f"def {r}(**kw):\n    native.{r}(**kw)\n"
    for r in ("cc_binary", "cc_library", "cc_test", "cc_import", "cc_proto_library",
              "cc_toolchain", "cc_toolchain_suite", "objc_library", "objc_import")
)  # fmt: skip
_RULES_JAVA = "\n".join(
    f"def {r}(**kw):\n    native.{r}(**kw)\n"
    for r in ("java_binary", "java_import", "java_library", "java_lite_proto_library",
              "java_proto_library", "java_test", "java_package_configuration", "java_plugin",
              "java_runtime", "java_toolchain")
)  # fmt: skip


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _offline_repos(ws: Path) -> None:
    repos = ws.parent / f"{ws.name}-repos"
    for name, sub, defs in (("rules_cc", "cc", _RULES_CC), ("rules_java", "java", _RULES_JAVA)):
        _write(repos / name / "WORKSPACE", f'workspace(name = "{name}")\n')
        _write(repos / name / "BUILD", "")
        _write(repos / name / sub / "BUILD", "")
        _write(repos / name / sub / "defs.bzl", defs)
    cov = repos / "remote_coverage_tools"
    _write(cov / "WORKSPACE", 'workspace(name = "remote_coverage_tools")\n')
    _write(cov / "noop.sh", "#!/bin/sh\nexit 0\n", 0o755)
    _write(
        cov / "BUILD",
        'package(default_visibility = ["//visibility:public"])\n'
        'sh_binary(name = "coverage_report_generator", srcs = ["noop.sh"])\n'
        'sh_binary(name = "lcov_merger", srcs = ["noop.sh"])\n',
    )


def repo_flags(ws: Path) -> list[str]:
    repos = ws.parent / f"{ws.name}-repos"
    return [
        f"--override_repository=rules_cc={repos / 'rules_cc'}",
        f"--override_repository=rules_java={repos / 'rules_java'}",
        f"--override_repository=remote_coverage_tools={repos / 'remote_coverage_tools'}",
        f"--override_repository=platforms={PLATFORMS}",
    ]


_BROTLI_BUILD = """\
cc_library(
    name = "brotlicommon",
    srcs = glob(["c/common/*.c"]),
    hdrs = glob(["c/common/*.h", "c/include/brotli/*.h"]),
    includes = ["c/include"],
)
cc_library(
    name = "brotlidec",
    srcs = glob(["c/dec/*.c"]),
    hdrs = glob(["c/dec/*.h"]),
    deps = [":brotlicommon"],
)
cc_library(
    name = "brotlienc",
    srcs = glob(["c/enc/*.c"]),
    hdrs = glob(["c/enc/*.h"]),
    deps = [":brotlicommon"],
)
cc_binary(
    name = "brotli",
    srcs = ["c/tools/brotli.c"],
    deps = [":brotlidec", ":brotlienc"],
    linkopts = ["-lm"],
)
genrule(
    name = "corpus",
    srcs = glob(["c/enc/*.c", "c/enc/*.h"]),
    outs = ["corpus.txt"],
    cmd = "cat $(SRCS) > $@",
)
genrule(
    name = "compressed",
    srcs = [":corpus"],
    outs = ["corpus.txt.br"],
    tools = [":brotli"],
    cmd = "$(location :brotli) -c -q 9 $(SRCS) > $@",
)
genrule(
    name = "roundtrip",
    srcs = [":compressed"],
    outs = ["corpus.roundtrip.txt"],
    tools = [":brotli"],
    cmd = "$(location :brotli) -d -c $(SRCS) > $@",
)
genrule(
    name = "verified",
    srcs = [":corpus", ":roundtrip"],
    outs = ["verified.txt"],
    cmd = "cmp $(location :corpus) $(location :roundtrip) && echo identical > $@",
)
"""


def brotli_workspace(ws: Path) -> Path:
    """Writes the Brotli workspace at ``ws``; returns it."""
    ws.mkdir(parents=True, exist_ok=True)
    _write(ws / "WORKSPACE", 'workspace(name = "fastmat_e2e")\n')
    _write(ws / "BUILD", _BROTLI_BUILD)
    with tarfile.open(brotli_sdist()) as tar:
        top = f"brotli-{BROTLI_VERSION}/c/"
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(top) and m.isfile() and ".." not in m.name.split("/")
        ]
        for m in members:
            m.name = m.name[len(f"brotli-{BROTLI_VERSION}/") :]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(ws, members=members, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: the members were checked above
            tar.extractall(ws, members=members)  # noqa: S202
    _offline_repos(ws)
    return ws


def shared_tree_workspace(ws: Path, *, files: int = 1000, mib: int = 64, actions: int = 16) -> Path:
    """A tree of ``files`` files (``mib`` MiB in all) under ``tree/``, read whole by each
    of ``actions`` genrules (``//:read_<i>``, all in ``//:all``)."""
    ws.mkdir(parents=True, exist_ok=True)
    _write(ws / "WORKSPACE", 'workspace(name = "fastmat_shared")\n')
    size = mib * (1 << 20) // files
    for i in range(files):
        p = ws / "tree" / f"d{i % 20:02d}" / f"f{i:05d}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        seed = hashlib.sha256(f"shared-{i}".encode()).digest()
        p.write_bytes((seed * (size // len(seed) + 1))[:size])
    rules = [
        f'genrule(name = "read_{i}", srcs = glob(["tree/**"]), outs = ["sum_{i}.txt"], '
        f'cmd = "cat $(SRCS) | cksum > $@; echo {i} >> $@")'
        for i in range(actions)
    ]
    _write(ws / "BUILD", "\n".join(rules) + "\n")
    _offline_repos(ws)
    return ws


_CHECKS_BUILD = """\
genrule(
    name = "fails",
    outs = ["never.txt"],
    cmd = "echo 'something went wrong on purpose' >&2; exit 7",
)
sh_test(
    name = "too_slow_test",
    srcs = ["slow.sh"],
)
genrule(
    name = "vandal",
    srcs = ["precious.txt"],
    outs = ["vandal.txt"],
    cmd = "chmod u+w $< 2>/dev/null || true; (echo defaced >> $<) 2>/dev/null || true; "
    + "cat $< > $@",
)
"""


def checks_workspace(ws: Path, sleepers: int = 0, marks: Path | None = None) -> Path:
    """The failure cases (see the module docstring); ``sleepers`` genrules
    ``//sleep:s<i>`` write their shell's pid into ``marks`` and sleep two minutes."""
    ws.mkdir(parents=True, exist_ok=True)
    _write(ws / "WORKSPACE", 'workspace(name = "fastmat_checks")\n')
    _write(ws / "BUILD", _CHECKS_BUILD)
    _write(ws / "slow.sh", "#!/bin/sh\necho 'slow test started'\nsleep 60\n", 0o755)
    _write(ws / "precious.txt", "precious\n")
    if sleepers:
        assert marks is not None
        rules = [
            f'genrule(name = "s{i}", outs = ["s{i}.txt"], '
            f'cmd = "echo $$$$ > {marks}/pid.{i}; sleep 120; echo {i} > $@")'
            for i in range(sleepers)
        ]
        _write(ws / "sleep" / "BUILD", "\n".join(rules) + "\n")
    _offline_repos(ws)
    return ws


class Bazel:
    """Bazel in ``ws`` with its own ``--output_user_root``: one server for all the
    commands (it exits after ``max_idle_s`` idle, or at ``shutdown``)."""

    def __init__(self, ws: Path, output_root: Path, *, max_idle_s: int = 120) -> None:
        self.ws = ws
        self.output_root = output_root
        self.max_idle_s = max_idle_s
        output_root.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Bazel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        subprocess.run(
            ["bazel", f"--output_user_root={self.output_root}", "shutdown"],
            cwd=self.ws, capture_output=True, timeout=120, check=False,
        )  # fmt: skip

    def argv(self, command: str, *args: str, remote: str = "", instance: str = "") -> list[str]:
        flags = [*repo_flags(self.ws), "--color=no", "--curses=no", "--show_timestamps"]
        if remote:
            flags += [
                f"--remote_executor={remote}",
                f"--remote_instance_name={instance}",
                "--noremote_accept_cached",
                "--spawn_strategy=remote",
                "--remote_timeout=600",
                "--jobs=8",
            ]
        else:
            flags += ["--spawn_strategy=local", "--jobs=2"]
        return [
            "bazel", f"--output_user_root={self.output_root}",
            f"--max_idle_secs={self.max_idle_s}", command, *flags, *args,
        ]  # fmt: skip

    def run(
        self, command: str, *args: str, remote: str = "", instance: str = "", timeout: float = 1200
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, *args, remote=remote, instance=instance),
            cwd=self.ws, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    @contextlib.contextmanager
    def started(
        self, command: str, *args: str, remote: str = "", instance: str = "", log: Path
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A build in the background (output into ``log``); killed if still running."""
        with log.open("wb") as out:
            p = subprocess.Popen(
                self.argv(command, *args, remote=remote, instance=instance),
                cwd=self.ws, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            yield p
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def bin_dir(self) -> Path:
        return (self.ws / "bazel-bin").resolve()

    def outputs(self, exclude: Sequence[str] = ("runfiles_manifest", "MANIFEST")) -> dict[str, str]:
        """sha256 (plus ``+x`` for executables) of every file under bazel-bin, by path;
        runfiles manifests excluded (they name the output base's absolute path)."""
        out = {}
        root = self.bin_dir()
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                rel = str(p.relative_to(root))
                if p.is_symlink() or any(rel.endswith(x) for x in exclude):
                    continue
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = h + ("+x" if os.access(p, os.X_OK) else "")
        return out
