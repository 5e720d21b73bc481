"""Which folder may import which: the library knows nothing above it, the stack
nothing of the pipeline, and only the program (``app``) composes them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# what each top-level package may import among the repository's packages
ALLOWED = {
    "quantmill": {"quantmill"},
    "tracking": {"tracking", "quantmill"},
    "tasks": {"tasks", "tracking", "quantmill"},
    "flows": {"flows", "tasks", "tracking", "quantmill"},
    "stack": {"stack", "quantmill"},
    "app": {"app", "flows", "stack", "quantmill"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in ``path``, at module level or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_folder_imports_only_the_layers_below_it(package):
    wrong = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) - ALLOWED[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from flows.deploy import deploy_all\n")
    assert imported_packages(probe) == {"flows"}


def test_the_console_script_is_the_program_not_the_library():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"quantmill": "app.main:main"}
