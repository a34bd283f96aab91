"""The package's import graph, read from the source (ast, nothing imported): no circle among the
imports that run when a module is loaded, and no module imports another module's private name.

An import "runs at load" when it is not inside a function (a lazy import); one under
`if TYPE_CHECKING:` (annotations only) never runs and is no edge.  A circle among those makes the import order matter
(a name is missing when the second module of the circle reads the first, half-loaded one).
A private name (`_x`) is the owning module's business; another module that needs it needs a
public name.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_elastic"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, at_load: bool):
    """Import nodes of a module: those that run at load (`at_load`), or all of them."""
    def walk(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if not at_load:
                    yield from walk(ast.iter_child_nodes(node))
            elif isinstance(node, ast.If) and _is_type_checking(node):  # never runs
                yield from walk(node.orelse)
            else:
                yield from walk(ast.iter_child_nodes(node))
    return walk(tree.body)


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(modules: dict[str, Path], at_load: bool):
    """{module: {imported package module}} and [(module, source, private name)]."""
    edges, private = {m: set() for m in modules}, []
    for module, path in modules.items():
        for node in _imports(ast.parse(path.read_text()), at_load):
            if isinstance(node, ast.Import):
                edges[module] |= {a.name for a in node.names if a.name in modules} - {module}
                continue
            source = _target(module, path, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if sub in modules else source
                if target in modules and target != module:
                    edges[module].add(target)
                if target in modules and target != module and alias.name.startswith("_") \
                        and not alias.name.startswith("__"):
                    private.append((module, source, alias.name))
    return edges, private


def _cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_scan_sees_the_package():
    modules = _modules()
    assert "nemo_elastic.config" in modules and "nemo_elastic.training.loop" in modules
    edges, _ = _edges(modules, at_load=True)
    # a known import that runs at load, and a known lazy one that does not
    assert "nemo_elastic.config_elastic" in edges["nemo_elastic.config"]
    assert "nemo_elastic.cost_model" not in edges["nemo_elastic.config"]
    assert "nemo_elastic.cost_model" in _edges(modules, at_load=False)[0]["nemo_elastic.config"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_the_imports_that_run_at_load():
    edges, _ = _edges(_modules(), at_load=True)
    assert _cycles(edges) == []


def test_no_import_circle_even_with_lazy_imports():
    """Not even through an import inside a function: the package's modules form layers (e.g.
    `config` validates a recipe with the cost model, which reads configs; neither reaches the
    other back)."""
    edges, _ = _edges(_modules(), at_load=False)
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_name():
    _, private = _edges(_modules(), at_load=False)
    assert private == [], "\n".join(f"{m} imports {n} from {s}" for m, s, n in private)
