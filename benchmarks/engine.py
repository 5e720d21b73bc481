"""The streaming engine's figures: memory on 1B and 8B shapes, the peer on the same
1B model, SmolLM2 against the pre-engine code, and kill-and-resume.

Parts (``--only``), each in its own processes, measured from outside (wall time
and peak resident memory, ``ru_maxrss`` from ``wait4``):

- ``rtn8b``: RTN w4 g128 of the random-weight Llama-3.1-8B shape (16 GB bf16);
- ``gptq1b``: GPTQ w4 g128 on 16 × 512 calibration tokens of the Llama-3.2-1B shape,
  ours and llmcompressor's (``benchmarks/peer/setup.sh``) on the same folder, the
  same token ids, min-max observer, activation order with static groups,
  dampening 0.01, block 128, float32, 2 threads, and the same allocator setting
  (glibc's mmap threshold at 1 MiB: ours sets it, the peer gets it from
  ``MALLOC_MMAP_THRESHOLD_``);
- ``gptq1b-no-refit``: ours alone as in ``gptq1b`` with ``refit_scales: false`` (one
  GPTQ pass, no refit rounds), beside the peer's figures of the stored ``gptq1b`` row
  (this machine's only);
- ``smollm2``: GPTQ w4 g64 (``recipes/gptq-w4g64.yaml``, 128 × 512 tokens) with the
  code before the engine (a git worktree of ``--before``) and with this code: time,
  memory, and whether every tensor of the two checkpoints is bit-identical;
- ``resume``: the same run killed with SIGKILL once block 15/30 is journaled, then
  run again: the output against the uninterrupted one, byte for byte, and the two
  runs' total time against one uninterrupted run.

    .venv/bin/python benchmarks/engine.py --work /work/bench-engine          # all (~1.5 h)
    .venv/bin/python benchmarks/engine.py --work /work/bench-engine --only resume

Writes ``benchmarks/results/engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from gptq_vs_peer import DATA, REPO, calibration_file, measured, refit_setting, shipped_rounds
from random_models import write_model

from benchmarks.machine import machine
from benchmarks.peak_rss import run_measured
from quantmill.recipes import find_recipe

RESULTS = REPO / "benchmarks" / "results" / "engine.json"
PEER_PY = REPO / "benchmarks" / "peer" / ".venv" / "bin" / "python"
BEFORE = "aa682ad"  # the last commit before the streaming engine
KILL_AT_BLOCK = 15
CALIB_BATCH_1B = 4
PARTS = ("rtn8b", "gptq1b", "gptq1b-no-refit", "smollm2", "resume")


def quantize_cmd(
    python: str, model: str, recipe: Path, out: Path, *extra: str, program: str = "app"
) -> list[str]:
    """``program``: ``app`` here; ``quantmill.cli`` in commits from before ``app`` existed."""
    return [python, "-m", program, "quantize", "--model", model, "--recipe",
            str(recipe), "--out", str(out), "--no-eval", "--json", "-q", *extra]  # fmt: skip


def recipe_file(
    work: Path, name: str, method: str, group: int, samples: int, batch: int = 8, **step
) -> Path:
    recipe = {
        "name": name,
        "steps": [{"method": method, "weights": {"bits": 4, "group_size": group,
                                                  "symmetric": True, "observer": "minmax"},
                   **step}],
        "calibration": {"dataset": str(DATA / "wiki.valid.tokens"), "num_samples": samples,
                        "seq_len": 512, "seed": 0, "batch_size": batch},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def model_folder(work: Path, name: str) -> Path:
    folder = work / "models" / name
    if not (folder / "config.json").is_file():
        from quantmill.sources import resolve_model

        print(json.dumps(write_model(name, folder, resolve_model("smollm2-135m").path)))
    return folder


def rtn8b(work: Path) -> dict[str, Any]:
    model = model_folder(work, "llama-3.1-8b")
    recipe = recipe_file(work, "rtn-w4g128", "rtn", 128, 1)
    out = work / "ours-rtn8b"
    run = measured(quantize_cmd(sys.executable, str(model), recipe, out, "--overwrite"),
                   work / "rtn8b.log")  # fmt: skip
    return {
        "model": "Llama-3.1-8B shape, random bf16 weights",
        "source_bytes": _size(model),
        "output_bytes": _size(out),
        "quant_seconds": run["result"].get("quant_seconds"),
        "wall_seconds": run["wall_seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "target_peak_rss_mb": 2500,
        "met": run["peak_rss_mb"] <= 2500,
    }


def gptq1b(work: Path, earlier: dict[str, Any] | None = None, refit: bool = True) -> dict[str, Any]:
    """``earlier``: a row whose peer figures are kept instead of running the peer again
    (``--keep-peer``: the same machine's, said in the row with when they were measured);
    ``refit`` False: our GPTQ without the scale refit and its rounds (one GPTQ pass)."""
    model = model_folder(work, "llama-3.2-1b")
    args = argparse.Namespace(samples=16, seq_len=512)
    calib = calibration_file(model, work, args)
    # 4 samples per forward pass (the peer runs one at a time): at 8, the MLP's
    # activations of a 1B model alone take 0.4 GB of the 1.5 GB budget
    recipe = recipe_file(work, "gptq-w4g128", "gptq", 128, 16, batch=CALIB_BATCH_1B,
                         actorder=True, static_groups=True, dampening=0.01,
                         block_size=128, **({} if refit else {"refit_scales": False}))  # fmt: skip
    out = work / "ours-gptq1b"
    ours = measured(quantize_cmd(sys.executable, str(model), recipe, out, "--overwrite"),
                    work / "gptq1b-ours.log")  # fmt: skip
    row: dict[str, Any] = {
        "model": "Llama-3.2-1B shape, random bf16 weights",
        "ours": {"wall_seconds": ours["wall_seconds"], "peak_rss_mb": ours["peak_rss_mb"],
                 "quant_seconds": ours["result"].get("quant_seconds")},
        "target_peak_rss_mb": 1500,
        "settings": "w4 g128 symmetric, min-max, actorder static, dampening 0.01, block 128, "
        f"16 x 512 tokens, float32, {CALIB_BATCH_1B} samples per forward pass (peer: 1)",
        "ours_gptq": shipped_gptq() if refit else {"refit_scales": False, "refit_rounds": 1},
    }  # fmt: skip
    if earlier is not None:
        row["peer"] = earlier["peer"]
        row["peer_measured"] = earlier.get("peer_measured", earlier["measured"])
        peer = earlier["peer"]
    elif PEER_PY.is_file():
        peer_out = work / "peer-gptq1b"
        cmd = [str(PEER_PY), str(REPO / "benchmarks/peer/run_llmcompressor.py"),
               "--model-dir", str(model), "--calib", str(calib), "--method", "gptq",
               "--bits", "4", "--group-size", "128", "--symmetric", "--actorder", "static",
               "--out", str(peer_out)]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        run = measured(cmd, work / "gptq1b-peer.log", env)
        peer = {"wall_seconds": run["wall_seconds"], "peak_rss_mb": run["peak_rss_mb"],
                "quant_seconds": run["result"].get("quant_seconds")}  # fmt: skip
        row["peer"] = peer
    if "peer" in row:
        row["memory_ratio"] = ours["peak_rss_mb"] / peer["peak_rss_mb"]
        row["wall_ratio"] = ours["wall_seconds"] / peer["wall_seconds"]
        row["met"] = (ours["peak_rss_mb"] <= 1500 and row["memory_ratio"] <= 0.5
                      and row["wall_ratio"] <= 1.0)  # fmt: skip
    return row


def shipped_gptq() -> dict[str, Any]:
    """What our GPTQ does beyond the peer's by default (the recipe leaves it alone)."""
    return {"refit_scales": refit_setting("shipped"), "refit_rounds": shipped_rounds()}


def smollm2(work: Path, before: str) -> dict[str, Any]:
    recipe = find_recipe("gptq-w4g64")
    data = ["--calib-data", str(DATA / "wiki.valid.tokens")]
    tree = work / f"tree-{before}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), before], cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
    runs = {}
    for side, cwd in (("before", tree), ("engine", REPO)):
        out = work / f"smollm2-{side}"
        program = "quantmill.cli" if side == "before" else "app"
        cmd = quantize_cmd(
            sys.executable, "smollm2-135m", recipe, out, "--overwrite", *data, program=program
        )
        env = {**os.environ, "PYTHONPATH": str(cwd)}
        runs[side] = measured_in(cmd, work / f"smollm2-{side}.log", cwd, env)
        runs[side]["out"] = str(out)
    same = identical_tensors(Path(runs["before"]["out"]), Path(runs["engine"]["out"]))
    return {
        "recipe": "gptq-w4g64 (128 x 512 calibration tokens, mse observer)",
        "before_commit": before,
        "before": _figures(runs["before"]),
        "engine": _figures(runs["engine"]),
        "tensors": same,
        "time_ratio": runs["engine"]["wall_seconds"] / runs["before"]["wall_seconds"],
        "met": same["identical"]
        and runs["engine"]["wall_seconds"] <= runs["before"]["wall_seconds"],
    }


def resume(work: Path) -> dict[str, Any]:
    recipe = find_recipe("gptq-w4g64")
    data = ["--calib-data", str(DATA / "wiki.valid.tokens")]
    whole = work / "smollm2-engine"
    if not (whole / "config.json").is_file():
        smollm2(work, BEFORE)
    uninterrupted = json.loads((work / "smollm2-engine.run.json").read_text())
    out = work / "smollm2-resumed"
    cmd = quantize_cmd(sys.executable, "smollm2-135m", recipe, out, "--no-resume",
                       "--overwrite", *data)  # fmt: skip
    killed = killed_at_block(cmd, out, KILL_AT_BLOCK, work / "resume-killed.log")
    again = measured(quantize_cmd(sys.executable, "smollm2-135m", recipe, out, *data),
                     work / "resume-again.log")  # fmt: skip
    log = (work / "resume-again.log").read_text()
    files = sorted(p.name for p in whole.glob("*.safetensors")) + ["config.json"]
    same = {n: (out / n).read_bytes() == (whole / n).read_bytes() for n in files}
    total = killed["wall_seconds"] + again["wall_seconds"]
    return {
        "killed_after_block": killed["blocks_done"],
        "killed_wall_seconds": killed["wall_seconds"],
        "resumed_wall_seconds": again["wall_seconds"],
        "resumed_message": next((ln for ln in log.splitlines() if "resuming at block" in ln), None),
        "uninterrupted_wall_seconds": uninterrupted["wall_seconds"],
        "total_ratio": total / uninterrupted["wall_seconds"],
        "byte_identical": all(same.values()),
        "files": same,
        "met": all(same.values()) and total <= 1.2 * uninterrupted["wall_seconds"],
    }


def killed_at_block(cmd: list[str], out: Path, block: int, log: Path) -> dict[str, Any]:
    """Start ``cmd``; SIGKILL it once its journal records ``block`` finished blocks."""
    journal = out.with_name(f".{out.name}.journal") / "journal.json"
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        done = 0
        while proc.poll() is None:
            try:
                done = json.loads(journal.read_text())["state"].get("blocks_done", 0)
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= block:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        proc.wait()
    return {"blocks_done": done, "wall_seconds": time.perf_counter() - start}


def measured_in(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    # through peak_rss.py: a direct child's peak RSS would include this process's own
    out, measured_run = run_measured(cmd, log, cwd=cwd, env=env)
    if measured_run["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed; see {log}")
    result = json.loads(out)
    run = {"result": result, "wall_seconds": measured_run["wall_seconds"],
           "peak_rss_mb": measured_run["peak_rss_kb"] / 1024}  # fmt: skip
    log.with_suffix(".run.json").write_text(json.dumps(run))
    (log.parent / f"{Path(result['out_dir']).name}.run.json").write_text(json.dumps(run))
    return run


def identical_tensors(a: Path, b: Path) -> dict[str, Any]:
    from quantmill.weights import WeightFiles

    left, right = WeightFiles(a), WeightFiles(b)
    names = sorted(set(left.tensors) | set(right.tensors))
    differ = [
        n
        for n in names
        if n not in left.tensors
        or n not in right.tensors
        or left.dtype(n) != right.dtype(n)
        or not torch.equal(left.read(n), right.read(n))
    ]
    return {"tensors": len(names), "differing": differ[:20], "identical": not differ}  # fmt: skip


def _figures(run: dict[str, Any]) -> dict[str, Any]:
    return {"quant_seconds": run["result"].get("quant_seconds"),
            "wall_seconds": run["wall_seconds"], "peak_rss_mb": run["peak_rss_mb"]}  # fmt: skip


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def same_machine_row(row: dict[str, Any] | None) -> dict[str, Any]:
    """``row`` when it has peer figures from this machine's CPU; otherwise exit 2."""
    here = machine(torch.get_num_threads())
    if not row or "peer" not in row or row.get("machine") != here:
        message = (
            f"--keep-peer: the stored gptq1b row has no peer figures from this machine "
            f"({here}); run without --keep-peer to measure the peer too"
        )
        print(message, file=sys.stderr)
        raise SystemExit(2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="models, checkpoints, logs")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--before", default=BEFORE, help="the commit to compare against")
    parser.add_argument(
        "--keep-peer", action="store_true",
        help="gptq1b: keep the stored row's peer figures (this CPU's only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform()}  # fmt: skip
    for part in args.only:
        print(f"== {part}", flush=True)
        if part == "smollm2":
            row = smollm2(args.work, args.before)
        elif part == "gptq1b" and args.keep_peer:
            row = gptq1b(args.work, same_machine_row(results.get("gptq1b")))
        elif part == "gptq1b-no-refit":  # the peer's figures: gptq1b's, from this machine
            row = gptq1b(args.work, same_machine_row(results.get("gptq1b")), refit=False)
        else:
            row = globals()[part](args.work)
        row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        row["machine"] = machine(torch.get_num_threads())
        results[part] = row
        print(json.dumps(row, indent=2), flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
