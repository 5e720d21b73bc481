"""GPTQ vs RTN vs the peer toolkit (llmcompressor) on SmolLM2-135M, on equal terms.

Both sides of every row get, in one run on one machine:

* the same weight observer (each pairing, ``--observers minmax,mse``, runs on
  both sides: llmcompressor's ``minmax``/``mse`` observers, quantmill's);
* the same allocator setting (``--allocators``): ``pinned`` gives both processes
  glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` (what quantmill's CLI sets for itself
  with mallopt; switched off on its side so that one mechanism acts on both), and
  ``default`` gives both glibc's dynamic threshold;
* the same threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and ``--threads``);
* the same calibration token ids: computed once by quantmill's loader and saved for
  the peer; the digest quantmill reports for the ids it used is checked against the
  digest of that file;
* the same GPTQ settings (dampening 0.01, 128-column blocks, activation order with
  group parameters from the original weights: the peer's ``actorder: static``);
* the same evaluation path: every checkpoint is loaded by transformers' dequantizing
  path (``benchmarks/eval_dequantized.py``) and scored on the same windows; the
  default path of ``quantmill eval`` is reported beside it (it differs for the
  peer's asymmetric checkpoints, which the compressed path cannot load).

No setting of ours is chosen on these figures: the observer is the pairing's, the
rest are the peer's defaults. Each side's GPTQ calibration loss (quantmill's: the sum
over layers of GPTQ's own error proxy) is reported, the criterion a user without test
data would pick an observer by. Each GPTQ quantization runs ``--repeats`` times, the
two sides interleaved, every run in its own process measured from outside (wall time,
peak resident memory from ``wait4``); the load average before and after the run is
recorded as a witness that nothing else ran.

    .venv/bin/python benchmarks/gptq_vs_peer.py                        # everything (hours)
    .venv/bin/python benchmarks/gptq_vs_peer.py --settings w4g64s,w4g64a --observers minmax
    .venv/bin/python benchmarks/gptq_vs_peer.py --table benchmarks/results/gptq_vs_peer.json

Rows are keyed by setting, observer, allocator, dtypes and our GPTQ's refit settings; a
rerun with ``--resume`` keeps the rows already in ``--out`` and skips those this CPU
already measured (another CPU's row of the same key is measured again, and kept
beside). Writes ``benchmarks/results/gptq_vs_peer.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.jsonfile import write_json  # noqa: E402
from benchmarks.machine import cpu_label, cpu_model  # noqa: E402
from benchmarks.peak_rss import run_measured  # noqa: E402
from benchmarks.searches import EARLIER_MSE_SEARCH, mse_search, normal  # noqa: E402
from benchmarks.searches import label as search_label  # noqa: E402

DATA = Path(os.environ.get("QUANTMILL_DATA_DIR", REPO.parent / "shared" / "data")) / "wikitext-2"
SETTINGS = {  # label: (bits, group_size or None for per-channel, symmetric)
    "w4g64s": (4, 64, True),
    "w4g64a": (4, 64, False),
    "w4pcs": (4, None, True),
    "w4pca": (4, None, False),
    "w3g64s": (3, 64, True),
    "w3g64a": (3, 64, False),
}
MMAP_THRESHOLD = "1048576"  # app/main.py's pin, as glibc's environment variable
RUN_LIMIT_S = 3600
MIN_RUNS_FOR_A_WIN = 3  # timed runs a side before a time ratio is called a win (bold)
# llmcompressor 0.14's "mse" search (maxshrink 0.2, grid 100: 20 steps of 0.01 from
# the full range, patience 5, norm 2.4; symmetric scales absmax / ((q_max - q_min) / 2))
PEER_MSE_SEARCH = {"min_shrink": 0.81, "steps": 20, "norm": 2.4}


def ours_search(observer: str, symmetric: bool) -> dict[str, Any] | None:
    """The shrink search behind quantmill's observer (None for min-max)."""
    return mse_search(symmetric) if observer != "minmax" else None


def environment(allocator: str, threads: int, ours: bool) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if allocator == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    if ours:
        env["QUANTMILL_MMAP_PIN"] = "0"  # the environment's setting (or none) acts alone
    return env


def measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (through ``peak_rss.py``: a direct child's peak RSS would include
    this process's own) in ``env`` (default: this process's environment); its parsed
    last stdout line, wall seconds and peak RSS."""
    out, run = run_measured(cmd, log, cwd=REPO, env=dict(os.environ) if env is None else env)
    wall = run["wall_seconds"]
    if run["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed; see {log}")
    lines = [line for line in out.strip().splitlines() if line.strip()]
    try:
        result = json.loads(out) if out.strip().startswith("{") else json.loads(lines[-1])
    except (json.JSONDecodeError, IndexError):
        result = {}
    return {"result": result, "wall_seconds": wall, "peak_rss_mb": run["peak_rss_kb"] / 1024}


def measured_once(cmd: list[str], out: Path, log: Path) -> dict[str, Any]:
    """``measured(cmd)`` in this process's environment, or the figures saved beside
    ``out`` when an earlier run already produced it (benchmarks that resume)."""
    sidecar = out.with_name(out.name + ".run.json")
    if out.is_dir() and sidecar.is_file():
        return json.loads(sidecar.read_text())
    run = measured(cmd, log)
    sidecar.write_text(json.dumps(run))
    return run


def evaluate(model_dir: Path, args, log: Path, env: dict[str, str] | None = None) -> float:
    """``quantmill eval``'s perplexity of a folder on the first ``args.windows`` windows."""
    cmd = [sys.executable, "-m", "app", "eval", "--model", str(model_dir), "--json", "-q",
           "--eval-data", str(DATA / "wiki.test.raw"),
           "--eval-windows", str(args.windows)]  # fmt: skip
    return measured(cmd, log, env)["result"]["perplexity"]


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def recipe_file(folder: Path, method: str, label: str, observer: str, args) -> Path:
    bits, group, sym = SETTINGS[label]
    step: dict[str, Any] = {
        "method": method,
        "weights": {"bits": bits, "group_size": group, "symmetric": sym, "observer": observer},
    }
    if method == "gptq":
        # the peer's actorder "static": activation order, group parameters from the
        # original weights (our actorder + static_groups); its dampening and block size
        step.update(actorder=True, static_groups=group is not None, dampening=0.01, block_size=128)
        step["refit_scales"] = args.refit_scales  # ours alone: the peer has no such step
        if args.refit_scales:
            step["refit_rounds"] = args.refit_rounds
    recipe = {
        "name": f"{method}-bench",
        "steps": [step],
        "calibration": {
            "dataset": str(DATA / "wiki.valid.tokens"),
            "num_samples": args.samples,
            "seq_len": args.seq_len,
            "seed": 0,
        },
        "evaluation": {"dataset": str(DATA / "wiki.test.raw"), "max_windows": args.windows},
    }
    path = folder / f"{method}-{label}-{observer}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ours_cmd(method: str, label: str, observer: str, out: Path, work: Path, args) -> list[str]:
    recipe = recipe_file(work, method, label, observer, args)
    return [
        sys.executable, "-m", "app", "quantize", "--model", str(args.model_dir),
        "--recipe", str(recipe), "--out", str(out), "--no-eval", "--json", "-q",
        "--overwrite", "--threads", str(args.threads), "--dtype", args.dtype,
    ]  # fmt: skip


def peer_cmd(label: str, observer: str, out: Path, args) -> list[str]:
    bits, group, sym = SETTINGS[label]
    return [
        args.peer_py, str(REPO / "benchmarks/peer/run_llmcompressor.py"),
        "--model-dir", str(args.model_dir), "--calib", str(args.calib), "--method", "gptq",
        "--bits", str(bits), "--group-size", str(group or -1),
        "--symmetric" if sym else "--asymmetric", "--actorder", "static",
        "--observer", observer, "--dtype", args.peer_dtype, "--out", str(out),
    ]  # fmt: skip


def perplexities(
    folder: Path, args, work: Path, env: dict[str, str], python: str | None = None
) -> dict[str, float | None]:
    """The checkpoint on the dequantizing path (both sides alike) and on quantmill eval's.

    ``python``: the interpreter (and so the compressed-tensors) that reads the checkpoint;
    quantmill eval's path then is not taken (None)."""
    tag = folder.name
    common = ["--windows", str(args.windows)]
    equal = measured(
        [python or sys.executable, str(REPO / "benchmarks/eval_dequantized.py"),
         "--model", str(folder), "--data", str(DATA / "wiki.test.raw"), *common],
        work / f"eval-dq-{tag}.log", env,
    )  # fmt: skip
    return {
        "dequantizing_path": equal["result"]["perplexity"],
        "quantmill_eval_path": None
        if python
        else evaluate(folder, args, work / f"eval-{tag}.log", env),
    }


def peer_reader(bits: int, args) -> str | None:
    """The interpreter that reads the peer's checkpoint: ours, except where the packing
    differs between compressed-tensors versions. 0.19 (the peer's) packs widths that do
    not divide 32 densely across int32 words; 0.17 (ours) pads each word (ten 3-bit
    values), so such a checkpoint is read in the peer's own environment."""
    return args.peer_py if 32 % bits else None


def spread(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def calibration_loss(folder: Path) -> float | None:
    layers = folder / "quantmill_layers.json"
    if not layers.is_file():
        return None
    return sum(layer["loss"] for layer in json.loads(layers.read_text()))


def run_row(label: str, observer: str, allocator: str, work: Path, args) -> dict[str, Any]:
    bits = SETTINGS[label][0]
    ours_env = environment(allocator, args.threads, ours=True)
    peer_env = environment(allocator, args.threads, ours=False)
    tag = f"{label}-{observer}-{allocator}"
    row = planned_row(label, observer, allocator, args)
    rtn_out = work / f"ours-rtn-{tag}"
    rtn = measured(
        ours_cmd("rtn", label, observer, rtn_out, work, args), work / f"rtn-{tag}.log", ours_env
    )
    row["ours_rtn"] = {
        "wall_seconds": rtn["wall_seconds"],
        "peak_rss_mb": rtn["peak_rss_mb"],
        "perplexity": perplexities(rtn_out, args, work, ours_env),
    }
    ours_out, peer_out = work / f"ours-gptq-{tag}", work / f"peer-gptq-{tag}"
    ours_runs, peer_runs, ours_hashes, peer_hashes = [], [], [], []
    for repeat in range(args.repeats):  # interleaved: drift of the machine hits both sides
        run = measured(ours_cmd("gptq", label, observer, ours_out, work, args),
                       work / f"ours-{tag}-{repeat}.log", ours_env)  # fmt: skip
        ours_runs.append({k: run[k] for k in ("wall_seconds", "peak_rss_mb")}
                         | {"quant_seconds": run["result"]["quant_seconds"]})  # fmt: skip
        ours_hashes.append(weights_sha256(ours_out))
        summary = run["result"]
        if args.peer_py:
            run = measured(peer_cmd(label, observer, peer_out, args),
                           work / f"peer-{tag}-{repeat}.log", peer_env)  # fmt: skip
            peer_runs.append({k: run[k] for k in ("wall_seconds", "peak_rss_mb")}
                             | {"quant_seconds": run["result"].get("quant_seconds"),
                                "threads": run["result"].get("threads")})  # fmt: skip
            peer_hashes.append(weights_sha256(peer_out))
        print(
            f"  {tag} repeat {repeat + 1}: ours {ours_runs[-1]['wall_seconds']:.0f} s"
            + (f", peer {peer_runs[-1]['wall_seconds']:.0f} s" if peer_runs else ""),
            flush=True,
        )
    digest = summary["engine"].get("calibration_sha256")
    row["ours_gptq"] = {
        "runs": ours_runs,
        "wall_seconds": spread(ours_runs, "wall_seconds"),
        "peak_rss_mb": spread(ours_runs, "peak_rss_mb"),
        "same_weights_every_repeat": len(set(ours_hashes)) == 1,
        "dtype": summary["engine"]["dtype"],
        "bits_per_weight": summary["bits_per_weight"],
        "calibration_sha256": digest,
        "calibration_loss": calibration_loss(ours_out),
        "perplexity": perplexities(ours_out, args, work, ours_env),
    }
    if digest != args.calib_digest:
        raise RuntimeError(
            f"calibration ids differ: ours {digest}, the peer's file {args.calib_digest}"
        )
    if args.peer_py:
        reader = peer_reader(bits, args)
        row["peer_gptq"] = {
            "runs": peer_runs,
            "wall_seconds": spread(peer_runs, "wall_seconds"),
            "peak_rss_mb": spread(peer_runs, "peak_rss_mb"),
            "same_weights_every_repeat": len(set(peer_hashes)) == 1,
            "dtype": args.peer_dtype,
            "calibration_sha256": args.calib_digest,
            "perplexity": perplexities(peer_out, args, work, ours_env, reader),
            "read_by": "the peer's environment" if reader else "ours",
        }
        row["comparison"] = compare(row["ours_gptq"], row["peer_gptq"])
    return row


def compare(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Ratios of medians, and whether a difference lies beyond the run-to-run spread
    (None below 3 runs a side: one run has no spread to be beyond)."""
    t, p = ours["wall_seconds"], peer["wall_seconds"]
    spread_known = min(len(ours["runs"]), len(peer["runs"])) >= MIN_RUNS_FOR_A_WIN
    return {
        "time_ratio_median": t["median"] / p["median"],
        "faster_beyond_spread": t["max"] < p["min"] if spread_known else None,
        "slower_beyond_spread": t["min"] > p["max"] if spread_known else None,
        "peak_rss_ratio_median": ours["peak_rss_mb"]["median"] / peer["peak_rss_mb"]["median"],
        "perplexity_ours_minus_peer": ours["perplexity"]["dequantizing_path"]
        - peer["perplexity"]["dequantizing_path"],
    }


def planned_row(label: str, observer: str, allocator: str, args) -> dict[str, Any]:
    """What a row measures, before it runs (what ``row_key`` reads)."""
    bits, group, sym = SETTINGS[label]
    return {
        "setting": label, "bits": bits, "group_size": group, "symmetric": sym,
        "observer": observer, "allocator": allocator,
        "dtypes": {"ours": args.dtype, "peer": args.peer_dtype},
        "refit_scales": args.refit_scales,
        "refit_rounds": args.refit_rounds if args.refit_scales else 1,
        "searches": {"ours": ours_search(observer, sym),
                     "peer": PEER_MSE_SEARCH if observer == "mse" else None},
    }  # fmt: skip


def current_rows(rows: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    """The rows a run of the shipped code at ``args.dtype`` would keep (``args`` itself
    is left as it is)."""
    shipped = argparse.Namespace(
        **{**vars(args), "refit_scales": refit_setting("shipped"), "refit_rounds": shipped_rounds()}
    )
    return [
        r for r in rows
        if row_key(r) == row_key(planned_row(r["setting"], r["observer"], r["allocator"], shipped))
    ]  # fmt: skip


def shipped_rounds() -> int:
    """The GPTQ + refit rounds our GPTQ ships with."""
    from quantmill.methods.gptq import GPTQConfig

    return int(GPTQConfig.model_fields["refit_rounds"].default)


def refit_setting(choice: str) -> bool:
    """``--refit-scales``: on, off, or what our GPTQ ships with."""
    if choice == "shipped":
        from quantmill.methods.gptq import GPTQConfig

        return bool(GPTQConfig.model_fields["refit_scales"].default)
    return choice == "on"


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """What makes two rows the same measurement: setting, observer (and our search
    behind it), allocator, dtypes, whether our GPTQ refits its scales and in how many
    rounds (rows from before the options did not refit, or in one round)."""
    dtypes = row["dtypes"]
    search = json.dumps(row_searches(row)["ours"], sort_keys=True)
    return (row["setting"], row["observer"], search, row["allocator"], dtypes["ours"],
            dtypes.get("peer"), str(row.get("refit_scales", False)),
            str(row.get("refit_rounds", 1)))  # fmt: skip


def measured_on(rows: list[dict[str, Any]], cpu: str) -> set[tuple[str, ...]]:
    """The row keys ``cpu`` has measured (``--resume`` skips them; another CPU's row of
    the same key is measured again here)."""
    return {row_key(r) for r in rows if r.get("cpu") == cpu}


def table(report: dict[str, Any]) -> str:
    head = (
        "| setting | observer | allocator | dtype (ours / peer) | RTN ppl | GPTQ ppl "
        "| peer GPTQ ppl | GPTQ s (median [min–max]) | peer s | time ratio | GPTQ MB | peer MB "
        "| CPU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head, f"| original | | | | {report['original_perplexity']:.2f} | | | | | | | | |"]

    def secs(side: dict[str, Any]) -> str:
        w = side["wall_seconds"]
        if len(side.get("runs", [])) == 1:
            return f"{w['median']:.0f} (1 run)"
        return f"{w['median']:.0f} [{w['min']:.0f}–{w['max']:.0f}]"

    for r in report["rows"]:
        ours, peer = r["ours_gptq"], r.get("peer_gptq")
        ppl = lambda side: f"{side['perplexity']['dequantizing_path']:.2f}"  # noqa: E731
        cmp_ = compare(ours, peer) if peer else {}  # the rules as they are now
        ratio = f"{cmp_['time_ratio_median']:.2f}" if cmp_ else "-"
        if cmp_.get("faster_beyond_spread"):
            ratio = f"**{ratio}**"
        lines.append(
            f"| {r['setting']} | {observer_label(r)} | {r['allocator']} "
            f"| {ours['dtype']} / {peer['dtype'] if peer else '-'} | {ppl(r['ours_rtn'])} "
            f"| {ppl(ours)} | {ppl(peer) if peer else '-'} | {secs(ours)} "
            f"| {secs(peer) if peer else '-'} | {ratio} | {ours['peak_rss_mb']['median']:.0f} "
            f"| {peer['peak_rss_mb']['median'] if peer else float('nan'):.0f} "
            f"| {cpu_label(r.get('cpu'))} |"
        )
    return "\n".join(lines)


def observer_label(row: dict[str, Any]) -> str:
    """Our search's range floor and error norm beside the observer: "mse (≥0.8, n3)"."""
    search = row_searches(row)["ours"]
    label = f"{row['observer']} ({search_label(search)})" if search else row["observer"]
    rounds = row.get("refit_rounds", 1)
    refit = ", ours refit" + (f" ×{rounds}" if rounds > 1 else "")
    return label + (refit if row.get("refit_scales") else "")


def row_searches(row: dict[str, Any]) -> dict[str, Any]:
    """Each side's search of ``row``; rows from before the field were measured with our
    earlier search."""
    mse = row["observer"] == "mse"
    searches = row.get("searches") or {"ours": EARLIER_MSE_SEARCH if mse else None,
                                       "peer": PEER_MSE_SEARCH if mse else None}  # fmt: skip
    ours = searches["ours"] and normal(searches["ours"], row["symmetric"])
    return {**searches, "ours": ours}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated labels")
    parser.add_argument("--observers", default="minmax,mse", help="pairings, each on both sides")
    parser.add_argument("--allocators", default="pinned", help="pinned, default or both")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each GPTQ")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="auto", help="quantmill's --dtype (auto: its default)")
    parser.add_argument("--peer-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--refit-scales", choices=["shipped", "on", "off"], default="shipped",
        help="our GPTQ's refit of its scales (shipped: GPTQConfig's default)",
    )  # fmt: skip
    parser.add_argument(
        "--refit-rounds", type=int, help="our GPTQ's refit rounds (default: as shipped)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gptq_vs_peer.json"))
    parser.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    parser.add_argument(
        "--current", action="store_true",
        help="with --table: only rows measuring our GPTQ as it ships now (its search, refit "
        "and rounds) at --dtype and --peer-dtype",
    )  # fmt: skip
    parser.add_argument("--work", help="work folder; default: a new temporary one")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = parser.parse_args()
    if args.table:
        report = json.loads(Path(args.table).read_text())
        if args.current:
            report["rows"] = current_rows(report["rows"], args)
        print(table(report))
        return
    allocators = ["pinned", "default"] if args.allocators == "both" else args.allocators.split(",")
    args.refit_scales = refit_setting(args.refit_scales)
    args.refit_rounds = args.refit_rounds or shipped_rounds()

    from quantmill.data import ids_digest
    from quantmill.sources import resolve_model

    args.model_dir = resolve_model("smollm2-135m").path
    args.peer_py = None
    if not args.skip_peer:
        setup = subprocess.run(
            ["bash", str(REPO / "benchmarks/peer/setup.sh")],
            capture_output=True, text=True, check=True, timeout=RUN_LIMIT_S,
        )  # fmt: skip
        args.peer_py = setup.stdout.strip().splitlines()[-1]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quantmill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.calib = calibration_file(args.model_dir, work, args)
    args.calib_digest = ids_digest(torch.load(args.calib))
    print(f"work folder: {work}", flush=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    rows: list[dict[str, Any]] = [r for r in previous.get("rows", []) if "observer" in r]
    for row in rows:  # rows of an earlier command keep that command's name
        row.setdefault("command", previous.get("command"))
        row.setdefault("cpu", previous.get("machine", {}).get("cpu"))
        sides = ("ours_gptq", "peer_gptq")
        row.setdefault("dtypes", {s.split("_")[0]: row[s]["dtype"] for s in sides if s in row})
        row["searches"] = row_searches(row)
        if "peer_gptq" in row:  # the comparison's rules as they are now, from the row's figures
            row["comparison"] = compare(row["ours_gptq"], row["peer_gptq"])
    done = measured_on(rows, cpu_model())
    env = environment("pinned", args.threads, ours=True)
    original = previous.get("original_perplexity") or evaluate(
        args.model_dir, args, work / "eval-original.log", env
    )
    report: dict[str, Any] = {
        "benchmark": "gptq_vs_peer",
        "command": "python benchmarks/gptq_vs_peer.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "threads_both_sides": args.threads,
            "load_average_before": os.getloadavg(),
        },  # fmt: skip
        "model": "SmolLM2-135M-Instruct (smollm2-135m preset, float32 safetensors)",
        "calibration": {
            "file": "wiki.valid.tokens",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "sha256": args.calib_digest,
            "how": "quantmill's loader, once; saved for the peer; quantmill's reported digest "
            "of the ids it used is checked equal on every row",
        },  # fmt: skip
        "equal_terms": {
            "observer": "the row's, on both sides (quantmill's and llmcompressor's observer of "
            "that name: min-max, or the MSE search over shrunk ranges); `searches` gives "
            "each side's search (range floor, steps, error norm); ours is quantmill's shipped "
            "one, chosen on held-out validation text (benchmarks/observer_search.py)",
            "allocator": "the row's, on both processes: pinned = MALLOC_MMAP_THRESHOLD_="
            f"{MMAP_THRESHOLD} (quantmill's own mallopt pin switched off), default = glibc's "
            "dynamic threshold",
            "threads": f"OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads}, quantmill --threads",
            "gptq": "dampening 0.01, block 128, activation order with static groups on both",
            "evaluation": "perplexity.dequantizing_path: every checkpoint loaded by "
            "transformers with CompressedTensorsConfig(dequantize=True), float32; "
            "perplexity.quantmill_eval_path: `quantmill eval` (transformers' default path); "
            "a peer checkpoint whose packing our compressed-tensors reads otherwise (3-bit: "
            "dense in its 0.19, ten to a word in our 0.17) is read by the peer's own "
            "environment on the same script (`read_by`), without the second path",
            "dtype": "per row: `dtypes` is what each side was asked for (quantmill --dtype, "
            "the peer's load dtype), each side's `dtype` what it ran in",
            "timing": f"{args.repeats} runs per side, interleaved, each its own process; "
            "wall time and peak RSS from outside (wait4)",
        },
        "selection": "no setting of ours chosen on these figures: observer = the pairing, "
        "the rest the peer's defaults; calibration_loss (quantmill's GPTQ error proxy, summed "
        "over layers) is the calibration-data criterion for choosing an observer",
        "evaluation": {"file": "wiki.test.raw", "windows": args.windows, "seq_len": 2048},
        "original_perplexity": original,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for label in args.settings.split(","):
        for observer in args.observers.split(","):
            for allocator in allocators:
                if row_key(planned_row(label, observer, allocator, args)) in done:
                    continue
                before = os.getloadavg()
                row = run_row(label, observer, allocator, work, args)
                row["command"] = report["command"]
                row["cpu"] = report["machine"]["cpu"]
                row["load_average"] = {"before": before, "after": os.getloadavg()}
                rows.append(row)
                report["machine"]["load_average_after"] = row["load_average"]["after"]
                write_report(report, out)  # whole, after every row
    write_report(report, out)  # resumed rows' comparisons recomputed even when none ran
    print(table(report))
    print(f"wrote {out}")


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report`` into ``out`` atomically. ``machine`` is what ran this command; the
    rows name their own CPU, and ``row_cpus`` lists them."""
    report["row_cpus"] = sorted({r.get("cpu") or "?" for r in report["rows"]})
    write_json(out, report)


def calibration_file(model_dir: Path, folder: Path, args) -> Path:
    """The calibration token ids, computed by quantmill's own loader, for the peer."""
    from transformers import AutoTokenizer

    from quantmill.config import CalibrationSpec
    from quantmill.data import calibration_ids

    spec = CalibrationSpec(
        dataset=str(DATA / "wiki.valid.tokens"),
        num_samples=args.samples,
        seq_len=args.seq_len,
        seed=0,
    )
    path = folder / f"calib-{args.samples}x{args.seq_len}.pt"
    torch.save(calibration_ids(AutoTokenizer.from_pretrained(model_dir), spec), path)
    return path


if __name__ == "__main__":
    main()
