"""fm_dir_decode (csrc/fm_decode.c) fuzzed under AddressSanitizer and UBSan.

``tests/c/decode_fuzz.c`` is built with the decoder alone and
``-fsanitize=address,undefined -fno-sanitize-recover=all``; it decodes every
message of a corpus (from the differential test's generator: valid trees
serialized by upb or re-encoded by hand, field soups, random bytes) whole, at
every prefix and after random mutations, with several limit sets. Any read past
an input, leak, overflow or undefined behaviour aborts it; so does a block whose
ranges do not match its header. The default run is a short one with a fixed
seed; the stress run is longer, with a fresh seed it prints (the corpus and the
mutations follow from it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from tests.test_native_decode import messages

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HARNESS = Path(__file__).resolve().parent / "c" / "decode_fuzz.c"

if not (CSRC / "fm_decode.c").is_file():
    pytest.skip("no csrc/ beside the tests (wheel test run)", allow_module_level=True)


def _build(out: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("FASTMAT_NO_SKIP") == "1":
            pytest.fail("gcc is missing (FASTMAT_NO_SKIP=1: CI installs it)")
        pytest.skip("gcc is missing")
    exe = out / "decode_fuzz"
    flags = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer"]
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    cmd = [gcc, *flags, *sanitizers, f"-I{CSRC}", str(HARNESS), str(CSRC / "fm_decode.c")]
    built = subprocess.run([*cmd, "-o", str(exe)], check=False, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return exe


def _corpus(out: Path, examples: int, seed: int) -> int:
    out.mkdir()
    names: set[str] = set()

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(message=messages())
    def save(message: tuple[str, bytes]) -> None:
        data = message[1]
        name = hashlib.sha256(data).hexdigest()[:20]
        if name not in names:
            names.add(name)
            (out / name).write_bytes(data)

    save()
    return len(names)


def _fuzz(tmp_path: Path, examples: int, iterations: int, seed: int) -> None:
    exe = _build(tmp_path)
    files = _corpus(tmp_path / "corpus", examples, seed)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1")
    run = subprocess.run(
        [str(exe), str(tmp_path / "corpus"), str(iterations), str(seed)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, f"seed {seed}:\n{run.stderr[-6000:]}"
    counts = dict(zip(run.stdout.split()[::2], map(int, run.stdout.split()[1::2]), strict=True))
    print(f"seed {seed}: {run.stdout.strip()}")
    assert counts["files"] == files
    assert counts["accepted"] > 0, counts
    assert counts["refused"] > 0, counts


def test_the_decoder_is_clean_under_sanitizers(tmp_path: Path) -> None:
    _fuzz(tmp_path, examples=150, iterations=40, seed=0)


@pytest.mark.stress
def test_the_decoder_is_clean_under_sanitizers_stress(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    _fuzz(tmp_path, examples=1500, iterations=2000, seed=seed)
