"""The layout's rules that no linter keeps: no module of the packages over 500 lines (the import rules are
import-linter's, in pyproject.toml, run by `make test`)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in ("virnucpro", "actors", "cluster")
            for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}; split them by what they do"


def test_the_layer_contracts_hold_and_can_fail(tmp_path, monkeypatch):
    """import-linter keeps the contracts of pyproject.toml; and the same contracts break on a library
    module that imports Ray (a copy of the packages with one line added), so they are not vacuous."""
    import shutil
    import sys

    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports() == 0
    for pkg in ("virnucpro", "actors", "cluster"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    storage = tmp_path / "virnucpro" / "io" / "storage.py"
    storage.write_text(storage.read_text() + "\nimport ray  # noqa\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    for name in [m for m in sys.modules if m.split(".")[0] in ("virnucpro", "actors", "cluster")]:
        monkeypatch.delitem(sys.modules, name)
    assert lint_imports() == 1
