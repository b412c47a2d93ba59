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


def test_import_lrtt_loads_no_application_module():
    code = ("import sys, lrtt; bad = sorted(m for m in sys.modules if m.startswith('lrtt.cli') "
            "or m.split('.')[0] in {'yaml', 'tqdm', 'matplotlib'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
