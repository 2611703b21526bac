"""The layering of the packages, read from the source with `ast` (every import statement, those inside functions
included): `kernels/` imports nothing from `methods/`, and the modules of harness/, methods/ and kernels/ import one
another without circles."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods", "kernels")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path) -> set[str]:
    """Every absolute module name an import statement of the file names (`from a.b import c` names a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: {other for other in imported(path) if other in found and other != name}
            for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    assert "harness.suites" in edges["harness.sweep"]  # a function-level import
    assert "harness.families" in edges["harness.engine"]


def test_harness_methods_and_kernels_have_no_import_circles():
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_the_named_circles_are_gone():
    edges = graph()
    assert "harness.cli" not in edges["harness.sweep"]
    assert "harness.tasks" not in edges["harness.latency"] | edges["harness.zero_shot"]
    # both read the profiler through kernels.profiling; the GPU scripts sit apart from the library modules
    assert "harness.tools.profile_step" not in edges["kernels.bench.gpu"]
    assert "kernels.profiling" in edges["kernels.bench.gpu"] and "kernels.profiling" in edges["harness.tools.profile_step"]


def test_kernels_import_nothing_from_methods():
    offenders = {name: sorted(t for t in targets if t == "methods" or t.startswith("methods."))
                 for name, targets in graph().items() if name.split(".")[0] == "kernels"}
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert not offenders, f"kernels/ imports methods/: {offenders}"
