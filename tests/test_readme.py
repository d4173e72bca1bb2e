"""The README's "Using it" example runs as written (issue 12): in a fresh directory
holding only ``some/source/dir``, with no REAPI server listening (every blob is local,
so the remote is never contacted), including its progress callback and cancellation."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def using_it() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it\n") :]
    m = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert m is not None, "no Python example under 'Using it'"
    return m.group(1)


def test_the_readme_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "some" / "source" / "dir"
    (src / "lib").mkdir(parents=True)
    for i in range(50):
        (src / "lib" / f"m{i}.py").write_text(f"X = {i}\n")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("run.sh")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(using_it(), "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
    printed = out.getvalue()
    assert printed.splitlines()[0].startswith("51 51 ")  # files, linked, duration
    assert "materialize: 52/52 entries" in printed  # the miss's construction, at its end
    assert "replay: 52/52 entries" in printed
    assert "cancelled: nothing was left at work/action-5" in printed
    assert sorted(os.listdir(tmp_path / "work")) == [
        "action-1", "action-2", "action-3", "action-6",
    ]  # fmt: skip
    assert (tmp_path / "work" / "action-6" / "lib" / "m7.py").read_text() == "X = 7\n"
