"""Every benchmark script imports: the README's figures name these commands, and a
helper renamed in one script must not leave another unable to start (as happened to
``outlier_methods.py`` and ``qat.py`` when ``gptq_vs_peer.py`` was rewritten)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # how the scripts find each other
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # import errors and missing names fail here
    if '__name__ == "__main__"' in script.read_text():  # a command, not a helper module
        assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_a_row_measured_with_an_earlier_search_is_not_current(monkeypatch) -> None:
    """Benchmarks resume rows whose recipe is unchanged; the search is code, so a row
    of an ``mse`` recipe without the search it was measured with is from before it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from benchmarks import searches

    mse = {"steps": [{"method": "gptq", "weights": {"bits": 4, "observer": "mse"}}]}
    minmax = {"steps": [{"method": "rtn", "weights": {"bits": 4, "observer": "minmax"}}]}
    assert searches.uses_search(mse) and not searches.uses_search(minmax)
    assert not searches.current({"recipe": mse}, mse)  # no record: the earlier search
    earlier = {**searches.EARLIER_MSE_SEARCH, "grid": "signed"}  # symmetric: its grid counts
    assert searches.search_of({"recipe": mse}) == earlier
    assert searches.current({"recipe": mse, **searches.recorded(mse)}, mse)
    assert searches.current({"recipe": minmax}, minmax)  # min-max rows never searched
    assert not searches.current({"recipe": minmax}, mse)
    assert searches.recorded(mse)["mse_search"] != earlier


def test_the_symmetric_grid_counts_only_for_symmetric_searches(monkeypatch) -> None:
    """A row recorded before the grid was (``signed``) is not current for a symmetric
    recipe once the search starts from another grid, and still is for an asymmetric one."""
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from dataclasses import replace

    from benchmarks import searches
    from quantmill.quant import grid

    sym = {"steps": [{"method": "gptq", "weights": {"bits": 3, "observer": "mse"}}]}
    asym = {"steps": [{"method": "gptq", "weights": {"bits": 3, "observer": "mse",
                                                     "symmetric": False}}]}  # fmt: skip
    monkeypatch.setattr(grid, "MSE_SEARCH", replace(grid.MSE_SEARCH, grid="absmax"))
    before = {k: v for k, v in vars(grid.MSE_SEARCH).items() if k != "grid"}
    assert not searches.current({"recipe": sym, "mse_search": before}, sym)
    assert searches.current({"recipe": asym, "mse_search": before}, asym)
    assert searches.recorded(sym)["mse_search"]["grid"] == "absmax"
    assert "grid" not in searches.recorded(asym)["mse_search"]
    assert searches.label(searches.recorded(sym)["mse_search"]).endswith(", absmax")


def test_a_comparison_row_from_before_the_refit_is_not_a_refit_row(monkeypatch) -> None:
    """``gptq_vs_peer --resume`` keeps rows by what they measured: one stored before our
    GPTQ could refit its scales is current for ``--refit-scales off`` only."""
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from types import SimpleNamespace

    from benchmarks import gptq_vs_peer as bench

    def planned(refit: bool, rounds: int = 1) -> dict:
        args = SimpleNamespace(
            dtype="bfloat16", peer_dtype="float32", refit_scales=refit, refit_rounds=rounds
        )
        return bench.planned_row("w4g64a", "minmax", "default", args)

    stored = {k: v for k, v in planned(False).items() if not k.startswith("refit_")}
    assert bench.row_key(stored) == bench.row_key(planned(False))
    assert bench.row_key(stored) != bench.row_key(planned(True))
    # a refit row from before the rounds is a one-round row
    one = {k: v for k, v in planned(True).items() if k != "refit_rounds"}
    assert bench.row_key(one) == bench.row_key(planned(True, 1))
    assert bench.row_key(one) != bench.row_key(planned(True, 3))
    assert bench.observer_label(planned(True)).endswith("ours refit")
    assert bench.observer_label(planned(True, 3)).endswith("ours refit ×3")
    assert bench.refit_setting("on") and not bench.refit_setting("off")


def test_resume_skips_only_rows_this_cpu_measured(monkeypatch) -> None:
    """``--resume`` on another CPU measures a row again that only another CPU measured."""
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from types import SimpleNamespace

    from benchmarks import gptq_vs_peer as bench

    args = SimpleNamespace(dtype="bfloat16", peer_dtype="float32", refit_scales=True,
                           refit_rounds=2)  # fmt: skip
    row = {**bench.planned_row("w4g64a", "mse", "default", args), "cpu": "Intel Xeon"}
    key = bench.row_key(row)
    assert key in bench.measured_on([row], "Intel Xeon")
    assert key not in bench.measured_on([row], "AMD EPYC")


def test_the_current_table_keeps_only_rows_of_the_shipped_gptq(monkeypatch) -> None:
    """``--table --current``: rows measured with fewer refit rounds, or none, than ship
    now are left out; a row of the shipped settings stays."""
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from types import SimpleNamespace

    from benchmarks import gptq_vs_peer as bench

    def planned(refit: bool, rounds: int) -> dict:
        args = SimpleNamespace(
            dtype="bfloat16", peer_dtype="float32", refit_scales=refit, refit_rounds=rounds
        )
        return bench.planned_row("w4g64s", "mse", "default", args)

    shipped = planned(bench.refit_setting("shipped"), bench.shipped_rounds())
    rows = [planned(False, 1), planned(True, bench.shipped_rounds() + 1), shipped]
    args = SimpleNamespace(dtype="bfloat16", peer_dtype="float32")
    assert bench.current_rows(rows, args) == [shipped]


def test_keep_peer_takes_only_this_machines_peer_figures(monkeypatch, capsys) -> None:
    """``engine.py --keep-peer`` reuses a stored gptq1b row's peer figures only when the
    same CPU made them; otherwise it exits 2 and says to measure the peer too."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    import engine
    from machine import machine

    here = machine(engine.torch.get_num_threads())
    row = {"peer": {"wall_seconds": 1.0}, "machine": here, "measured": "then"}
    assert engine.same_machine_row(row) is row
    for other in ({**row, "machine": {**here, "cpu": "another CPU"}}, {"machine": here}, None):
        with pytest.raises(SystemExit) as stop:
            engine.same_machine_row(other)
        assert stop.value.code == 2
        assert "run without --keep-peer" in capsys.readouterr().err
