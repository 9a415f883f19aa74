"""The package's imports, read with ``ast`` (late imports inside functions included): no import
cycle between layerpress modules, and no module imports from a higher layer than its own
(docs/architecture.md: helpers -> spec -> ops -> nn -> flows -> interop/integrations -> cli).

The checks run on the source tree, so they need no build; the last tests run them on small
synthetic packages to show that each check can fail."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "layerpress"

# Layer of each module (the longest matching prefix decides); a module may import its own layer
# or a lower one. Alias modules sit in the layer of the module they alias.
LAYERS = {
    "layerpress._errors": 0, "layerpress._C": 0,
    "layerpress.spec": 1,
    "layerpress.reference": 2,
    "layerpress.ops": 3, "layerpress.norm_ops": 3, "layerpress.wtacrs_ops": 3,
    "layerpress.nn": 4, "layerpress.norms": 4, "layerpress.wtacrs": 4,
    "layerpress.flows": 5,
    "layerpress.interop": 6, "layerpress.integrations": 6,
    "layerpress": 7,  # the package root: the public face, above everything it re-exports
    "layerpress.cli": 7,
    "layerpress.__main__": 8,
}


def module_names(root: Path, package: str) -> Dict[str, Path]:
    """{dotted module name: file} for every .py file below ``root`` (``pkg/__init__.py`` -> pkg)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules that module ``name`` imports anywhere in its body: ``import a.b``,
    ``from .x import y`` (``y`` counts when it is a module itself), at top level or late."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{mod}.{a.name}" for a in node.names]
            # `from pkg import sub` needs only the submodule (pkg, a parent, is imported anyway,
            # as for every module); a name that is not a module is read from pkg itself
            targets = [s for s in subs if s in known]
            if len(targets) < len(subs):
                targets.append(mod)
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a function or class: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path, package: str) -> Dict[str, Set[str]]:
    names = module_names(root, package)
    return {n: imports_of(n, p, set(names)) for n, p in names.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def layer_of(name: str, layers: Dict[str, int]) -> int:
    prefixes = [p for p in layers if name == p or name.startswith(p + ".")]
    if not prefixes:
        raise KeyError(f"{name}: no layer assigned (add it to LAYERS and docs/architecture.md)")
    return layers[max(prefixes, key=len)]


def upward_imports(graph: Dict[str, Set[str]], layers: Dict[str, int]) -> List[str]:
    return [f"{a} (layer {layer_of(a, layers)}) imports {b} (layer {layer_of(b, layers)})"
            for a in sorted(graph) for b in sorted(graph[a])
            if layer_of(b, layers) > layer_of(a, layers)]


def test_the_graph_was_read():
    graph = import_graph(PACKAGE, "layerpress")
    assert "layerpress.nn.wtacrs" in graph and "layerpress.cli.quantize" in graph
    assert "layerpress.nn.quant_linear" in graph["layerpress.nn.wtacrs"]
    assert "layerpress.ops.quant" in graph["layerpress.ops.norm"]
    assert "layerpress.flows.io" in graph["layerpress.cli.common"]  # a late import counts


def test_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE, "layerpress"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    graph = import_graph(PACKAGE, "layerpress")
    for name in graph:
        layer_of(name, LAYERS)
    assert upward_imports(graph, LAYERS) == []


def _write_package(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_a_late_import_cycle_is_found(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "nn/__init__.py": "from .linear import Linear\nfrom .lora import LoRA\n",
        "nn/linear.py": "class Linear:\n    def lora(self):\n        from .lora import LoRA\n"
                        "        return LoRA(self)\n",
        "nn/lora.py": "from .linear import Linear\n\nclass LoRA:\n    pass\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.nn.linear"] == {"pkg.nn.lora"}
    assert find_cycle(graph) in (["pkg.nn.linear", "pkg.nn.lora", "pkg.nn.linear"],
                                 ["pkg.nn.lora", "pkg.nn.linear", "pkg.nn.lora"])
    (pkg / "nn" / "linear.py").write_text("class Linear:\n    pass\n", encoding="utf-8")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def test_an_upward_import_is_found(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "ops.py": "def f():\n    from .flows import run\n",
        "flows.py": "from . import ops\n\ndef run():\n    pass\n",
    })
    layers = {"pkg": 9, "pkg.ops": 1, "pkg.flows": 2}
    assert upward_imports(import_graph(pkg, "pkg"), layers) == [
        "pkg.ops (layer 1) imports pkg.flows (layer 2)"]
