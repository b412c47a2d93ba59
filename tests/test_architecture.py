"""The library and the application stay apart: nothing in ``lrtt`` outside ``lrtt/cli/`` imports
``lrtt.cli`` (or the CLI's own requirements), and ``import lrtt`` loads none of it."""

import ast
import pathlib
import subprocess
import sys

import lrtt

ROOT = pathlib.Path(lrtt.__file__).parent
CLI_ONLY = {"yaml", "tqdm", "matplotlib"}  # lrtt[cli]: the library must run without them


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_library_never_imports_the_application():
    library = [p for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]
    assert len(library) > 20
    bad = {}
    for path in library:
        found = {n for n in _imports(path) if n == "lrtt.cli" or n.startswith("lrtt.cli.")
                 or n.split(".")[0] in CLI_ONLY}
        if found:
            bad[str(path.relative_to(ROOT))] = sorted(found)
    assert not bad, f"library modules import the application or its requirements: {bad}"


def test_import_lrtt_does_not_load_lrtt_models():
    """``lrtt.models`` sits above the core: the core never imports it, and ``import lrtt`` does not."""
    code = "import sys, lrtt; print(sorted(m for m in sys.modules if m.startswith('lrtt.models')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_import_lrtt_loads_no_application_module():
    code = ("import sys, lrtt; bad = sorted(m for m in sys.modules if m.startswith('lrtt.cli') "
            "or m.split('.')[0] in {'yaml', 'tqdm', 'matplotlib'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# The library's layers, lowest first: a unit imports only from units of lower layers (or itself).
# A unit is a top-level module (``_paths``) or a package (``methods``: all its modules).
LAYERS = (
    {"_private"},  # every use of another package's private names, below all that needs one
    {"_paths", "_jaxpr", "_extras", "_families", "_errors", "tt"},
    {"_discover"},
    {"_targets"},
    {"_quant", "_leaves"},
    {"_adapter"},
    {"_groups"},
    {"_resolve"},
    {"_merge", "methods"},
    {"_stack"},
    {"_factored", "_count", "optim", "_combine"},
    {"io", "train"},
    {"__init__"},
    {"models", "data"},
    {"cli"},
)


def _unit(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def _lrtt_units(path: pathlib.Path) -> set[str]:
    units = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "lrtt" and len(parts) > 1 and (ROOT / parts[1]).exists() or (
                parts[0] == "lrtt" and len(parts) > 1 and (ROOT / f"{parts[1]}.py").exists()):
            units.add(parts[1])
    return units


def test_every_module_belongs_to_a_layer():
    units = {_unit(p) for p in ROOT.rglob("*.py")}
    placed = set().union(*LAYERS)
    assert units <= placed, f"modules of no layer (add them to LAYERS): {sorted(units - placed)}"


def test_imports_go_down_the_layers_only():
    layer_of = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    bad = []
    for path in ROOT.rglob("*.py"):
        unit = _unit(path)
        for used in _lrtt_units(path) - {unit}:
            if layer_of[used] >= layer_of[unit] and unit != "cli":
                bad.append(f"{path.relative_to(ROOT)} ({unit}, layer {layer_of[unit]}) imports {used} (layer {layer_of[used]})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(sorted(bad))


def test_the_application_uses_the_public_api():
    """``lrtt.cli`` reads the library through its public names (``lrtt.X``, ``lrtt.train.X``, ...);
    ``lrtt._extras`` (the optional-dependency message) and ``lrtt._private`` (the one home of
    other packages' private names) are the shared private helpers."""
    bad = {}
    for path in (ROOT / "cli").rglob("*.py"):
        private = {n for n in _imports(path) if n.startswith("lrtt.") and not n.startswith("lrtt.cli")
                   and any(part.startswith("_") for part in n.split(".")[1:])  # a private module or name
                   and not n.startswith(("lrtt._extras", "lrtt._private"))}
        if private:
            bad[str(path.relative_to(ROOT))] = sorted(private)
    assert not bad, f"the CLI imports private library modules: {bad}"


NAMESPACES = ("lrtt", "lrtt.data", "lrtt.io", "lrtt.methods", "lrtt.models", "lrtt.optim", "lrtt.train", "lrtt.tt")


def test_public_namespaces_are_curated():
    import importlib
    import types

    for name in NAMESPACES:
        module = importlib.import_module(name)
        exported = module.__all__
        assert exported == sorted(exported, key=str), f"{name}.__all__ is not sorted"
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it does not define: {missing}"
        extra = [n for n in dir(module) if not n.startswith("_") and n not in exported
                 and not (isinstance(getattr(module, n), types.ModuleType) and f"{name}.{n}" in NAMESPACES + ("lrtt.cli",))]
        assert not extra, f"{name} shows names outside its __all__: {extra}"
