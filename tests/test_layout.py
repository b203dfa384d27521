"""The package's layout keeps the data flow visible: formats -> (quant ->) checkpoint -> selection -> ops ->
write / analysis -> report, with a thin cli on top. Checked from the source, not by importing it."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "paramsurgeon")

# package -> the packages of paramsurgeon it must never import (at module level or inside functions):
# operations read and write no file (what they read comes from the command's loader), and the
# checkpoint model knows no format
FORBIDDEN = {
    "checkpoint": {"formats", "quant", "ops", "analysis", "report", "cli"},
    "quant": {"formats", "ops", "analysis", "report", "cli"},
    "formats": {"ops", "analysis", "report", "cli"},
    "ops": {"formats", "analysis", "report", "cli"},
    "analysis": {"ops", "report", "cli"},
    "report": {"ops", "cli"},
}


def modules() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(module: str, path: str, known: dict) -> set[str]:
    """The modules ``module`` imports (relative and absolute), at its top level or inside functions."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else node.module
            children = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(children)
            if len(children) < len(node.names) and target != module:
                found.add(target)
    return found


def test_no_import_cycle():
    """Not even through an import inside a function, which only hides a cycle from Python."""
    known = modules()
    graph = {m: {d for d in imports(m, p, known) if d in known} for m, p in known.items()}
    cycles = []

    def visit(node, stack):
        for dep in graph[node]:
            if dep in stack:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            else:
                visit(dep, stack + [dep])

    for module in graph:
        visit(module, [module])
    assert not cycles


def test_layers_import_only_downstream():
    known = modules()
    wrong = []
    for module, path in known.items():
        layer = module.split(".")[1] if module.count(".") else None
        for dep in imports(module, path, known):
            parts = dep.split(".")
            if parts[0] == "paramsurgeon" and len(parts) > 1 and parts[1] in FORBIDDEN.get(layer, ()):
                wrong.append(f"{module} imports {dep}")
    assert not wrong


def test_only_the_cli_imports_typer_and_only_cli_and_report_rich():
    known = modules()
    wrong = []
    for module, path in known.items():
        layer = module.split(".")[1] if module.count(".") else None
        deps = {d.split(".")[0] for d in imports(module, path, known)}
        if "typer" in deps and layer != "cli":
            wrong.append(f"{module} imports typer")
        if "rich" in deps and layer not in ("cli", "report"):
            wrong.append(f"{module} imports rich")
    assert not wrong
