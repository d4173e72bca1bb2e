"""The package's shape, checked: no import cycle anywhere in ``fastmat/``, no module
reaching into another module's ``_private`` names, ``import fastmat`` without grpc, and
no reference to a design document outside the repository.

The layering itself is ``[tool.importlinter]`` in pyproject.toml (``lint-imports`` in
CI); these tests cover what its contracts do not, and run the linter too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastmat"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# These check the source tree; a run against an installed wheel has none beside it.
if not PACKAGE.is_dir():
    pytest.skip("no source tree beside the tests (wheel test run)", allow_module_level=True)
grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the dev extra)")
# _binding imports the compiled fastmat._native, which grimp resolves to the package.
FALSE_EDGES = {("fastmat._binding", "fastmat")}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node, or a self-loop
    (Tarjan, iterative), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(iter(children), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    out.append(sorted(comp))
    return sorted(out)


def import_graph() -> dict[str, set[str]]:
    g = grimp.build_graph("fastmat", cache_dir=None)
    return {
        m: {n for n in g.find_modules_directly_imported_by(m) if (m, n) not in FALSE_EDGES}
        for m in g.modules
    }


def test_cycle_finder_finds_cycles() -> None:
    # the checker itself: it must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    graph = import_graph()
    assert "fastmat.cas.store" in graph  # the graph is the real one
    assert cycles(graph) == []


def private_imports(path: Path) -> list[str]:
    """``from fastmat.x import _name`` statements in ``path`` (``_binding``, the one
    module meant to be imported under that name, excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        f"{path.name}: from {node.module} import {a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastmat")
        for a in node.names
        if a.name.startswith("_")
        and not a.name.startswith("__")
        and (node.module, a.name) != ("fastmat", "_binding")
    ]


def test_no_module_imports_another_modules_private_names() -> None:
    assert [x for p in sorted(PACKAGE.rglob("*.py")) for x in private_imports(p)] == []


def test_private_name_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from fastmat.cas.store import _RDONLY\nfrom fastmat import _binding\n")
    assert private_imports(bad) == ["bad.py: from fastmat.cas.store import _RDONLY"]


def test_import_fastmat_does_not_load_grpc() -> None:
    code = (
        "import sys, fastmat\n"
        "assert 'grpc' not in sys.modules, 'grpc loaded by import fastmat'\n"
        "fastmat.LocalCAS, fastmat.materialize, fastmat.DirectoryCache\n"
        "assert 'grpc' not in sys.modules\n"
        "assert fastmat.RemoteCAS.__name__ == 'RemoteCAS'\n"
        "assert 'grpc' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_the_cas_layout_is_spelled_in_one_place() -> None:
    spelled = re.compile(r"""f["'](?:blobs|exec)/\{""")
    hits = [
        str(p.relative_to(ROOT))
        for p in sorted(PACKAGE.rglob("*.py"))
        if spelled.search(p.read_text(encoding="utf-8"))
    ]
    assert hits == ["fastmat/cas/layout.py"]


def test_docs_reference_only_files_in_the_repository() -> None:
    texts = [ROOT / "README.md", *PACKAGE.rglob("*.py"), *(ROOT / "docs").glob("*.md")]
    outside = re.compile(r"\.\./shared|DESIGN\.md")
    hits = [str(p.relative_to(ROOT)) for p in texts if outside.search(p.read_text("utf-8"))]
    assert hits == []
    assert (ROOT / "docs" / "design.md").is_file()
    for link in re.findall(r"\]\(([^)#]+)\)", (ROOT / "README.md").read_text("utf-8")):
        if "://" not in link:
            assert (ROOT / link).exists(), f"README links to a missing file: {link}"


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")
def test_import_contracts_hold() -> None:
    res = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout
