"""Rules the suite keeps about itself, read from its own source: every subprocess a
test starts or waits for has a timeout, so a hung child fails one test instead of
holding CI until its limit."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
WAITS = {"run", "check_output", "check_call", "call", "wait", "communicate"}


def calls_without_timeout(source: str) -> list[int]:
    """Lines of ``subprocess.run(...)``-like calls and ``.wait()``/``.communicate()``
    that pass no ``timeout``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        is_subprocess = isinstance(owner, ast.Name) and owner.id == "subprocess"
        waits = name in {"wait", "communicate"} and not node.args
        if (is_subprocess and name in WAITS) or waits:
            if not any(k.arg == "timeout" for k in node.keywords):
                lines.append(node.lineno)
    return lines


def test_the_rule_sees_a_call_without_a_timeout():
    assert calls_without_timeout("import subprocess\nsubprocess.run(['x'])\np.wait()\n") == [2, 3]
    assert calls_without_timeout("subprocess.run(['x'], timeout=5)\np.wait(timeout=1)\n") == []


def test_every_subprocess_in_the_tests_has_a_timeout():
    found = {
        str(path.relative_to(TESTS)): lines
        for path in sorted(TESTS.rglob("*.py"))
        if (lines := calls_without_timeout(path.read_text()))
    }
    assert found == {}, f"give these calls a timeout: {found}"
