"""The package's shape: layers import only downwards, no import cycles (imports inside functions
count), pages import only the app service, a short top level, no long files.

The layer order is the one leaml/__init__.py documents.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "leaml"
# lowest first; a module may import its own layer and those before it
LAYERS = ["config", "auth", "store", "data", "engine", "tiny", "serve", "methods", "jobs",
          "app", "cli"]
PAGE_IMPORTS = {"leaml.app.service"}
MAX_TOP_MODULES = 12
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(name: str) -> str | None:
    """The leaml module ``name`` names (a module or a package), or None."""
    rel = Path(*name.split("."))
    if (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file():
        return name
    return None


def imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported leaml module, line, inside a function, source line) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "leaml":
                        found.append((resolve(alias.name) or alias.name, child.lineno,
                                      in_function, lines[child.lineno - 1]))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module \
                    and child.module.split(".")[0] == "leaml":
                for alias in child.names:
                    target = resolve(f"{child.module}.{alias.name}") or child.module
                    found.append((target, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        edges[name] = {t for t, *_ in imports(path) if t != name and t != "leaml"}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_no_import_cycles_counting_imports_inside_functions():
    # a package's __init__ is its docstring only, so importing a package never imports its modules
    assert find_cycle(graph()) is None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_layer_imports_only_the_layers_below():
    wrong = []
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        own = layer_of(name)
        if own is None:
            continue
        for target, line, _, _ in imports(path):
            other = layer_of(target)
            if other is not None and other > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == []


def test_imports_inside_functions_say_why():
    """An import inside a function is kept only to delay a heavy dependency, and says so."""
    silent = [f"{path.relative_to(ROOT)}:{line}" for path in PKG.rglob("*.py")
              for _, line, inside, text in imports(path) if inside and "#" not in text]
    assert silent == []


def test_cli_modules_import_only_the_shared_helpers():
    """A command module of leaml/cli/ imports no other one but common.py; main.py registers them."""
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for path in (PKG / "cli").glob("*.py") if path.name not in ("main.py", "__init__.py")
             for target, line, _, _ in imports(path)
             if target.startswith("leaml.cli") and target != "leaml.cli.common"]
    assert wrong == []


def test_pages_import_only_the_app_service():
    wrong = []
    for path in [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]:
        for target, line, _, _ in imports(path):
            if target not in PAGE_IMPORTS:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == []


def test_package_inits_are_docstrings_that_say_what_they_hold():
    for init in PKG.rglob("__init__.py"):
        if init.parent == PKG:
            continue
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), init
        if init.parent.name != "store":  # the store's __init__ re-exports its connection API
            assert all(isinstance(n, ast.Expr) for n in tree.body), f"{init} holds code"


def test_short_top_level_and_no_long_files():
    top = [p.name for p in PKG.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, top
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
