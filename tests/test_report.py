"""The report: the paper's tables filled from saved posteriors (ours beside the paper's), findings, plots, JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vgg.errors import DataError
from vgg.evaluate.metrics import errors
from vgg.evaluate.results import Posteriors, fuse
from vgg.report import TABLE3, TABLE4, TABLE5, TABLE6, findings, paper_cells, write_report

COUNT, CLASSES = 1000, 10  # 1000 images: an error of 29.6 % is exactly 296 of them
# The small profile's training scales (S=40 / 56 / [40;72]) and test scales (Q offset 8).
SCALES = {
    "low": ({"label": "40", "s_min": 40, "s_max": 40}, [40], [32, 40, 48]),
    "high": ({"label": "56", "s_min": 56, "s_max": 56}, [56], [48, 56, 64]),
    "jitter": ({"label": "40-72", "s_min": 40, "s_max": 72}, [56], [40, 56, 72]),
}
# Our fake errors are the paper's shifted by these (so the two columns differ but every finding holds).
SHIFT1, SHIFT5 = 10.0, 5.0


def fake_posteriors(top1: float, top5: float, meta: dict, *, seed: int = 0) -> Posteriors:
    """Posteriors whose top-1 / top-5 errors are exactly `top1` / `top5` percent of COUNT images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, COUNT)
    miss5, miss1 = round(top5 * COUNT / 100), round(top1 * COUNT / 100)
    values = np.linspace(0.3, 0.01, CLASSES)  # distinct, descending: position = rank
    probs = np.zeros((COUNT, CLASSES), dtype=np.float32)
    for i, label in enumerate(labels):
        rank = 5 if i < miss5 else 1 if i < miss1 else 0  # 6th place, 2nd place, 1st place
        others = [c for c in rng.permutation(CLASSES) if c != label]
        order = others[:rank] + [label] + others[rank:]
        probs[i, order] = values
    probs /= probs.sum(axis=1, keepdims=True)
    return Posteriors(keys=[f"img{i:04d}" for i in range(COUNT)], labels=labels, probs=probs, meta=meta)


def meta_for(row, *, with_kind: bool) -> dict:
    scale, single, multi = SCALES[row.kind]
    train_scale = {**scale, "kind": row.kind} if with_kind else dict(scale)
    models = row.config.split("+")
    return {
        "config": row.config,
        "models": models,
        "train_scale": train_scale,
        "mode": row.mode,
        "scales": single if row.scales == "single" else multi,
    }


def write_all(directory, rows, *, with_kind: bool = True) -> None:
    written = set()
    for i, row in enumerate(rows):
        if row.cell in written:  # Table 5's dense rows are Table 4's D/E jitter rows
            continue
        written.add(row.cell)
        name = f"{row.config}_{row.kind}_{row.scales}_{row.mode}.npz".replace("+", "-")
        meta = meta_for(row, with_kind=with_kind)
        posteriors = fake_posteriors(row.paper[0] + SHIFT1, row.paper[1] + SHIFT5, meta, seed=i)
        posteriors.save(directory / name)


def test_fake_posteriors_have_the_intended_errors():
    result = errors(fake_posteriors(29.6, 10.4, {}))
    assert result == pytest.approx({"top1_err": 29.6, "top5_err": 10.4})


@pytest.mark.parametrize("with_kind", [True, False], ids=["kind-in-meta", "kind-inferred"])
def test_every_cell_filled_from_saved_results(tmp_path, with_kind):
    results, out = tmp_path / "results", tmp_path / "report"
    results.mkdir()
    write_all(results, [*TABLE3, *TABLE4, *TABLE5, *TABLE6], with_kind=with_kind)

    paths = write_report(results, out)

    markdown = paths.markdown.read_text()
    metrics = json.loads(paths.metrics.read_text())
    for row in [*TABLE3, *TABLE4, *TABLE5, *TABLE6]:
        ours = metrics[row.table][row.name]
        assert ours == pytest.approx({"top1_err": row.paper[0] + SHIFT1, "top5_err": row.paper[1] + SHIFT5})
        # The row shows our number and the paper's side by side.
        cells = f"{row.paper[0] + SHIFT1:.1f} | {row.paper[0]:.1f} | {row.paper[1] + SHIFT5:.1f} | {row.paper[1]:.1f} |"
        assert cells in markdown, f"{row.table} {row.name}"
    table_lines = [line for line in markdown.split("## Findings")[0].splitlines() if line.startswith("|")]
    assert len(table_lines) == 31 + 4 * 2  # 31 rows, 4 headers
    assert not [line for line in table_lines if "—" in line]  # no empty cell
    assert metrics["findings"] == {finding.name: "reproduced" for finding in findings(paper_cells())}
    assert markdown.count("— reproduced.") == len(metrics["findings"])
    # Small-profile rows line up with the paper's by kind: S=56 sits in the paper's S=384 row.
    assert re.search(r"\| D \| high \| 56 \| 56 \| 384 \| 384 \|", markdown)
    assert re.search(r"\| D \| jitter \| 40-72 \| 40,56,72 \| \[256;512\] \| 256,384,512 \|", markdown)
    for plot in paths.plots:
        assert plot.read_bytes().startswith(b"\x89PNG") and plot.name in markdown


def test_findings_hold_on_the_papers_own_numbers():
    assert {f.name: f.status for f in findings(paper_cells())} == dict.fromkeys(
        [
            "lrn_does_not_help",
            "depth_helps",
            "conv3_beats_conv1",
            "scale_jitter_helps",
            "multi_scale_test_helps",
            "dense_plus_multicrop_best",
            "fusion_helps",
        ],
        "reproduced",
    )


def test_partial_results_show_dashes_and_not_measured(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    a, a_lrn = TABLE3[0], TABLE3[1]
    # A-LRN better than A: LRN "helps" here, so that finding is not reproduced.
    fake_posteriors(30.0, 10.0, meta_for(a, with_kind=True)).save(results / "a.npz")
    fake_posteriors(25.0, 9.0, meta_for(a_lrn, with_kind=True)).save(results / "a_lrn.npz")

    paths = write_report(results, tmp_path / "report")

    markdown = paths.markdown.read_text()
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["table3"] == {
        "A/low": {"top1_err": 30.0, "top5_err": 10.0},
        "A-LRN/low": {"top1_err": 25.0, "top5_err": 9.0},
    }
    assert metrics["table6"] == {}
    assert "| B | low | — | — | 256 | 256 | — | 28.7 | — | 9.9 |" in markdown
    status = metrics["findings"]
    assert status["lrn_does_not_help"] == "not reproduced"
    assert "30.00 ≥ 25.00" in markdown
    assert {status[name] for name in status if name != "lrn_does_not_help"} == {"not measured"}


def test_fusion_file_from_fuse_lands_in_table6(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    d, e = (row for row in TABLE5 if row.mode == "multicrop")
    p_d = fake_posteriors(30.0, 10.0, meta_for(d, with_kind=True), seed=1)
    p_e = fake_posteriors(30.0, 10.0, meta_for(e, with_kind=True), seed=1)  # same keys and labels
    p_d.save(results / "d.npz")
    p_e.save(results / "e.npz")
    fused = fuse([Posteriors.load(results / "d.npz"), Posteriors.load(results / "e.npz")])
    fused.save(results / "fused.npz")

    metrics = json.loads(write_report(results, tmp_path / "report").metrics.read_text())

    assert metrics["table6"]["D+E/multicrop"] == errors(fused)
    assert metrics["findings"]["fusion_helps"] in ("reproduced", "not reproduced")


def test_results_without_training_scale_are_listed_but_placed_nowhere(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    meta = {"config": "D", "models": ["D"], "mode": "dense", "scales": [224]}  # e.g. torchvision's weights
    fake_posteriors(30.0, 10.0, meta).save(results / "torchvision_vgg16.npz")
    fake_posteriors(31.0, 11.0, meta_for(TABLE3[0], with_kind=True)).save(results / "a.npz")
    fake_posteriors(32.0, 12.0, meta_for(TABLE3[0], with_kind=True)).save(results / "b.npz")

    paths = write_report(results, tmp_path / "report")

    markdown = paths.markdown.read_text()
    assert json.loads(paths.metrics.read_text())["table3"] == {"A/low": {"top1_err": 31.0, "top5_err": 11.0}}
    assert "| torchvision_vgg16.npz | D | — | dense | 224 | 30.00 | 10.00 |" in markdown
    assert "`torchvision_vgg16.npz` is in no table" in markdown
    assert "`b.npz` repeats the table cell of `a.npz`" in markdown


def test_missing_results_dir_and_bad_meta_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="results directory not found"):
        write_report(tmp_path / "nope", tmp_path / "out")
    results = tmp_path / "results"
    results.mkdir()
    fake_posteriors(30.0, 10.0, {"config": "A", "scales": [40]}).save(results / "x.npz")
    with pytest.raises(DataError, match=r"x\.npz: meta has no 'mode'"):
        write_report(results, tmp_path / "out")
    assert not (tmp_path / "out" / "report.md").exists()
