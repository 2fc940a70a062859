"""The package's layers (DESIGN.md, "Layers of the code"): each module imports only its own layer
and those below it. Parsed from the source (every import, also the ones inside functions), so a
lazy import cannot hide an upward dependency.

Top to bottom: frontends, runtime, engine, models, experts, ops, planner, loaders, native. Shared
leaf modules (config, hardware, tokenizer, chat_template, toolcalls) sit below everything that
uses them and import no layer above the loaders.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybrid"

# (rank, names): a module of rank r may import modules of rank <= r.
LAYERS = [
    (0, {"native", "_native", "hardware"}),
    (1, {"loaders", "config"}),
    (2, {"planner"}),
    (3, {"ops"}),
    (4, {"experts"}),
    (5, {"models"}),
    (6, {"engine", "tokenizer", "tokenizer_gguf", "chat_template", "toolcalls"}),
    (7, {"runtime", "api"}),
    (8, {"cli", "commands", "chat", "serve", "convert", "__main__", "__init__", "demo_model"}),
]
RANK = {name: rank for rank, names in LAYERS for name in names}


def _layer_of(module: str) -> str:
    """'hybrid.models.deepseek_v3' -> 'models'; 'hybrid' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text(), str(path))
    pkg = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == "hybrid":  # `from hybrid import native`: the imported names are modules
                for a in node.names:
                    yield node.lineno, f"hybrid.{a.name}"
            else:
                yield node.lineno, name


def test_every_module_has_a_layer():
    missing = sorted({_layer_of("hybrid." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts))
                      for p in PACKAGE.rglob("*.py")} - set(RANK))
    assert not missing, f"modules with no layer in this test's table: {missing}"


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "hybrid." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        own = _layer_of(module)
        for line, target in _imports(path, module):
            if not target.startswith("hybrid.") and target != "hybrid":
                continue
            other = _layer_of(target)
            if target == "hybrid.__version__":  # a constant of the package's root, imports nothing
                continue
            if RANK[other] > RANK[own]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({other})")
    assert not bad, "imports of a layer above the importer's own:\n" + "\n".join(bad)
