"""The C core's files form a DAG, and fm_internal.h names the file behind each helper.

A function of the core (``fm_*`` or ``fm__*``) belongs to the csrc/*.c file that
defines it; a file depends on every other file whose functions it names. With
comments and string literals stripped, a definition is a name at the start of a
line whose parameter list is followed by ``{``; any other mention is a use.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# These check the source tree; a run against an installed wheel has none beside it.
if not (CSRC / "fm_internal.h").is_file():
    pytest.skip("no csrc/ beside the tests (wheel test run)", allow_module_level=True)

Graph = dict[str, set[str]]

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"')
_DECL = re.compile(r"^[A-Za-z_][\w \t*]*?\b(fm_\w+)\s*\(", re.M)
_NAME = re.compile(r"\bfm_\w+\b")
_SECTION = re.compile(r"^/\* ---- (fm_\w+\.c)\b", re.M)


def _strip(code: str) -> str:
    return _STRING.sub('""', _COMMENT.sub(" ", code))


def _after_params(code: str, open_paren: int) -> str:
    """The first non-blank character after the parenthesis opened at open_paren."""
    depth = 0
    for i in range(open_paren, len(code)):
        if code[i] == "(":
            depth += 1
        elif code[i] == ")":
            depth -= 1
            if depth == 0:
                rest = code[i + 1 :].lstrip()
                return rest[:1]
    return ""


def definitions(sources: dict[str, str]) -> dict[str, str]:
    """Function name -> the file defining it (a name defined twice is an error)."""
    owner: dict[str, str] = {}
    for fname, raw in sources.items():
        code = _strip(raw)
        for m in _DECL.finditer(code):
            if _after_params(code, m.end() - 1) != "{":
                continue  # a prototype
            name = m.group(1)
            assert name not in owner, f"{name} defined in {owner[name]} and {fname}"
            owner[name] = fname
    return owner


def file_graph(sources: dict[str, str]) -> Graph:
    """File -> the other files whose functions it uses."""
    owner = definitions(sources)
    graph: Graph = {}
    for fname, code in sources.items():
        used = set(_NAME.findall(_strip(code)))
        graph[fname] = {owner[n] for n in used if n in owner and owner[n] != fname}
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def read_sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(CSRC.glob("*.c"))}


def test_c_files_form_a_dag() -> None:
    graph = file_graph(read_sources())
    assert set(graph) >= {"fm_sys.c", "fm_inject.c", "fm_thread.c", "fm_file.c", "fm_exec.c"}
    cycle = find_cycle(graph)
    assert cycle is None, "call cycle between C files: " + " -> ".join(cycle or [])


def test_bottom_layers_call_nothing_of_ours() -> None:
    graph = file_graph(read_sources())
    assert graph["fm_sys.c"] == set()  # the only reader of errno sits at the bottom
    assert graph["fm_inject.c"] == set()  # injectable from anywhere


def test_internal_header_sections_name_the_defining_file() -> None:
    header = (CSRC / "fm_internal.h").read_text(encoding="utf-8")
    parts = _SECTION.split(header)  # [preamble, file, body, file, body, ...]
    declared = {
        name: fname
        for fname, body in zip(parts[1::2], parts[2::2], strict=True)
        for name in _DECL.findall(_strip(body))
    }
    owner = definitions(read_sources())
    defined = {name: fname for name, fname in owner.items() if name.startswith("fm__")}
    assert declared == defined


@pytest.mark.parametrize(
    ("fname", "added"),
    [
        ("fm_file.c", "int bad(void)\n{\n    return fm_plan_check(0);\n}\n"),
        ("fm_inject.c", "void bad(char *b)\n{\n    fm__tmpname(b);\n}\n"),
        ("fm_sys.c", "int bad(void)\n{\n    return fm__isolated(0, 0, 0, 0);\n}\n"),
    ],
)
def test_a_call_back_up_is_caught(fname: str, added: str) -> None:
    sources = read_sources()
    assert find_cycle(file_graph(sources)) is None
    sources[fname] += added
    cycle = find_cycle(file_graph(sources))
    assert cycle is not None
    assert fname in cycle


def test_comments_and_strings_are_not_uses() -> None:
    sources = read_sources()
    sources["fm_sys.c"] += '/* see fm__isolated() */\nstatic const char *s = "fm__tmpname(";\n'
    assert file_graph(sources)["fm_sys.c"] == set()
