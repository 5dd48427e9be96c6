"""The paper's evaluation tables with our numbers beside the paper's, plots, and which findings we reproduce.

Input: a directory of posteriors files (`.npz`, `vgg.evaluate.results.Posteriors`), searched recursively. Each file's
meta says what it is (keys the evaluation writes; see `vgg.evaluate.posteriors`):
- `config`: "A", "A-LRN", "B", "C", "D", "E"; a fusion's `models` lists its configurations (["D", "E"]);
- `train_scale`: {"label", "s_min", "s_max", optional "kind": "low" | "high" | "jitter"} (`checkpoint_meta`);
  a file without it (e.g. torchvision's weights) is listed under "All results" but placed in no table;
- `mode`: "dense" | "multicrop" | "dense+multicrop";
- `scales`: the test scales Q (one → single-scale, several → multi-scale).
Rows line up with the paper's by scale KIND, not value: the small profile's S=40 sits beside the paper's
S=256 ("low"), S=56 beside 384 ("high"), [40;72] beside [256;512] ("jitter"). Without `kind`, a jittered S
is "jitter", the smallest fixed S among the results "low", any larger fixed S "high".

Output (`write_report`): `report.md`, `metrics.json` (our errors, per table and row, plus the findings) and
PNG plots. Missing results show as "—" and the findings that need them as "not measured", so a partial run
(or a test) still gets a report.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vgg.files import write_atomic
from vgg.errors import DataError
from vgg.evaluate.metrics import errors
from vgg.evaluate.results import Posteriors

MISSING = "—"
KINDS = ("low", "high", "jitter")
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
class Result:
    """One posteriors file, placed: its errors and how it was made."""

    path: str
    config: str
    kind: str | None
    train_label: str
    mode: str
    scales: tuple[int, ...]
    top1_err: float
    top5_err: float

    @property
    def cell(self) -> tuple[str, str, str | None, str]:
        return ("multi" if len(self.scales) > 1 else "single", self.config, self.kind, self.mode)


@dataclass(frozen=True)
class Finding:
    name: str  # key in metrics.json
    claim: str  # the paper's finding, in words
    status: str  # "reproduced" / "not reproduced" / "not measured"
    detail: str  # our numbers (and the paper's) behind the status


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    metrics: Path
    plots: tuple[Path, ...]


def write_report(results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> ReportPaths:
    """Read every posteriors file under `results_dir`; write report.md, metrics.json and plots to `out_dir`."""
    results, cells, notes = collect(results_dir)
    found = findings({cell: (r.top1_err, r.top5_err) for cell, r in cells.items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = (
        write_atomic(out / "errors_by_config.png", _plot_configs(cells)),
        write_atomic(out / "evaluation_modes.png", _plot_rows(cells, TABLE5, "Table 5: evaluation modes (D, E)")),
        write_atomic(out / "fusion.png", _plot_fusion(cells)),
    )
    metrics = write_atomic(out / "metrics.json", (json.dumps(_metrics(cells, found), indent=2) + "\n").encode())
    markdown = write_atomic(out / "report.md", _markdown(results, cells, found, notes, plots).encode())
    return ReportPaths(markdown=markdown, metrics=metrics, plots=plots)


def collect(results_dir: str | os.PathLike[str]) -> tuple[list[Result], dict[tuple, Result], list[str]]:
    """Every posteriors file under `results_dir` with its errors; the table cells they fill; notes on files
    that fill no cell (no training scale: e.g. torchvision's weights) or repeat a cell."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"{root}: results directory not found; run `vgg evaluate` (and `vgg fuse`) into it first")
    loaded = []
    for path in sorted(root.rglob("*.npz")):
        posteriors = Posteriors.load(path)
        loaded.append((path, posteriors.meta, _scale(path, posteriors.meta), errors(posteriors)))
    fixed = sorted(scale["s_min"] for _, _, scale, _ in loaded if scale is not None and _is_fixed(scale))
    results: list[Result] = []
    cells: dict[tuple, Result] = {}
    notes: list[str] = []
    for path, meta, scale, errs in loaded:
        kind = None
        if scale is not None:
            kind = scale.get("kind") or (
                "jitter" if not _is_fixed(scale) else "low" if scale["s_min"] == fixed[0] else "high"
            )
            if kind not in KINDS:
                raise DataError(f"{path}: meta train_scale.kind is {kind!r}; expected one of {', '.join(KINDS)}")
        models = meta.get("models", [])
        result = Result(
            path=str(path.relative_to(root)),
            config="+".join(sorted(models)) if len(models) > 1 else _require(path, meta, "config"),
            kind=kind,
            train_label=MISSING if scale is None else str(scale.get("label", scale["s_min"])),
            mode=_require(path, meta, "mode"),
            scales=tuple(int(q) for q in _require(path, meta, "scales")),
            top1_err=errs["top1_err"],
            top5_err=errs["top5_err"],
        )
        results.append(result)
        if kind is None:
            notes.append(f"`{result.path}` is in no table: its meta has no train_scale (the S it was trained at)")
        elif result.cell in cells:
            notes.append(f"`{result.path}` repeats the table cell of `{cells[result.cell].path}`, which is shown")
        else:
            cells[result.cell] = result
    return results, cells, notes


def findings(cells: Mapping[tuple[str, str, str | None, str], tuple[float, float]]) -> list[Finding]:
    """The paper's findings, judged on top-1 error from `cells` ((scales, config, kind, mode) → (top-1, top-5)).

    A finding is "reproduced" when every comparison it rests on goes the paper's way on our numbers,
    "not reproduced" when at least one does not, "not measured" when a needed number is missing.
    """

    def top1(scales: str, config: str, kind: str, mode: str = "dense") -> float | None:
        value = cells.get((scales, config, kind, mode))
        return None if value is None else value[0]

    def judge(name: str, claim: str, comparisons: list[tuple[str, float | None, float | None]]) -> Finding:
        """Each comparison: (text, better, worse) — holds when better < worse (lower error)."""
        measured = [(text, a, b) for text, a, b in comparisons if a is not None and b is not None]
        if not measured:
            return Finding(name, claim, "not measured", "missing results for every comparison")
        held = [a < b for _, a, b in measured]
        detail = "; ".join(
            f"{text}: {a:.2f} {'<' if ok else '≥'} {b:.2f}" for (text, a, b), ok in zip(measured, held)
        )
        if len(measured) < len(comparisons):
            detail += f" ({len(comparisons) - len(measured)} comparison(s) not measured)"
        return Finding(name, claim, "reproduced" if all(held) else "not reproduced", detail)

    kinds_cde = [(config, kind) for config in "CDE" for kind in KINDS]
    return [
        judge("lrn_does_not_help", "LRN does not improve A (Table 3: A-LRN vs A)", [
            # "does not help": A without LRN is at least as good; compare A ≤ A-LRN via A < A-LRN + ε.
            ("A (no LRN) vs A-LRN, S low", top1("single", "A", "low"), _plus(top1("single", "A-LRN", "low"), 1e-9)),
        ]),
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


def _plus(value: float | None, epsilon: float) -> float | None:
    return None if value is None else value + epsilon


def _scale(path: Path, meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    scale = meta.get("train_scale")
    if scale is not None and (not isinstance(scale, Mapping) or "s_min" not in scale or "s_max" not in scale):
        raise DataError(f"{path}: meta train_scale must be {{'label', 's_min', 's_max'}}, got {scale!r}")
    return scale


def _is_fixed(scale: Mapping[str, Any]) -> bool:
    kind = scale.get("kind")
    return kind in ("low", "high") if kind else scale["s_min"] == scale["s_max"]


def _require(path: Path, meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise DataError(f"{path}: meta has no {key!r}; re-create it with `vgg evaluate` (or `vgg fuse`)")
    return meta[key]


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _metrics(cells: Mapping[tuple, Result], found: Sequence[Finding]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for table, (_, rows) in TABLES.items():
        metrics[table] = {
            row.name: {"top1_err": round(cells[row.cell].top1_err, 4), "top5_err": round(cells[row.cell].top5_err, 4)}
            for row in rows
            if row.cell in cells
        }
    metrics["findings"] = {finding.name: finding.status for finding in found}
    return metrics


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
        f"our S and Q are those of this run's profile. {MISSING} = not evaluated.",
        "",
    ]
    for table, (title, rows) in TABLES.items():
        by_mode = table in ("table5", "table6")
        lines += [f"## {title}", ""]
        head = ["Config", "Eval" if by_mode else "S kind", "Our S", "Our Q", "Paper S", "Paper Q"]
        lines += _table_head([*head, "Top-1 ours", "Top-1 paper", "Top-5 ours", "Top-5 paper"])
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
                        _number(row.paper[0]),
                        _number(ours.top5_err if ours else None),
                        _number(row.paper[1]),
                    ]
                )
                + " |"
            )
        lines.append("")
    lines += ["## Findings", "", "Judged on top-1 error: reproduced when every comparison goes the paper's way.", ""]
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
