"""The house rules that code can check, by reading the source (ast): no model, no torch.

- imports among `dcfx/` modules form no cycle;
- no module reads another's private attributes, or imports its private names;
- private torch APIs are used in `dcfx/_torch_private.py` only;
- no `.py` file in `dcfx/` or `kernels/` is over 450 lines, and `DeepCacheUNet`'s class body
  is under 200.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dcfx"
TORCH_PRIVATE = "dcfx._torch_private"
MAX_LINES = 450
MAX_UNET_CLASS_LINES = 200
# Core ATen IR operators (torch.compiler_ir's list) whose names start with an underscore: a
# public IR, not a private Python API.
CORE_ATEN = {"_to_copy"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if "kernels" not in path.relative_to(ROOT).parts:
            found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


def _is_package(name: str) -> bool:
    path, _ = modules()[name]
    return path.name == "__init__.py"


def _base(importer: str, level: int, module: str | None) -> str:
    """The module a `from <dots><module> import ...` names, as an absolute name."""
    if level == 0:
        return module or ""
    package = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(the imported module, the names imported from it, line) for every import in `name`,
    at any depth (function-level imports count too)."""
    _, tree = modules()[name]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_base(name, node.level, node.module), [a.name for a in node.names], node.lineno))
    return out


def dcfx_edges(name: str) -> set[str]:
    """The dcfx modules importing `name` runs: each imported module (a submodule where a name
    is one) and the packages above it that `name` is not inside already (their __init__ runs
    first); never the top package, which every module is inside."""
    known = modules()
    edges = set()
    for target, names, _ in imports(name):
        targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]
        for t in targets:
            while t and t != "dcfx":
                if t in known and not (name == t or name.startswith(t + ".")):
                    edges.add(t)
                t = t.rpartition(".")[0]
        if target == "dcfx" and not any(f"dcfx.{n}" in known for n in names):
            edges.add("dcfx")  # `from .. import optimize`: the top package itself
    return edges


def test_no_import_cycles():
    graph = {name: dcfx_edges(name) for name in modules()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles among dcfx modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def owned(tree: ast.Module) -> set[str]:
    """Private names a module defines: its functions, classes, parameters, assigned names and
    attributes, dict keys and `__dict__` keys it writes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Dict):
            names.update(s for s in map(_string, node.keys) if s)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            names.add(_string(node.slice) or "")
    return {n for n in names if _private(n)}


def _reads(tree: ast.Module) -> list[tuple[ast.AST, str, int]]:
    """(object, private attribute name, line): `x._name`, and `getattr(x, "_name")` and the like."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            out.append((node.value, node.attr, node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args and \
                node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1:
            attr = _string(node.args[1])
            if attr and _private(attr):
                out.append((node.args[0], attr, node.lineno))
    return out


def _own_object(value: ast.AST) -> bool:
    """`self`, `cls` or `super()`: the class's own attributes, wherever they were defined."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def test_no_private_attribute_is_read_across_modules():
    """`x._name` (or `getattr(x, "_name")`) outside `self`/`cls`, and `from m import _name`,
    are allowed only for names the reading module defines and no other dcfx module does, so
    the object can only be the module's own. `_torch_private.py` is exempt: reaching into
    torch is its job. Importing private modules within one package (`cli/_model.py`) and
    `_torch_private` itself is allowed."""
    mods = modules()
    owners: dict[str, set[str]] = {}
    for name, (_, tree) in mods.items():
        for attr in owned(tree):
            owners.setdefault(attr, set()).add(name)
    found = []
    for name, (path, tree) in mods.items():
        if name == TORCH_PRIVATE:
            continue
        where = path.relative_to(ROOT)
        for value, attr, line in _reads(tree):
            aten = isinstance(value, ast.Name) and value.id == "aten" or \
                isinstance(value, ast.Attribute) and value.attr == "aten"
            if _own_object(value) or owners.get(attr) == {name} or aten and attr in CORE_ATEN:
                continue
            found.append(f"{where}:{line} reads .{attr} ({ast.unparse(value)})")
        for target, names, line in imports(name):
            package = name if _is_package(name) else name.rpartition(".")[0]
            for imported in names:
                if not _private(imported) or f"{target}.{imported}" == TORCH_PRIVATE:
                    continue
                if target == package and f"{target}.{imported}" in mods:
                    continue  # a private module of the importer's own package
                found.append(f"{where}:{line} imports {imported} from {target}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_private_torch_apis_only_in_torch_private():
    found = []
    for name, (path, tree) in modules().items():
        if name == TORCH_PRIVATE:
            continue
        where = path.relative_to(ROOT)
        for target, names, line in imports(name):
            if target.split(".")[0] == "torch" and any(_private(p) for p in [*target.split("."), *names]):
                found.append(f"{where}:{line} imports from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id == "torch" and node.attr not in CORE_ATEN:
                    found.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
    assert not found, "private torch APIs outside dcfx/_torch_private.py:\n" + "\n".join(found)


def test_files_are_at_most_450_lines():
    long = []
    for folder in ("dcfx", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)


def test_deepcache_unet_class_body_is_short():
    _, tree = modules()["dcfx.runtime.unet"]
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeepCacheUNet"]
    lines = cls.end_lineno - cls.lineno + 1
    assert lines < MAX_UNET_CLASS_LINES, f"DeepCacheUNet's class body is {lines} lines"


def test_the_checks_see_what_they_look_for():
    # A cycle, a private read across modules, a private torch use: each would be found.
    tree = ast.parse("import torch\nx = torch._dynamo\ny = other._secret\nz = self._mine\nw = getattr(o, '_hidden')\n")
    reads = {attr for value, attr, _ in _reads(tree) if not _own_object(value)}
    assert reads == {"_dynamo", "_secret", "_hidden"}
    assert owned(ast.parse("class A:\n    def f(self):\n        self._x = 1\n_y = {'_z': 1}\n")) == {"_x", "_y", "_z"}
    assert "dcfx.runtime" in dcfx_edges("dcfx.api") and "dcfx.api" not in dcfx_edges("dcfx.runtime.unet")
