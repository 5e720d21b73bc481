"""Nothing in the compute path assumes the CPU: every tensor the library creates there
is made on a given device, or is explicitly a host value (a list, an index moved to
the device, a sum kept in CPU memory).

CI has no GPU, so this reads the code: a tensor factory call without ``device=``
must be turned into Python values or moved on the same line, or say why it stays
on the host (``# host: ...``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "quantmill"
COMPUTE_PATH = [
    *sorted((ROOT / "quant").glob("*.py")),
    *sorted((ROOT / "methods").glob("*.py")),
    *sorted((ROOT / "qat").glob("*.py")),
    *(ROOT / name for name in ("stats.py", "outliers.py", "evaluate.py", "blocks.py",
                               "engine.py", "driver.py", "kv_cache.py", "runtime.py",
                               "rotation.py")),
]  # fmt: skip
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "eye", "linspace", "tensor"}  # fmt: skip
HOST_OK = re.compile(r"\.tolist\(\)|\.to\(|\bint\(|# host:")


def device_free_calls(path: Path) -> list[str]:
    """``file:line`` of each ``torch.<factory>(...)`` without ``device=`` nor a host reason."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue
        if func.attr not in FACTORIES or any(k.arg == "device" for k in node.keywords):
            continue
        text = " ".join(lines[node.lineno - 1 : (node.end_lineno or node.lineno)])
        if not HOST_OK.search(text):
            found.append(f"{path.name}:{node.lineno}: {text.strip()}")
    return found


def test_the_compute_path_makes_tensors_on_a_given_device():
    offenders = [line for path in COMPUTE_PATH for line in device_free_calls(path)]
    assert offenders == []


def test_the_check_finds_a_cpu_tensor(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nx = torch.zeros(3)\ny = torch.zeros(3, device=z.device)\n")
    assert len(device_free_calls(bad)) == 1
