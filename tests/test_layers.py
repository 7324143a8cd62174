"""The architecture holds: layers point one way, no import cycles, publishing scripts use public names.

The import contracts live in pyproject.toml ([tool.importlinter]) and are checked with
import-linter. Its graph builder walks the package folder from disk, and deployopt is assembled
from three folders by pyproject's package-dir mapping (optimizer/, passes/, models/), so the test
lays the same package out once more as links in its own temporary folder and runs lint-imports
on that.
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"": ROOT / "optimizer", "passes": ROOT / "passes", "models": ROOT / "models"}


def _linked_package(tmp_path: pathlib.Path) -> pathlib.Path:
    package = tmp_path / "deployopt"
    package.mkdir()
    for entry in PACKAGE_DIRS[""].iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("passes", "models"):
        (package / name).symlink_to(PACKAGE_DIRS[name])
    return tmp_path


def test_the_installed_package_is_the_mapped_folders():
    for suffix, folder in PACKAGE_DIRS.items():
        module = importlib.import_module(f"deployopt.{suffix}" if suffix else "deployopt")
        assert pathlib.Path(module.__file__).parent == folder


def test_import_contracts_are_kept(tmp_path):
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(_linked_package(tmp_path)))
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, wherever it stands in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_publishing_scripts_import_only_public_names(script):
    """benchmarks/ runs outside a checkout's tests and never reaches into private names."""
    for module, names in _imports(ROOT / "benchmarks" / script):
        assert not module.startswith("tests"), f"{script} imports {module}"
        if module.startswith("deployopt"):
            private = [part for part in module.split(".") if part.startswith("_")]
            private += [name for name in names if name.startswith("_")]
            assert not private, f"{script} imports private {module}: {private}"


def test_every_package_folder_is_listed_for_installation():
    """pyproject lists packages by hand (package-dir mapping); a folder missing there would import
    in the editable checkout and be absent from a wheel."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = set()
    for suffix, folder in PACKAGE_DIRS.items():
        prefix = "deployopt" + (f".{suffix}" if suffix else "")
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((prefix, *parts)))
    assert found == set(config["packages"])
