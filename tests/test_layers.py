"""The import contract of ipa_lib (`.importlinter`): each layer imports only the layers below
it (cli > analysis > orchestration > stages > mlops > models > data > core) and no module
reaches itself again through its imports. Lazy imports inside functions count: grimp reads
every import statement."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# Prints every import cycle in the ipa_lib found from the working directory (one line each:
# a -> b -> ... -> a) and exits 1 if there is one. Runs in a subprocess so that a copied
# ipa_lib is the one graphed, not the editable install this process has imported.
FIND_CYCLES = """
import sys
import grimp

graph = grimp.build_graph("ipa_lib", cache_dir=None)
cycles = set()
for module in sorted(graph.modules):
    for imported in sorted(graph.find_modules_directly_imported_by(module)):
        chain = graph.find_shortest_chain(importer=imported, imported=module)
        if chain:  # module -> imported -> ... -> module
            i = chain.index(min(chain))  # one rotation per cycle
            cycles.add(" -> ".join(chain[i:] + chain[:i] + (chain[i],)))
print("\\n".join(sorted(cycles)))
sys.exit(1 if cycles else 0)
"""


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(REPO / ".importlinter")],
                          check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def _cycles(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FIND_CYCLES], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_lint_imports_keeps_every_contract():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def test_no_import_cycle_between_any_two_modules():
    r = _cycles(REPO)
    assert r.returncode == 0, f"import cycles in ipa_lib:\n{r.stdout}{r.stderr}"


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """In a copy of ipa_lib: a lazy import of the CLI from core breaks the layers contract, and
    two data modules importing each other (inside functions) break both cycle checks."""
    shutil.copytree(REPO / "ipa_lib", tmp_path / "ipa_lib", ignore=shutil.ignore_patterns("__pycache__"))
    assert _lint(tmp_path).returncode == 0 and _cycles(tmp_path).returncode == 0  # the copy is graphed

    with open(tmp_path / "ipa_lib" / "core" / "io.py", "a") as f:
        f.write("\n\ndef _upward():\n    from ipa_lib.cli import main\n\n    return main\n")
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ipa_lib layers" in r.stdout and "BROKEN" in r.stdout and "ipa_lib.core.io -> ipa_lib.cli" in r.stdout, r.stdout

    (tmp_path / "ipa_lib" / "core" / "io.py").write_text((REPO / "ipa_lib" / "core" / "io.py").read_text())
    (tmp_path / "ipa_lib" / "data" / "cyc_a.py").write_text("def f():\n    from ipa_lib.data import cyc_b\n\n    return cyc_b\n")
    (tmp_path / "ipa_lib" / "data" / "cyc_b.py").write_text("def g():\n    from ipa_lib.data.cyc_a import f\n\n    return f\n")
    r = _lint(tmp_path)
    assert r.returncode == 1 and "No cycles are allowed in ipa_lib.data" in r.stdout, r.stdout + r.stderr
    r = _cycles(tmp_path)
    assert r.returncode == 1 and "ipa_lib.data.cyc_a -> ipa_lib.data.cyc_b -> ipa_lib.data.cyc_a" in r.stdout, r.stdout + r.stderr
