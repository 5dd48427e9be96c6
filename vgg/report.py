"""The paper's evaluation tables with our numbers beside the paper's, plots, and which findings we reproduce.

Input: a directory of posteriors files (`.npz`, `vgg.evaluate.results.Posteriors`), searched recursively. Each file's
meta says what it is (keys the evaluation writes; see `vgg.evaluate.posteriors`):
- `config`: "A", "A-LRN", "B", "C", "D", "E"; a fusion's `models` lists its configurations (["D", "E"]);
- `train_scale`: {"label", "s_min", "s_max", "kind": "low" | "high" | "jitter"} (`checkpoint_meta`, from the kind
  the checkpoint records); a file without it (e.g. torchvision's weights) is listed under "All results" but placed
  in no table;
- `mode`: "dense" | "multicrop" | "dense+multicrop";
- `scales`: the test scales Q (one → single-scale, several → multi-scale).
Rows line up with the paper's by scale KIND, not value: the small profile's S=40 sits beside the paper's
S=256 ("low"), S=56 beside 384 ("high"), [40;72] beside [256;512] ("jitter").

Output (`write_report`): `report.md`, `metrics.json` (our errors with their 95% intervals, per table and row, and
each finding's verdict with its paired tests) and PNG plots. Missing results show as "—" and the findings that
need them as "not measured", so a partial run (or a test) still gets a report.

A finding is judged by paired tests on the same validation images (`vgg.evaluate.statistics`), never by point
estimates alone: each of its comparisons by an exact McNemar test on per-image top-1 correctness, Holm-adjusted
within the finding. Verdicts: `reproduced` (at least one comparison significant at 5% in the paper's direction and
none against it), `contradicted` (one significant against it), `same direction, not significant` (more of the
images on which the two models disagree favour the paper's side, summed over the comparisons), `not the paper's
direction, not significant`, `not measured`. "LRN does not help" claims no difference, so it is judged by the 95%
interval of err(A) − err(A-LRN) against the margin `LRN_MARGIN`: `reproduced` when the interval lies below it (A is
not worse by that much), `contradicted` when it lies above 0 and reaches the margin (LRN helps, possibly by more).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vgg.config import SCALE_KINDS
from vgg.files import check_writable, write_atomic
from vgg.errors import DataError
from vgg.evaluate.metrics import top_k, top_k_correct
from vgg.evaluate.results import Posteriors
from vgg.evaluate.statistics import Paired, holm, mcnemar, paired_difference, wilson

MISSING = "—"
ALPHA = 0.05  # family-wise error rate of one finding's comparisons (Holm)
# "LRN does not help" (Table 3: A 29.6 vs A-LRN 29.7) is reproduced when A's top-1 error is, with 95% confidence,
# less than this many points above A-LRN's: half the smallest gain the paper draws a conclusion from (multiple
# test scales, Table 4 vs 3: 0.4-0.5 points for B, C-low and D-low... rounded up to 1 point, the resolution of a
# small profile's thousand images being coarser still).
LRN_MARGIN = 1.0
REPRODUCED, CONTRADICTED, MEASURED_NOTHING = "reproduced", "contradicted", "not measured"
SAME_WAY, OTHER_WAY = "same direction, not significant", "not the paper's direction, not significant"
KINDS = SCALE_KINDS
MODE_NAMES = {"dense": "dense", "multicrop": "multi-crop", "dense+multicrop": "dense + multi-crop"}
PAPER_S = {"low": "256", "high": "384", "jitter": "[256;512]"}  # §3.1 training scales
PAPER_Q = {  # §3.2 test scales: single Q = S or ½(Smin+Smax); multi {S−32, S, S+32} or {Smin, mid, Smax}
    ("single", "low"): "256",
    ("single", "high"): "384",
    ("single", "jitter"): "384",
    ("multi", "low"): "224,256,288",
    ("multi", "high"): "352,384,416",
    ("multi", "jitter"): "256,384,512",
}


@dataclass(frozen=True)
class Row:
    """One row of one of the paper's tables; `cell` is its key among the results."""

    table: str  # "table3" .. "table6"
    config: str  # "A" .. "E", or "D+E" for the fusion
    kind: str  # training scale kind: low / high / jitter
    mode: str  # dense / multicrop / dense+multicrop
    scales: str  # "single" or "multi"
    paper: tuple[float, float]  # the paper's (top-1, top-5) val error, %

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.scales, self.config, self.kind, self.mode)

    @property
    def name(self) -> str:
        """The row's key in metrics.json: `A/low` (tables 3, 4), `D/dense` (5), `D+E/dense` (6)."""
        return f"{self.config}/{self.kind}" if self.table in ("table3", "table4") else f"{self.config}/{self.mode}"


def _rows(
    table: str, scales: str, numbers: Mapping[tuple[str, str], tuple[float, float]], *, by_mode: bool
) -> list[Row]:
    return [
        Row(table, config, "jitter" if by_mode else key, key if by_mode else "dense", scales, paper)
        for (config, key), paper in numbers.items()
    ]


# The paper's numbers (val top-1 / top-5 error, %), from Tables 3–6, keyed by (config, scale kind or mode).
TABLE3 = _rows("table3", "single", {  # single test scale, dense
    ("A", "low"): (29.6, 10.4), ("A-LRN", "low"): (29.7, 10.5), ("B", "low"): (28.7, 9.9),
    ("C", "low"): (28.1, 9.4), ("C", "high"): (28.1, 9.3), ("C", "jitter"): (27.3, 8.8),
    ("D", "low"): (27.0, 8.8), ("D", "high"): (26.8, 8.7), ("D", "jitter"): (25.6, 8.1),
    ("E", "low"): (27.3, 9.0), ("E", "high"): (26.9, 8.7), ("E", "jitter"): (25.5, 8.0),
}, by_mode=False)  # fmt: skip
TABLE4 = _rows("table4", "multi", {  # multiple test scales, dense
    ("B", "low"): (28.2, 9.6),
    ("C", "low"): (27.7, 9.2), ("C", "high"): (27.8, 9.2), ("C", "jitter"): (26.3, 8.2),
    ("D", "low"): (26.6, 8.6), ("D", "high"): (26.5, 8.6), ("D", "jitter"): (24.8, 7.5),
    ("E", "low"): (26.9, 8.7), ("E", "high"): (26.7, 8.6), ("E", "jitter"): (24.8, 7.5),
}, by_mode=False)  # fmt: skip
TABLE5 = _rows("table5", "multi", {  # D and E, jittered S, multi-scale Q: evaluation modes
    ("D", "dense"): (24.8, 7.5), ("D", "multicrop"): (24.6, 7.5), ("D", "dense+multicrop"): (24.4, 7.2),
    ("E", "dense"): (24.8, 7.5), ("E", "multicrop"): (24.6, 7.4), ("E", "dense+multicrop"): (24.4, 7.1),
}, by_mode=True)  # fmt: skip
TABLE6 = _rows("table6", "multi", {  # fusion of the D and E of Table 5 (averaged posteriors)
    ("D+E", "dense"): (24.0, 7.1), ("D+E", "multicrop"): (23.9, 7.2), ("D+E", "dense+multicrop"): (23.7, 6.8),
}, by_mode=True)  # fmt: skip
TABLES: dict[str, tuple[str, list[Row]]] = {
    "table3": ("Table 3: single test scale (dense)", TABLE3),
    "table4": ("Table 4: multiple test scales (dense)", TABLE4),
    "table5": ("Table 5: dense vs multi-crop (D, E; jittered S; multiple Q)", TABLE5),
    "table6": ("Table 6: fusion of D and E (jittered S; multiple Q)", TABLE6),
}


@dataclass(frozen=True)
class Scored:
    """Per-image top-1 correctness of one model, images in sorted-key order; `images` names that set of images
    (paired tests compare models on the same images only)."""

    correct: np.ndarray = field(compare=False, repr=False)  # bool [N]
    images: str  # digest of the sorted image keys


@dataclass(frozen=True)
class Result:
    """One posteriors file, placed: its errors (with 95% intervals) and how it was made."""

    path: str
    config: str
    kind: str | None
    train_label: str
    mode: str
    scales: tuple[int, ...]
    top1_err: float
    top5_err: float
    top1_ci: tuple[float, float]
    top5_ci: tuple[float, float]
    scored: Scored
    model: str | None = None  # sha256 of the model file evaluated (meta `model_sha256`), when one model was

    @property
    def cell(self) -> tuple[str, str, str | None, str]:
        return ("multi" if len(self.scales) > 1 else "single", self.config, self.kind, self.mode)


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of a finding: the paper says `better` has the lower error."""

    text: str
    better_err: float  # top-1 error, %
    worse_err: float
    paired: Paired  # only_a: images only `better` gets right; only_b: only `worse`
    p_holm: float

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", self.text).strip("_")

    def describe(self) -> str:
        return (f"{self.text}: {self.better_err:.2f} vs {self.worse_err:.2f} ({self.paired.only_a} vs "
                f"{self.paired.only_b} images only one gets right, p_Holm {self.p_holm:.2g})")


@dataclass(frozen=True)
class Finding:
    name: str  # key in metrics.json
    claim: str  # the paper's finding, in words
    status: str  # one of the verdicts above
    detail: str  # our numbers and tests behind the verdict
    comparisons: tuple[Comparison, ...] = ()
    interval: tuple[float, float, float] | None = None  # LRN: err(A) − err(A-LRN), 95% interval, points


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    metrics: Path
    plots: tuple[Path, ...]
    placed: tuple[Result, ...] = ()  # the results the tables show


def write_report(results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> ReportPaths:
    """Read every posteriors file under `results_dir`; write report.md, metrics.json and plots to `out_dir`."""
    check_writable(out_dir, "--out")  # an unwritable or full location is one line before the results are read
    results, cells, notes = collect(results_dir)
    found = findings({cell: result.scored for cell, result in cells.items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = (
        write_atomic(out / "errors_by_config.png", _plot_configs(cells)),
        write_atomic(out / "evaluation_modes.png", _plot_rows(cells, TABLE5, "Table 5: evaluation modes (D, E)")),
        write_atomic(out / "fusion.png", _plot_fusion(cells)),
    )
    metrics = write_atomic(out / "metrics.json", (json.dumps(_metrics(cells, found), indent=2) + "\n").encode())
    markdown = write_atomic(out / "report.md", _markdown(results, cells, found, notes, plots).encode())
    return ReportPaths(markdown=markdown, metrics=metrics, plots=plots, placed=tuple(cells.values()))


def collect(results_dir: str | os.PathLike[str]) -> tuple[list[Result], dict[tuple, Result], list[str]]:
    """Every posteriors file under `results_dir` with its errors; the table cells they fill; notes on files
    that fill no cell (no training scale: e.g. torchvision's weights) or repeat a cell."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"{root}: results directory not found; run `vgg evaluate` (and `vgg fuse`) into it first")
    loaded = []
    for path in sorted(root.rglob("*.npz")):
        posteriors = Posteriors.load(path)
        loaded.append((path, posteriors.meta, _scale(path, posteriors.meta), _correct(posteriors)))
    results: list[Result] = []
    cells: dict[tuple, Result] = {}
    notes: list[str] = []
    for path, meta, scale, (scored, correct5) in loaded:
        count, wrong1, wrong5 = scored.correct.size, int((~scored.correct).sum()), int((~correct5).sum())
        kind = None if scale is None else scale["kind"]
        models = meta.get("models", [])
        result = Result(
            path=str(path.relative_to(root)),
            config="+".join(sorted(models)) if len(models) > 1 else _require(path, meta, "config"),
            kind=kind,
            train_label=MISSING if scale is None else str(scale.get("label", scale["s_min"])),
            mode=_require(path, meta, "mode"),
            scales=tuple(int(q) for q in _require(path, meta, "scales")),
            top1_err=100.0 * wrong1 / count,
            top5_err=100.0 * wrong5 / count,
            top1_ci=wilson(wrong1, count),
            top5_ci=wilson(wrong5, count),
            scored=scored,
            model=meta.get("model_sha256"),
        )
        results.append(result)
        if kind is None:
            notes.append(f"`{result.path}` is in no table: its meta has no train_scale (the S it was trained at)")
        elif result.cell in cells:
            notes.append(f"`{result.path}` repeats the table cell of `{cells[result.cell].path}`, which is shown")
        else:
            cells[result.cell] = result
    return results, cells, notes


def findings(cells: Mapping[tuple[str, str, str | None, str], Scored]) -> list[Finding]:
    """The paper's findings, judged by paired tests on per-image top-1 correctness (see the module's docstring)."""

    def top1(scales: str, config: str, kind: str, mode: str = "dense") -> Scored | None:
        return cells.get((scales, config, kind, mode))

    def judge(name: str, claim: str, pairs: list[tuple[str, Scored | None, Scored | None]]) -> Finding:
        """Each pair: (text, better, worse) — the paper's way when `better` has the lower error."""
        measured = [(text, a, b) for text, a, b in pairs if a is not None and b is not None]
        unpaired = [text for text, a, b in measured if a.images != b.images]
        measured = [(text, a, b) for text, a, b in measured if a.images == b.images]
        if not measured:
            why = "different validation images" if unpaired else "missing results"
            return Finding(name, claim, MEASURED_NOTHING, f"{why} for every comparison")
        tests = [mcnemar(a.correct, b.correct) for _, a, b in measured]
        adjusted = holm([test.p for test in tests])
        comparisons = tuple(
            Comparison(text, _error(a), _error(b), test, p) for (text, a, b), test, p in zip(measured, tests, adjusted)
        )
        significant = [c for c in comparisons if c.p_holm < ALPHA and c.paired.only_a != c.paired.only_b]
        if any(c.paired.only_a < c.paired.only_b for c in significant):
            status = CONTRADICTED
        elif significant:
            status = REPRODUCED
        else:
            lean = sum(c.paired.only_a - c.paired.only_b for c in comparisons)
            status = SAME_WAY if lean > 0 else OTHER_WAY
        detail = "; ".join(c.describe() for c in comparisons)
        if len(measured) < len(pairs):
            detail += f" ({len(pairs) - len(measured)} comparison(s) not measured)"
        return Finding(name, claim, status, detail, comparisons)

    def no_lrn_gain(a: Scored | None, lrn: Scored | None) -> Finding:
        name, claim = "lrn_does_not_help", "LRN does not improve A (Table 3: A-LRN vs A)"
        if a is None or lrn is None or a.images != lrn.images:
            return Finding(name, claim, MEASURED_NOTHING, "A or A-LRN (S low, single Q) not measured on the same images")
        interval = paired_difference(a.correct, lrn.correct)
        difference, low, high = interval
        if high < LRN_MARGIN:
            status = REPRODUCED
        elif low > 0:
            status = CONTRADICTED
        else:
            status = SAME_WAY if difference <= 0 else OTHER_WAY
        detail = (f"err(A) − err(A-LRN) = {difference:+.2f} points, 95% interval [{low:+.2f}, {high:+.2f}], margin "
                  f"{LRN_MARGIN:g} ({_error(a):.2f} vs {_error(lrn):.2f})")
        return Finding(name, claim, status, detail, interval=interval)

    kinds_cde = [(config, kind) for config in "CDE" for kind in KINDS]
    return [
        no_lrn_gain(top1("single", "A", "low"), top1("single", "A-LRN", "low")),
        judge("depth_helps", "Error decreases with depth A → B → D/E (Table 3, S low)", [
            ("B vs A", top1("single", "B", "low"), top1("single", "A", "low")),
            ("D vs B", top1("single", "D", "low"), top1("single", "B", "low")),
            ("E vs B", top1("single", "E", "low"), top1("single", "B", "low")),
        ]),
        judge("conv3_beats_conv1", "3×3 convs (D) beat 1×1 convs (C) at equal depth (Table 3)", [
            (f"D vs C, S {kind}", top1("single", "D", kind), top1("single", "C", kind)) for kind in KINDS
        ]),
        judge("scale_jitter_helps", "Training scale jittering beats fixed S (Table 3, C/D/E)", [
            (f"{config} jitter vs {kind}", top1("single", config, "jitter"), top1("single", config, kind))
            for config in "CDE" for kind in ("low", "high")
        ]),
        judge("multi_scale_test_helps", "Multiple test scales beat a single one (Table 4 vs 3)", [
            (f"{config}/{kind} multi vs single Q", top1("multi", config, kind), top1("single", config, kind))
            for config, kind in [("B", "low"), *kinds_cde]
        ]),
        judge("dense_plus_multicrop_best", "Dense + multi-crop beats either alone (Table 5, D/E)", [
            (f"{config} both vs {MODE_NAMES[mode]}", top1("multi", config, "jitter", "dense+multicrop"),
             top1("multi", config, "jitter", mode))
            for config in "DE" for mode in ("dense", "multicrop")
        ]),
        judge("fusion_helps", "Fusing D and E beats each alone (Table 6 vs Table 5)", [
            (f"D+E vs {config}, {MODE_NAMES[mode]}", top1("multi", "D+E", "jitter", mode),
             top1("multi", config, "jitter", mode))
            for mode in ("dense", "multicrop", "dense+multicrop") for config in "DE"
        ]),
    ]  # fmt: skip


def paper_cells() -> dict[tuple[str, str, str, str], tuple[float, float]]:
    """The paper's own numbers as cells, e.g. to check that `findings` holds on them."""
    return {row.cell: row.paper for _, rows in TABLES.values() for row in rows}


def _error(scored: Scored) -> float:
    return 100.0 * np.count_nonzero(~scored.correct) / scored.correct.size


def _correct(posteriors: Posteriors) -> tuple[Scored, np.ndarray]:
    """Per-image top-1 (as `Scored`) and top-5 correctness, images in sorted-key order."""
    order = np.argsort(np.asarray(posteriors.keys))
    one, five = top_k(posteriors)
    images = hashlib.sha256("\0".join(sorted(posteriors.keys)).encode()).hexdigest()[:16]
    correct1 = top_k_correct(posteriors.probs, posteriors.labels, one)[order]
    return Scored(correct1, images), top_k_correct(posteriors.probs, posteriors.labels, five)[order]


def _scale(path: Path, meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    scale = meta.get("train_scale")
    if scale is not None and (not isinstance(scale, Mapping) or "s_min" not in scale or "s_max" not in scale):
        raise DataError(f"{path}: meta train_scale must be {{'label', 's_min', 's_max', 'kind'}}, got {scale!r}")
    if scale is not None and scale.get("kind") not in KINDS:
        raise DataError(f"{path}: meta train_scale.kind is {scale.get('kind')!r}; expected one of {', '.join(KINDS)}: "
                        "re-create it with `vgg evaluate`")
    return scale


def _require(path: Path, meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise DataError(f"{path}: meta has no {key!r}; re-create it with `vgg evaluate` (or `vgg fuse`)")
    return meta[key]


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _interval(bounds: tuple[float, float] | None) -> str:
    return MISSING if bounds is None else f"{bounds[0]:.1f}–{bounds[1]:.1f}"


def _images(cells: Mapping[tuple, Result]) -> str:
    counts = sorted({result.scored.correct.size for result in cells.values()})
    return "–".join(f"{count:,}" for count in counts) if counts else MISSING


def _metrics(cells: Mapping[tuple, Result], found: Sequence[Finding]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for table, (_, rows) in TABLES.items():
        metrics[table] = {row.name: _row_metrics(cells[row.cell]) for row in rows if row.cell in cells}
    metrics["findings"] = {finding.name: finding.status for finding in found}
    metrics["finding_tests"] = {finding.name: _finding_metrics(finding) for finding in found}
    return metrics


def _row_metrics(result: Result) -> dict[str, float]:
    return {"top1_err": round(result.top1_err, 4), "top5_err": round(result.top5_err, 4),
            "top1_ci_low": round(result.top1_ci[0], 4), "top1_ci_high": round(result.top1_ci[1], 4),
            "top5_ci_low": round(result.top5_ci[0], 4), "top5_ci_high": round(result.top5_ci[1], 4),
            "images": result.scored.correct.size}


def _finding_metrics(finding: Finding) -> dict[str, Any]:
    numbers: dict[str, Any] = {"verdict": finding.status}
    if finding.interval is not None:
        numbers.update(zip(("difference", "ci_low", "ci_high"), (round(v, 4) for v in finding.interval)),
                       margin=LRN_MARGIN)
    for comparison in finding.comparisons:
        numbers[comparison.key] = {"difference": round(comparison.worse_err - comparison.better_err, 4),
                                   "only_better": comparison.paired.only_a, "only_worse": comparison.paired.only_b,
                                   "p": comparison.paired.p, "p_holm": comparison.p_holm}
    return numbers


def _markdown(
    results: Sequence[Result],
    cells: Mapping[tuple, Result],
    found: Sequence[Finding],
    notes: Sequence[str],
    plots: Sequence[Path],
) -> str:
    lines = [
        "# VGG reproduction: evaluation report",
        "",
        "Top-1 / top-5 validation error in percent, ours beside the paper's (Simonyan & Zisserman, ICLR 2015).",
        "Rows match the paper's by training-scale kind: low ↔ S=256, high ↔ S=384, jitter ↔ S=[256;512];",
        f"our S and Q are those of this run's profile. {MISSING} = not evaluated. Ours carry their 95% interval",
        f"(Wilson) over {_images(cells)} validation images; the paper's are over 50,000.",
        "",
    ]
    for table, (title, rows) in TABLES.items():
        by_mode = table in ("table5", "table6")
        lines += [f"## {title}", ""]
        head = ["Config", "Eval" if by_mode else "S kind", "Our S", "Our Q", "Paper S", "Paper Q"]
        lines += _table_head([*head, "Top-1 ours", "95% CI", "Top-1 paper", "Top-5 ours", "95% CI", "Top-5 paper"])
        for row in rows:
            ours = cells.get(row.cell)
            lines.append(
                "| "
                + " | ".join(
                    [
                        row.config,
                        MODE_NAMES[row.mode] if by_mode else row.kind,
                        ours.train_label if ours else MISSING,
                        ",".join(map(str, ours.scales)) if ours else MISSING,
                        PAPER_S[row.kind],
                        PAPER_Q[(row.scales, row.kind)],
                        _number(ours.top1_err if ours else None),
                        _interval(ours.top1_ci if ours else None),
                        _number(row.paper[0]),
                        _number(ours.top5_err if ours else None),
                        _interval(ours.top5_ci if ours else None),
                        _number(row.paper[1]),
                    ]
                )
                + " |"
            )
        lines.append("")
    lines += [
        "## Findings",
        "",
        "Judged on top-1 error by paired tests on the same images: each comparison by an exact McNemar test (the",
        "images only one of the two models gets right), Holm-adjusted within the finding at 5%. `reproduced`: at",
        "least one comparison significant in the paper's direction and none against; `contradicted`: one",
        "significant against; otherwise the direction most of those images favour, not significant.",
        "\"LRN does not help\" claims no difference: reproduced when the 95% interval of err(A) − err(A-LRN) lies",
        f"below {LRN_MARGIN:g} point (the margin).",
        "",
    ]
    counts = {status: sum(f.status == status for f in found) for status in dict.fromkeys(f.status for f in found)}
    lines += ["Verdicts: " + ", ".join(f"{count} {status}" for status, count in counts.items()) + ".", ""]
    for finding in found:
        lines.append(f"- **{finding.claim}** — {finding.status}. {finding.detail}.")
    lines += ["", "## Plots", ""]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    lines += ["", "## All results", ""]
    lines += _table_head(["File", "Config", "Train S", "Mode", "Q", "Top-1", "Top-5"])
    for r in results:
        q = ",".join(map(str, r.scales))
        row = [r.path, r.config, r.train_label, r.mode, q, f"{r.top1_err:.2f}", f"{r.top5_err:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    if not results:
        lines.append(f"| {MISSING} | | | | | | |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _table_head(columns: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]


def _bars(axes: Any, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str) -> None:
    width = 0.8 / max(len(series), 1)
    tallest = max((v for values in series.values() for v in values if v is not None), default=1.0)
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = axes.bar(positions, [float("nan") if v is None else v for v in values], width, label=name)
        texts = ["" if v is None else f"{v:.1f}" for v in values]  # the values: differences are small vs the bars
        axes.bar_label(bars, texts, fontsize=6, rotation=90, padding=2)
    axes.set_ylim(0, tallest * 1.3)  # room for the value labels and the legend above the bars
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_ylabel("top-1 error (%)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper right", ncols=len(series))


def _ours(cells: Mapping[tuple, Result], row: Row) -> float | None:
    result = cells.get(row.cell)
    return None if result is None else result.top1_err


def _figure(draw: Any) -> bytes:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ours, paper = figure.subplots(1, 2)
    draw(ours, paper)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plot_configs(cells: Mapping[tuple, Result]) -> bytes:
    """Error by configuration and training scale: single vs multiple test scales (Tables 3, 4)."""
    multi = {(row.config, row.kind): row for row in TABLE4}
    labels = [f"{row.config}/{row.kind}" for row in TABLE3]

    def draw(ours: Any, paper: Any) -> None:
        for axes, source, value in ((ours, "ours", _ours), (paper, "paper", lambda _, row: row.paper[0])):
            series = {
                "single Q": [value(cells, row) for row in TABLE3],
                "multi Q": [
                    value(cells, multi[(row.config, row.kind)]) if (row.config, row.kind) in multi else None
                    for row in TABLE3
                ],
            }
            _bars(axes, labels, series, f"Tables 3–4 ({source}): error by configuration and S")

    return _figure(draw)


def _plot_rows(cells: Mapping[tuple, Result], rows: Sequence[Row], title: str) -> bytes:
    """Dense vs multi-crop vs both, per configuration (Table 5)."""
    configs = list(dict.fromkeys(row.config for row in rows))
    by = {(row.config, row.mode): row for row in rows}

    def draw(ours: Any, paper: Any) -> None:
        for axes, source, value in ((ours, "ours", _ours), (paper, "paper", lambda _, row: row.paper[0])):
            series = {MODE_NAMES[mode]: [value(cells, by[(c, mode)]) for c in configs] for mode in MODE_NAMES}
            _bars(axes, configs, series, f"{title} ({source})")

    return _figure(draw)


def _plot_fusion(cells: Mapping[tuple, Result]) -> bytes:
    """Fusion D+E vs the single models, per evaluation mode (Tables 5, 6)."""
    return _plot_rows(cells, [*TABLE5, *TABLE6], "Table 6: D+E fusion vs single models")
