"""The layout's rules that no linter keeps: no module of the packages over 500 lines (the import rules are
import-linter's, in pyproject.toml, run by `make test`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in ("virnucpro", "actors", "cluster")
            for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}; split them by what they do"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # in a process of its own: import-linter leaves its mark on the test process's imports and logging
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports())"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(cwd)})


def test_the_layer_contracts_hold_and_can_fail(tmp_path):
    """import-linter keeps the contracts of pyproject.toml; and the same contracts break on a library
    module that imports Ray (a copy of the packages with one line added), so they are not vacuous."""
    kept = _lint_imports(ROOT)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    for pkg in ("virnucpro", "actors", "cluster"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    storage = tmp_path / "virnucpro" / "io" / "storage.py"
    storage.write_text(storage.read_text() + "\nimport ray  # noqa\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode == 1 and "virnucpro.io.storage -> ray" in broken.stdout, broken.stdout
