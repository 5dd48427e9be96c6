"""Does a short model-based search find the lr a dense grid finds? (issue 22's goal)

On one profile (default: small) and one training stage (default: A from scratch at S = `scales.low`), two searches
over the same log lr range, each trial the same number of epochs on the same data and seed:
- the search: `vgg tune`'s TPE searcher (Optuna, seeded) with `--trials` trials, trials in parallel and ASHA
  stopping the weak ones at epoch 1;
- the oracle: a dense grid of `--grid` lr values evenly spaced in log lr over the range (both ends), every point
  run to the end (no early stopping).
Each lr is scored by its best epoch's val top-1 error (%). The question: is the search's best lr within 2x of the
grid's best (|log2 ratio| <= 1)? The grid's spacing is the resolution of the answer, so the script also gives the
lrs whose error is within 1 point of the grid's best: where the error curve is that flat, "within 2x" says little.

Both searches run in this process against the Ray cluster in RAY_ADDRESS (or a local one); nothing is tracked in
MLflow. Without --shards, the profile's data is generated and ingested under the output's folder first.

    python benchmarks/tune.py benchmarks/out/tune.json                    # small profile: 12 trials vs 9-point grid
    python benchmarks/tune.py out.json --profile tiny --params p.yaml --trials 3 --grid 3 --max-epochs 1   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from pipelines.params import load_profile  # noqa: E402
from pipelines.ray_tune import tune  # noqa: E402
from vgg.files import write_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON results (a Markdown table is printed)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--profile", default="small")
    parser.add_argument("--config", default="A")
    parser.add_argument("--scale", default="low")
    parser.add_argument("--shards", type=Path, default=None, help="ingested shards (default: generate them)")
    parser.add_argument("--lr-range", type=float, nargs=2, default=(1e-3, 1e-1))
    parser.add_argument("--trials", type=int, default=12, help="trials of the TPE search")
    parser.add_argument("--grid", type=int, default=9, help="lr values of the grid")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=3600.0, help="seconds per search")
    args = parser.parse_args(argv)

    profile = load_profile(args.params, profile=args.profile)
    work = args.out.parent / f"{args.out.stem}-work"
    shards = args.shards or _data(profile, work)
    common = dict(config=args.config, scale_key=args.scale, shards=shards, lr_range=tuple(args.lr_range),
                  max_epochs=args.max_epochs, time_budget_s=args.time_budget, track=False)
    runs = {}
    for name, searcher, trials in (("search", "tpe", args.trials), ("grid", "grid", args.grid)):
        started = time.monotonic()
        rows = tune(profile, searcher=searcher, trials=trials, storage=(work / "ray").absolute(),
                    out=work / f"{name}.yaml", **common)
        runs[name] = {"searcher": searcher, "trials": trials, "wall_s": round(time.monotonic() - started, 1),
                      "rows": [dataclasses.asdict(row) for row in rows]}

    usable = {name: [row for row in run["rows"] if row["outcome"] != "diverged" and not math.isnan(row["top1_err"])]
              for name, run in runs.items()}
    best = {name: min(rows, key=lambda row: row["top1_err"]) for name, rows in usable.items()}
    ratio = best["search"]["lr"] / best["grid"]["lr"]
    flat = sorted(row["lr"] for row in usable["grid"] if row["top1_err"] <= best["grid"]["top1_err"] + 1.0)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "python": platform.python_version()},
        "profile": profile.name, "config": args.config, "scale": args.scale, "lr_range": list(args.lr_range),
        "max_epochs": args.max_epochs, "runs": runs,
        "best": {name: {"lr": row["lr"], "top1_err": row["top1_err"]} for name, row in best.items()},
        "lr_ratio": ratio, "within_2x": abs(math.log2(ratio)) <= 1.0,
        "grid_lrs_within_1_point_of_best": flat,
        "search_epochs": sum(row["epochs"] for row in runs["search"]["rows"]),
        "grid_epochs": sum(row["epochs"] for row in runs["grid"]["rows"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(_markdown(result))
    return 0


def _data(profile, work: Path) -> Path:
    """The profile's generated dataset, ingested (once: reused when its index exists)."""
    from vgg.data.ingest import ingest
    from vgg.data.synthetic import synthesize

    shards = work / "shards"
    if not (shards / "index.json").is_file():
        synthesize(work / "raw", profile.synth, workers=1)
        ingest(work / "raw", shards, max_side=profile.data.max_side, shard_size=profile.data.shard_size, workers=1)
    return shards.absolute()


def _markdown(result: dict) -> str:
    lines = ["| run | trials | epochs trained | wall s | best lr | best top-1 err % |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("search", "grid"):
        run, best = result["runs"][name], result["best"][name]
        epochs = result[f"{name}_epochs"]
        lines.append(f"| {name} ({run['searcher']}) | {run['trials']} | {epochs} | {run['wall_s']:.0f} | "
                     f"{best['lr']:.3g} | {best['top1_err']:.2f} |")
    lines.append("")
    lines.append("grid: " + ", ".join(f"{row['lr']:.3g} → {row['top1_err']:.1f} %"
                                      for row in sorted(result["runs"]["grid"]["rows"], key=lambda row: row["lr"])))
    lines.append("search: " + ", ".join(f"{row['lr']:.3g} → {row['top1_err']:.1f} % ({row['outcome']}, "
                                        f"{row['epochs']} ep)" for row in result["runs"]["search"]["rows"]))
    flat = result["grid_lrs_within_1_point_of_best"]
    lines.append(f"search/grid best lr ratio {result['lr_ratio']:.2f} -> within 2x: {result['within_2x']}; grid lrs "
                 f"within 1 point of its best: {min(flat):.3g}..{max(flat):.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
