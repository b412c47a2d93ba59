"""Every ``lrtt.X.Y`` a docstring, comment or doc page names exists (a renamed or moved name
leaves no dangling reference), and no source names a design file that is not in the repository."""

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"(?<![\w./-])(lrtt(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
RETIRED = {"lrtt.optim.masked", "lrtt.tt.num_params"}  # old names whose messages name the new ones
FILE_SUFFIXES = ("py", "md", "yaml", "json", "toml")


def resolves(reference: str) -> bool:
    parts = reference.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return True
    return False


def sources():
    return sorted((ROOT / "lrtt").rglob("*.py")) + sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_every_lrtt_name_the_sources_and_docs_mention_exists():
    dangling = {}
    for path in sources():
        for match in REFERENCE.finditer(path.read_text()):
            reference = match.group(1)
            if reference.endswith(FILE_SUFFIXES) or reference in RETIRED:
                continue
            if not resolves(reference):
                dangling.setdefault(reference, []).append(str(path.relative_to(ROOT)))
    assert not dangling, f"names that do not exist: {dangling}"


def test_no_source_cites_a_design_file_outside_the_repository():
    cited = [str(p.relative_to(ROOT)) for p in (ROOT / "lrtt").rglob("*.py") if re.search(r"DESIGN(\.md)? ?§", p.read_text())]
    assert not cited, cited
