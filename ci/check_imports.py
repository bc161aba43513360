"""`make lint`: what import-linter's contracts do not cover.

* No module imports inside a function or method (an import there hides a cycle or a
  layer violation from the reader and from import-linter's view of the graph).
* No import cycle between tuplet's modules (import-linter's layers contract only sees
  cycles that cross layers).

Exit status 1 with one line per finding.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loader" / "tuplet"


def function_imports() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    what = ast.unparse(node)
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}: import inside {fn.name}(): {what}")
    return sorted(set(out))


def cycles() -> list[str]:
    sys.path.insert(0, str(PACKAGE.parent))
    graph = grimp.build_graph("tuplet", include_external_packages=False)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: every component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    return [f"import cycle: {' <-> '.join(c)}" for c in found]


def main() -> int:
    problems = function_imports() + cycles()
    for p in problems:
        print(p)
    if problems:
        print(f"check_imports: {len(problems)} problem(s)")
        return 1
    print("check_imports: no function-level imports, no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
