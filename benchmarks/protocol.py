"""Wall time per stage of the whole protocol (`vgg demo` = `dvc repro` + the report) on a fresh clone.

Clones this repository's HEAD into a temporary directory (nothing generated there is kept, nothing here is
touched), runs `vgg demo` in it with this environment's `vgg`, and timestamps each `Running stage '...'` line of
`dvc repro`: a stage's time runs from its line to the next one (the last stage's to the end of `dvc repro`).
Prints a table (stages grouped as in dvc.yaml, with counts) and writes every stage's seconds as JSON.

With `--seeds`, runs the whole protocol once per seed, each in its own clone whose params.yaml sets the active
profile's `synth.seed` (a different generated dataset) and `train.seed` (initialisation, data order, dropout) to
it, and reports how much each finding's verdict and each table cell varies between the seeds: a table of verdicts
per seed, a table of top-1 errors per cell (per seed, mean, range), and the same as JSON.

    python benchmarks/protocol.py benchmarks/out/protocol.json
    python benchmarks/protocol.py out.json --keep /tmp/protocol-run     # keep the clone (data, runs, report)
    python benchmarks/protocol.py out.json --seeds 0 1 2                # three seeds, one after the other

The small profile (the default) is meant to take at most 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from vgg.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
BUDGET_S = 15 * 60  # issue 7: the small profile on 2 CPU cores


def run_demo(clone: Path) -> tuple[list[tuple[str, float]], float, float]:
    """Run `vgg demo` in `clone`; returns ([(stage, seconds)], dvc repro seconds, total seconds)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(clone)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    marks: list[tuple[str, float]] = []
    repro_end = None
    tail: list[str] = []  # for the error message
    with subprocess.Popen([str(bin_dir / "vgg"), "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            now = time.monotonic() - started
            match = STAGE_LINE.match(line)
            if match:
                marks.append((match.group(1), now))
            elif line.startswith("protocol (") and repro_end is None:  # vgg demo's line after dvc repro
                repro_end = now
            tail = (tail + [line])[-400:]
    total = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"error: vgg demo failed (exit {process.returncode}):\n{''.join(tail[-40:])}")
    end = repro_end if repro_end is not None else total
    stages = [(name, (marks[i + 1][1] if i + 1 < len(marks) else end) - at) for i, (name, at) in enumerate(marks)]
    return stages, end, total


def set_seed(params: Path, seed: int) -> str:
    """Set the active profile's `synth.seed` (where it generates its data) and `train.seed` to `seed` in the
    params file `params` (rewritten without its comments: it is a throw-away clone's); returns the profile name."""
    tree = yaml.safe_load(params.read_text())
    name = tree["profile"]
    profile = tree["profiles"][name]
    if profile.get("synth"):
        profile["synth"]["seed"] = seed
    profile["train"]["seed"] = seed
    params.write_text(yaml.safe_dump(tree, sort_keys=False))
    return name


def protocol_run(clone: Path, *, seed: int | None) -> dict[str, Any]:
    """Clone this repository's HEAD into `clone`, set the seed (None: as committed), run `vgg demo`; its stage
    times, totals, report and metrics."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    name = set_seed(clone / "params.yaml", seed) if seed is not None else yaml.safe_load(
        (clone / "params.yaml").read_text())["profile"]
    if seed is not None:  # dvc reads params.yaml from the work tree; committed, the clone stays clean for dvc
        subprocess.run(["git", "commit", "--quiet", "-m", f"seed {seed}", "params.yaml"], cwd=clone, check=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "benchmark", "GIT_AUTHOR_EMAIL": "benchmark@invalid",
                            "GIT_COMMITTER_NAME": "benchmark", "GIT_COMMITTER_EMAIL": "benchmark@invalid"})
    stages, repro_s, total_s = run_demo(clone)
    reports = clone / "reports" / name
    report = (reports / "report.md").read_text() if (reports / "report.md").is_file() else ""
    metrics = json.loads((reports / "metrics.json").read_text()) if (reports / "metrics.json").is_file() else {}
    return {"seed": seed, "profile": name, "stages": [{"stage": n, "seconds": s} for n, s in stages],
            "dvc_repro_s": repro_s, "total_s": total_s, "report": report, "metrics": metrics}


def variation(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the verdicts and the table cells vary over `runs` (each with `seed` and the report's `metrics`):
    per finding, its verdict per seed and how many seeds reproduce it; per cell (table, row), its top-1 error per
    seed, mean, min, max and sample standard deviation; per seed, the best cell's error and the count of findings
    reproduced and contradicted."""
    seeds = [run["seed"] for run in runs]
    names = sorted({name for run in runs for name in run["metrics"].get("findings", {})})
    findings = {}
    for name in names:
        verdicts = [run["metrics"].get("findings", {}).get(name, "not measured") for run in runs]
        findings[name] = {"verdicts": verdicts, "reproduced": verdicts.count("reproduced"),
                          "contradicted": verdicts.count("contradicted"), "same_every_seed": len(set(verdicts)) == 1}
    cells = {}
    tables = sorted({table for run in runs for table in run["metrics"] if table not in ("findings", "finding_tests")})
    for table in tables:
        rows = sorted({row for run in runs for row in run["metrics"].get(table, {})})
        for row in rows:
            errors = [run["metrics"].get(table, {}).get(row, {}).get("top1_err") for run in runs]
            known = [error for error in errors if error is not None]
            mean = sum(known) / len(known) if known else None
            spread = (sum((e - mean) ** 2 for e in known) / (len(known) - 1)) ** 0.5 if len(known) > 1 else None
            cells[f"{table} / {row}"] = {"top1_err": errors, "mean": mean, "min": min(known, default=None),
                                         "max": max(known, default=None), "std": spread}
    per_seed = []
    for run in runs:
        errors = [row["top1_err"] for table, rows in run["metrics"].items() if table not in ("findings", "finding_tests")
                  for row in rows.values()]
        verdicts = list(run["metrics"].get("findings", {}).values())
        per_seed.append({"seed": run["seed"], "best_top1_err": min(errors, default=None),
                         "reproduced": verdicts.count("reproduced"), "contradicted": verdicts.count("contradicted"),
                         "findings": len(verdicts), "total_s": run.get("total_s")})
    return {"seeds": seeds, "findings": findings, "cells": cells, "per_seed": per_seed}


def print_variation(summary: dict[str, Any]) -> None:
    seeds = summary["seeds"]
    print(f"\nfindings over seeds {', '.join(map(str, seeds))}")
    print(f"{'finding':<28} " + " ".join(f"{'seed ' + str(s):<16}" for s in seeds) + " reproduced")
    short = {"reproduced": "reproduced", "contradicted": "CONTRADICTED", "same direction, not significant": "same dir, n.s.",
             "not the paper's direction, not significant": "other dir, n.s.", "not measured": "not measured"}
    for name, row in summary["findings"].items():
        print(f"{name:<28} " + " ".join(f"{short.get(v, v):<16}" for v in row["verdicts"])
              + f" {row['reproduced']}/{len(seeds)}")
    print(f"\n{'cell (top-1 error %)':<44} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds)
          + f" {'mean':>6} {'range':>6} {'std':>5}")
    for cell, row in summary["cells"].items():
        values = " ".join(f"{v:>8.1f}" if v is not None else f"{'—':>8}" for v in row["top1_err"])
        if row["mean"] is None:
            print(f"{cell:<44} {values}")
            continue
        std = f"{row['std']:>5.1f}" if row["std"] is not None else f"{'—':>5}"
        print(f"{cell:<44} {values} {row['mean']:>6.1f} {row['max'] - row['min']:>6.1f} {std}")
    print(f"\n{'seed':>4} {'best top-1 %':>12} {'reproduced':>10} {'contradicted':>12} {'total s':>8}")
    for row in summary["per_seed"]:
        best = f"{row['best_top1_err']:>12.1f}" if row["best_top1_err"] is not None else f"{'—':>12}"
        total = f"{row['total_s']:>8.0f}" if row["total_s"] is not None else f"{'—':>8}"
        print(f"{row['seed']:>4} {best} {row['reproduced']:>7}/{row['findings']:<2} {row['contradicted']:>12} {total}")


def print_stages(stages: list[dict[str, Any]], repro_s: float, total_s: float) -> None:
    groups: dict[str, list[float]] = defaultdict(list)
    for stage in stages:
        groups[stage["stage"].split("@")[0]].append(stage["seconds"])
    print(f"{'stage':<20} {'runs':>4} {'total s':>8} {'per run s':>10}")
    for group, times in groups.items():
        print(f"{group:<20} {len(times):>4} {sum(times):>8.0f} {sum(times) / len(times):>10.1f}")
    print(f"{'dvc repro':<20} {len(stages):>4} {repro_s:>8.0f}")
    print(f"{'vgg demo (total)':<20} {'':>4} {total_s:>8.0f}   budget {BUDGET_S} s: "
          f"{'met' if total_s <= BUDGET_S else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--keep", type=Path, help="clone into this (new) directory and keep it (one per seed: "
                                                  "<keep>/seed-N with --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run the protocol once per seed (synth.seed = "
                                                             "train.seed = N) and report the variation")
    args = parser.parse_args()
    print(f"`vgg demo` on a fresh clone, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"benchmark": "protocol", "cpus": os.cpu_count(), "budget_s": BUDGET_S}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vgg-protocol-") as temp:
        base = args.keep or Path(temp)
        for seed in args.seeds or [None]:
            clone = (base / f"seed-{seed}") if args.seeds else (args.keep or Path(temp) / "repo")
            run = protocol_run(clone, seed=seed)
            runs.append(run)
            if args.seeds:
                print(f"\nseed {seed}:")
            print_stages(run["stages"], run["dvc_repro_s"], run["total_s"])
            if args.seeds:  # written after every seed: a long series interrupted keeps what it measured
                result.update(runs=runs, variation=variation(runs))
                write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    if args.seeds:
        print_variation(result["variation"])
    else:
        result.update({key: runs[0][key] for key in ("stages", "dvc_repro_s", "total_s", "report")})
        write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
