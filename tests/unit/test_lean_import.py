import subprocess
import sys


def test_import_quantmill_leaves_prefect_and_mlflow_out():
    code = (
        "import sys, quantmill, quantmill.api, quantmill.cli, quantmill.methods;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'mlflow'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prefect_and_mlflow_are_installed_so_the_check_means_something():
    import importlib.util

    assert importlib.util.find_spec("prefect") is not None
    assert importlib.util.find_spec("mlflow") is not None


def test_cli_pins_the_mmap_threshold_on_glibc(monkeypatch):
    import platform

    from app.main import pin_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("QUANTMILL_MMAP_PIN", raising=False)
    assert pin_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
    # the environment's choice wins: glibc's own variable, or the pin switched off
    monkeypatch.setenv("QUANTMILL_MMAP_PIN", "0")
    assert pin_mmap_threshold() is False
    monkeypatch.delenv("QUANTMILL_MMAP_PIN")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert pin_mmap_threshold() is False
