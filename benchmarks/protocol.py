"""Wall time per stage of the whole protocol (`vgg demo` = `dvc repro` + the report) on a fresh clone.

Clones this repository's HEAD into a temporary directory (nothing generated there is kept, nothing here is
touched), runs `vgg demo` in it with this environment's `vgg`, and timestamps each `Running stage '...'` line of
`dvc repro`: a stage's time runs from its line to the next one (the last stage's to the end of `dvc repro`).
Prints a table (stages grouped as in dvc.yaml, with counts) and writes every stage's seconds as JSON.

    python benchmarks/protocol.py benchmarks/out/protocol.json
    python benchmarks/protocol.py out.json --keep /tmp/protocol-run     # keep the clone (data, runs, report)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--keep", type=Path, help="clone into this (new) directory and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vgg-protocol-") as temp:
        clone = args.keep or Path(temp) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        stages, repro_s, total_s = run_demo(clone)
        report = (clone / "reports" / "small" / "report.md").read_text() if (clone / "reports" / "small").is_dir() else ""

    groups: dict[str, list[float]] = defaultdict(list)
    for name, seconds in stages:
        groups[name.split("@")[0]].append(seconds)
    print(f"`vgg demo` on a fresh clone, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"{'stage':<20} {'runs':>4} {'total s':>8} {'per run s':>10}")
    for group, times in groups.items():
        print(f"{group:<20} {len(times):>4} {sum(times):>8.0f} {sum(times) / len(times):>10.1f}")
    print(f"{'dvc repro':<20} {len(stages):>4} {repro_s:>8.0f}")
    print(f"{'vgg demo (total)':<20} {'':>4} {total_s:>8.0f}   budget {BUDGET_S} s: "
          f"{'met' if total_s <= BUDGET_S else 'NOT met'}")
    result = {"benchmark": "protocol", "cpus": os.cpu_count(), "stages": [{"stage": n, "seconds": s} for n, s in stages],
              "dvc_repro_s": repro_s, "total_s": total_s, "budget_s": BUDGET_S, "report": report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
