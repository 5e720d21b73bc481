"""List the error paths a user can reach and whether a test checks each one.

An error path is a ``raise`` of one of quantmill's own errors (``QuantmillError`` and
its subclasses, the ones a user is meant to read). It counts as tested when a test
names a piece of its message: a string in a test (a ``match=`` pattern, an expected
fragment) found in the message's literal text, or a literal part of the message (the
text between two placeholders) found in a string of a test. That is a heuristic, stated as one: a
test that only checks the error's type is not seen, and a fragment shared by two
messages marks both.

    .venv/bin/python scripts/error_paths.py            # the untested ones, and counts
    .venv/bin/python scripts/error_paths.py --json F   # every path, as JSON
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("quantmill", "flows", "tasks", "app", "tracking", "stack")
MIN_PIECE = 10  # characters: shorter test strings match too much


def our_errors() -> set[str]:
    """The names of ``QuantmillError`` and every subclass the program defines."""
    sys.path.insert(0, str(REPO))
    import flows.reach  # noqa: F401  (its error class)
    import quantmill.api  # noqa: F401  (imports the modules that define the rest)
    from quantmill.errors import QuantmillError

    names, todo = set(), [QuantmillError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def literal_text(node: ast.expr) -> str:
    """The message's literal parts, placeholders as a line break (pieces never span one)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        pieces = (literal_text(v) if isinstance(v, ast.Constant) else "\n" for v in node.values)
        return "".join(pieces)
    if isinstance(node, ast.BinOp):  # "a" + f"b"
        return literal_text(node.left) + "\n" + literal_text(node.right)
    return ""


def raises(errors: set[str]) -> list[dict]:
    found = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                    continue
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name not in errors:
                    continue
                text = literal_text(node.exc.args[0]) if node.exc.args else ""
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                found.append({"where": where, "error": name, "text": text})
    return found


def test_strings() -> set[str]:
    """Every string a test writes down, regex escapes undone."""
    pieces = set()
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for part in re.split(r"\.\*|\.\+|\\s\+|[\^$]", node.value):
                    part = re.sub(r"\\(.)", r"\1", part).strip()
                    if len(part) >= MIN_PIECE:
                        pieces.add(part)
    return pieces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every path and its verdict here")
    args = parser.parse_args()
    pieces = test_strings()
    paths = raises(our_errors())
    for entry in paths:
        fragments = [f.strip(" :;,.()") for f in entry["text"].split("\n")]
        fragments = [f for f in fragments if len(f) >= MIN_PIECE]
        entry["tested"] = any(piece in entry["text"] for piece in pieces) or any(
            fragment in piece for fragment in fragments for piece in pieces
        )
    untested = [p for p in paths if not p["tested"]]
    for entry in untested:
        first = entry["text"].replace("\n", "…").strip()[:90]
        print(f"{entry['where']:<40} {entry['error']:<28} {first}")
    print(f"{len(paths)} error paths, {len(paths) - len(untested)} named by a test, "
          f"{len(untested)} not")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
